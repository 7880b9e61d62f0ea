"""The secret options every command that opens an image takes, added by one helper.

``--secret-file FILE``, ``--secret-fd N``, ``--secret-keyring NAME`` and
``--secret-credential NAME`` (:mod:`vtpm_qcow.state.secret` reads them); at most one.  The
secret is read once per command (:func:`secret_key`) and handed to the code that opens the
image as bytes: never as an argument or environment variable of a process we start.
"""

from __future__ import annotations

from ..errors import SecretError
from ..state.secret import OPTIONS_HINT, SecretSource, read_secret

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

_HELP = {
    "file": (
        "FILE",
        "the passphrase of a LUKS-encrypted image: FILE's bytes, verbatim (what "
        "QEMU's --object secret,file=FILE reads); FILE must be private (mode 0600 or "
        "0400)",
    ),
    "fd": ("N", "read the passphrase from inherited file descriptor N, to its end"),
    "keyring": (
        "NAME",
        "the passphrase is the kernel key 'user' NAME (keyctl padd user NAME "
        "@u), in the session or user keyring",
    ),
    "credential": (
        "NAME",
        "the passphrase is the systemd credential NAME "
        "($CREDENTIALS_DIRECTORY/NAME, LoadCredential=)",
    ),
}


def add_secret_options(parser: argparse.ArgumentParser) -> None:
    """Add the four secret options to ``parser`` (one at most: :func:`secret_key` refuses
    several; not an argparse exclusive group, whose usage line does not wrap)."""
    group = parser.add_argument_group("encrypted images (LUKS)")
    for kind, (metavar, text) in _HELP.items():
        group.add_argument(
            f"--secret-{kind}",
            dest=f"secret_{kind}",
            metavar=metavar,
            help=text,
        )


def add_new_secret_options(parser: argparse.ArgumentParser) -> None:
    """``--new-secret-file/-fd/-keyring/-credential``: a second passphrase (``rekey``)."""
    group = parser.add_argument_group("the new passphrase (one of)")
    for kind, (metavar, _text) in _HELP.items():
        group.add_argument(
            f"--new-secret-{kind}",
            dest=f"new_secret_{kind}",
            metavar=metavar,
            help=f"like --secret-{kind}, for the passphrase to add",
        )


def new_secret_key(args: argparse.Namespace) -> bytes | None:
    """The passphrase of the ``--new-secret-*`` option given (None if none), read once."""
    held = getattr(args, "_new_secret", None)
    if not isinstance(held, _Withheld):
        sources = [
            SecretSource(kind, name, "--new-secret")
            for kind in _HELP
            if (name := getattr(args, f"new_secret_{kind}", None)) is not None
        ]
        held = _Withheld(read_secret(sources))
        args._new_secret = held
    return held.key


def add_swtpm_key_option(parser: argparse.ArgumentParser) -> None:
    """``--swtpm-key``: the secret is also swtpm's own state encryption passphrase."""
    parser.add_argument(
        "--swtpm-key",
        action="store_true",
        help="the secret is also swtpm's state encryption passphrase, as libvirt's "
        "<encryption secret=...> has it (swtpm --key/--migration-key pwdfd=, swtpm_setup "
        "--pwdfile-fd, aes-256-cbc), handed over through pipes",
    )


def swtpm_state_key(args: argparse.Namespace) -> bytes | None:
    """The passphrase for swtpm's own state encryption (with ``--swtpm-key``), else None."""
    if not getattr(args, "swtpm_key", False):
        return None
    key = secret_key(args)
    if key is None:
        raise SecretError(f"--swtpm-key needs the passphrase: give {OPTIONS_HINT}")
    return key


def secret_sources(args: argparse.Namespace) -> list[SecretSource]:
    """The secret sources given on the command line."""
    sources = []
    for kind in _HELP:
        name = getattr(args, f"secret_{kind}", None)
        if name is not None:
            sources.append(SecretSource(kind, name))
    return sources


class _Withheld:
    """The secret kept on the parsed arguments; its repr (and so the Namespace's, should
    anything print or log it) never shows the bytes."""

    __slots__ = ("key",)

    def __init__(self, key: bytes | None) -> None:
        self.key = key

    def __repr__(self) -> str:
        return "<secret withheld>" if self.key is not None else "None"


def secret_key(args: argparse.Namespace) -> bytes | None:
    """The secret given on the command line (None if none), read on first use and kept on
    ``args`` (a descriptor can be read only once)."""
    held = getattr(args, "_secret", None)
    if not isinstance(held, _Withheld):
        held = _Withheld(read_secret(secret_sources(args)))
        args._secret = held
    return held.key


__all__ = [
    "add_new_secret_options",
    "add_secret_options",
    "add_swtpm_key_option",
    "new_secret_key",
    "secret_key",
    "secret_sources",
    "swtpm_state_key",
]
