"""What the ``vtpm-qcow`` subcommands print for scripts."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def print_json(value: Any) -> None:
    """``value`` as indented JSON on stdout (``--json``): ``json.dumps(value, indent=2)``."""
    print(dumps(value))


def dumps(value: Any) -> str:
    """``json.dumps(value, indent=2)``, byte for byte, without importing :mod:`json` for
    the plain types (dict, list, tuple, str, int, float, bool, None): ``json`` imports
    ``re``, ``enum`` and ``functools``, several milliseconds of ``info --json``'s start-up
    (tests/vtpm/test_cli_startup.py).  Anything else goes to :func:`json.dumps` itself."""
    out: list[str] = []
    try:
        _encode(value, out, "\n")
    except _NotPlain:
        import json

        return json.dumps(value, indent=2)
    return "".join(out)


class _NotPlain(Exception):
    """A value :func:`dumps` leaves to :mod:`json` (its type, a cycle, a nested depth)."""


def _encode(value: Any, out: list[str], newline: str) -> None:
    """Append ``value``'s JSON to ``out``; ``newline`` is a newline and the current indent."""
    kind = type(value)
    if kind is str:
        out.append(_string(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif kind is int:
        out.append(int.__repr__(value))
    elif kind is float:
        out.append(_float(value))
    elif kind is list or kind is tuple:
        if not value:
            out.append("[]")
            return
        inner = newline + "  "
        if len(inner) > 200:  # deeper than any output of ours: json's own recursion checks
            raise _NotPlain
        out.append("[")
        for i, item in enumerate(value):
            out.append(inner if i == 0 else "," + inner)
            _encode(item, out, inner)
        out.append(newline + "]")
    elif kind is dict:
        if not value:
            out.append("{}")
            return
        inner = newline + "  "
        if len(inner) > 200:
            raise _NotPlain
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            out.append(inner if i == 0 else "," + inner)
            out.append(_string(_key(key)))
            out.append(": ")
            _encode(item, out, inner)
        out.append(newline + "}")
    else:
        raise _NotPlain


def _key(key: Any) -> str:
    """A dict key as json writes it (keys that are not strings are converted)."""
    kind = type(key)
    if kind is str:
        return str(key)
    if key is None:
        return "null"
    if key is True:
        return "true"
    if key is False:
        return "false"
    if kind is int:
        return int.__repr__(key)
    if kind is float:
        return _float(key)
    raise _NotPlain


def _float(value: float) -> str:
    if value != value:
        return "NaN"
    if value == float("inf"):
        return "Infinity"
    if value == -float("inf"):
        return "-Infinity"
    return float.__repr__(value)


def _string(text: str) -> str:
    from _json import encode_basestring_ascii  # json's own C escaping (ensure_ascii)

    return str(encode_basestring_ascii(text))


__all__ = ["dumps", "print_json"]
