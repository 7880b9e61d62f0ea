"""Command-line syntax of the ``qcow2`` command: subcommands, options, operands, --help.

qemu-img parses with ``getopt_long``; so does this module, in the same style: options and
operands may be mixed (``info IMG --output=json``), short flags cluster (``-Uq``), a value
follows its option in the same word or the next (``-oX``, ``-o X``, ``--output=json``,
``--output json``), and ``--`` ends the options.  An error is the first line qemu-img
prints, word for word, and only that line (qemu-img adds a "Try 'qemu-img --help'" hint).

argparse is not used on purpose: with its imports (re, gettext, locale, shutil) it costs
about as much start-up time as qemu-img's whole ``info``.  Each command is declared once,
as a :class:`Command` with its :class:`Option` list, and its --help text is generated from
that declaration.
"""

from __future__ import annotations

from ..errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any


class Option:
    """One option: its spellings (``"-U"``, ``"--force-share"``), where its value goes
    (``dest``), and whether it is a flag, takes a value, or collects repeated values."""

    __slots__ = ("choices", "choices_error", "dest", "help", "kind", "metavar", "names")

    def __init__(
        self,
        *names: str,
        dest: str | None = None,
        kind: str = "flag",
        choices: Sequence[str] = (),
        choices_error: str = "",
        metavar: str = "",
        help: str = "",
    ) -> None:
        if kind not in ("flag", "value", "append"):
            raise ValueError(f"option kind {kind!r} is not flag, value or append")
        self.names = names
        self.dest = dest or names[-1].lstrip("-").replace("-", "_")
        self.kind = kind
        self.choices = tuple(choices)
        #: qemu-img's message for a value outside ``choices`` (``{value}`` is replaced)
        self.choices_error = choices_error
        self.metavar = metavar or ("{" + ",".join(choices) + "}" if choices else "VALUE")
        self.help = help

    @property
    def takes_value(self) -> bool:
        return self.kind != "flag"

    def default(self) -> bool | None:
        """False for a flag not given, None for a value option not given."""
        return False if self.kind == "flag" else None

    def usage(self) -> str:
        name = self.names[0]
        if not self.takes_value:
            return f"[{name}]"
        joiner = "=" if name.startswith("--") else " "
        return f"[{name}{joiner}{self.metavar}]"


class Command:
    """A subcommand: name, one-line help, handler, options and operand names.

    ``operands`` names the operands in order; a trailing ``?`` marks an optional one.
    ``too_few`` and ``too_many`` are qemu-img's messages when their number is wrong
    (``{extra}`` in ``too_many`` is replaced by the first operand too many).
    """

    __slots__ = ("help", "name", "operands", "options", "run", "too_few", "too_many")

    def __init__(
        self,
        name: str,
        help: str,
        run: Callable[[Arguments], int],
        options: Sequence[Option],
        operands: Sequence[str],
        too_few: str,
        too_many: str = "",
    ) -> None:
        self.name = name
        self.help = help
        self.run = run
        self.options = tuple(options)
        self.operands = tuple(operands)
        self.too_few = too_few
        self.too_many = too_many or too_few

    def find(self, name: str) -> Option | None:
        """The option spelled ``name``; a long option may be abbreviated to any unique
        prefix, as getopt_long allows (``--out=json``)."""
        for option in self.options:
            if name in option.names:
                return option
        if not name.startswith("--") or len(name) < 3:
            return None
        matches = {o for o in self.options for n in o.names if n.startswith(name)}
        if len(matches) > 1:
            raise UsageError(f"option '{name}' is ambiguous")
        return matches.pop() if matches else None

    def usage(self) -> str:
        words = [f"usage: qcow2 {self.name}", *(o.usage() for o in self.options)]
        for operand in self.operands:
            words.append(f"[{operand[:-1].upper()}]" if operand.endswith("?") else operand.upper())
        return " ".join(words)

    def help_text(self) -> str:
        lines = [self.usage(), "", self.help, "", "options:"]
        for option in self.options:
            names = ", ".join(option.names)
            if option.takes_value:
                names += f" {option.metavar}"
            text = option.help or ""
            if option.kind == "append":
                text = (text + " " if text else "") + "(may be repeated)"
            lines.append(f"  {names:<28} {text}".rstrip() if len(names) <= 28 else f"  {names}")
            if len(names) > 28 and text:
                lines.append(f"  {'':<28} {text}")
        lines.append(f"  {'-h, --help':<28} show this help and exit")
        return "\n".join(lines) + "\n"


class Arguments:
    """The parsed command line: ``command`` plus one attribute per option ``dest`` and per
    operand name (an option not given holds False if a flag, else None; a missing optional
    operand holds None; an ``append`` option holds the list of its values)."""

    def __init__(self, command: Command) -> None:
        self.command = command.name
        self.func = command.run
        for option in command.options:
            setattr(self, option.dest, option.default())

    if TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any: ...


class HelpRequested(Exception):
    """``-h``/``--help`` was given: the exception's text is the help to print (exit 0)."""


def parse(commands: Sequence[Command], argv: Sequence[str], *, description: str = "") -> Arguments:
    """Parse ``argv`` (without the program name) into :class:`Arguments`.

    Raises :class:`UsageError` with qemu-img's message, or :class:`HelpRequested`.
    """
    if not argv:
        raise UsageError("Not enough arguments")
    by_name = {c.name: c for c in commands}
    first, rest = argv[0], list(argv[1:])
    if first in ("-h", "--help"):
        raise HelpRequested(overview(commands, description))
    command = by_name.get(first)
    if command is None:
        raise UsageError(f"Command not found: {first}")
    args = Arguments(command)
    operands: list[str] = []
    i = 0
    while i < len(rest):
        word = rest[i]
        i += 1
        if word == "--":
            operands += rest[i:]
            break
        if word in ("-h", "--help"):
            raise HelpRequested(command.help_text())
        if word.startswith("--"):
            name, has_value, value = word.partition("=")
            option = command.find(name)
            if option is None or (has_value and not option.takes_value):
                raise UsageError(f"unrecognized option '{word}'")
            if option.takes_value and not has_value:
                if i == len(rest):
                    raise UsageError(f"missing argument for option '{name}'")
                value = rest[i]
                i += 1
            _store(args, option, value)
        elif word.startswith("-") and word != "-":
            pos = 1
            while pos < len(word):
                name = "-" + word[pos]
                pos += 1
                option = command.find(name)
                if option is None:
                    raise UsageError(f"unrecognized option '{word}'")
                if not option.takes_value:
                    _store(args, option, "")
                    continue
                if pos < len(word):
                    value = word[pos:]
                elif i < len(rest):
                    value = rest[i]
                    i += 1
                else:
                    raise UsageError(f"missing argument for option '{name}'")
                _store(args, option, value)
                break
        else:
            operands.append(word)
    required = [o for o in command.operands if not o.endswith("?")]
    if len(operands) < len(required):
        raise UsageError(command.too_few)
    if len(operands) > len(command.operands):
        raise UsageError(command.too_many.replace("{extra}", operands[len(command.operands)]))
    for index, name in enumerate(command.operands):
        setattr(args, name.rstrip("?"), operands[index] if index < len(operands) else None)
    return args


def _store(args: Arguments, option: Option, value: str) -> None:
    if option.kind == "flag":
        setattr(args, option.dest, True)
        return
    if option.choices and value not in option.choices:
        message = option.choices_error or (
            f"Invalid value '{{value}}' for option '{option.names[0]}' "
            f"(expecting {' or '.join(repr(c) for c in option.choices)})"
        )
        raise UsageError(message.replace("{value}", value))
    if option.kind == "append":
        setattr(args, option.dest, [*(getattr(args, option.dest) or ()), value])
    else:
        setattr(args, option.dest, value)


def overview(commands: Sequence[Command], description: str) -> str:
    """The top-level --help: what the tool is and one line per command."""
    lines = ["usage: qcow2 COMMAND [OPTIONS] OPERANDS...", ""]
    if description:
        lines += [description, ""]
    lines.append("commands:")
    lines += [f"  {c.name:<10} {c.help}" for c in commands]
    lines += ["", "Run 'qcow2 COMMAND --help' for the options of a command."]
    return "\n".join(lines) + "\n"
