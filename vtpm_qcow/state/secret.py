"""Where the passphrase of a LUKS-encrypted vTPM image comes from, read once.

Four sources, one per command-line option (:mod:`vtpm_qcow.cli.secrets` adds them):

* ``--secret-file FILE``: the file's bytes, verbatim (as QEMU's ``--object
  secret,id=s0,file=FILE`` reads it: the same file unlocks the image in qemu-img).  Refused,
  like ssh refuses a private key, when group or others have any access to it.
* ``--secret-fd N``: everything readable from an inherited file descriptor (a pipe, a
  file), read to its end, then the descriptor is closed.
* ``--secret-keyring NAME``: the payload of the kernel key of type ``user`` described as
  NAME, searched in the session keyring, then the user keyring (``keyctl padd user NAME
  @s``); read with the ``keyctl(2)`` system call, no program is started.
* ``--secret-credential NAME``: systemd's credential ``$CREDENTIALS_DIRECTORY/NAME``
  (``LoadCredential=``/``LoadCredentialEncrypted=`` of the unit).

A secret must be UTF-8 text without NUL bytes, as QEMU requires of a key secret; a trailing
newline is part of it (QEMU reads the file verbatim too).

The secret never travels on a command line or in the environment and no message holds it:
errors name the source (file, descriptor, key or credential), never the bytes.
"""

from __future__ import annotations

import errno
import os
import stat

from ..errors import SecretError
from .record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Final

#: What a command needs to be told when an encrypted image gets no secret.
OPTIONS_HINT: Final = "--secret-file, --secret-fd, --secret-keyring or --secret-credential"
#: No passphrase is this long: a larger source is a mistake (a disk, /dev/zero).
MAX_SECRET: Final = 64 * 1024
#: The kinds of source, by the option that names them.
KINDS: Final = ("file", "fd", "keyring", "credential")

# keyctl(2): commands and special keyring ids (linux/keyctl.h)
_KEYCTL_SEARCH: Final = 10
_KEYCTL_READ: Final = 11
_KEY_SPEC_USER_KEYRING: Final = -4
_KEY_SPEC_SESSION_KEYRING: Final = -3
#: keyctl's system call number by machine (asm/unistd.h)
_SYS_KEYCTL: Final = {"x86_64": 250, "aarch64": 219, "riscv64": 219}


class SecretSource(Record):
    """One place a secret is read from: ``kind`` (one of :data:`KINDS`) and ``name`` (the
    file, the descriptor number, the key's description or the credential's name)."""

    __slots__ = _FIELDS = ("kind", "name", "prefix")
    kind: str
    name: str
    #: the options' prefix: ``--secret`` (``--secret-file``), ``--new-secret`` (rekey)
    prefix: str

    def __init__(self, kind: str, name: str, prefix: str = "--secret") -> None:
        self._init(kind, name, prefix)

    @property
    def option(self) -> str:
        """The option that names this source (``--secret-file``)."""
        return f"{self.prefix}-{self.kind}"

    def describe(self) -> str:
        """The option that named this source, as given (``--secret-file /etc/k``)."""
        return f"{self.option} {self.name}"

    def read(self) -> bytes:
        """The secret's bytes; :class:`SecretError` (naming the source) if they cannot be
        read, or are empty."""
        if self.kind == "file":
            data = _read_file(self.name, check_mode=True)
        elif self.kind == "fd":
            data = _read_fd(self.name, self.option)
        elif self.kind == "keyring":
            data = _read_key(self.name, self.option)
        elif self.kind == "credential":
            data = _read_credential(self.name, self.option)
        else:
            raise SecretError(f"unknown secret source {self.kind!r}")
        if not data:
            raise SecretError(f"the secret from {self.describe()} is empty")
        if not _qemu_accepts(data):
            raise SecretError(
                f"the secret from {self.describe()} is not UTF-8 text without NUL bytes, "
                "which QEMU requires of an encryption secret"
            )
        return data


def _qemu_accepts(data: bytes) -> bool:
    """QEMU takes a passphrase as UTF-8 without NUL (``qcrypto_secret_lookup_as_utf8``):
    a key QEMU's tools could not give would lock the image away from them."""
    if b"\0" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _read_all(fd: int, where: str, path: str | None) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError as err:
            raise SecretError(
                f"cannot read {where}: {err.strerror}", path=path, errno=err.errno
            ) from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_SECRET:
            raise SecretError(
                f"{where} holds more than {MAX_SECRET >> 10} KiB: not a passphrase", path=path
            )
        chunks.append(chunk)


def _read_file(path: str, *, check_mode: bool) -> bytes:
    """A secret file's bytes; with ``check_mode``, refused if group or others may access it
    (checked on the open file: no race with a chmod)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as err:
        raise SecretError(
            f"cannot open secret file: {err.strerror}", path=path, errno=err.errno
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretError("secret file is not a regular file", path=path)
        mode = stat.S_IMODE(st.st_mode)
        if check_mode and mode & 0o077:
            raise SecretError(
                f"secret file mode {mode:04o} lets group or others access it; "
                "chmod 600 it (refused like ssh refuses such a key)",
                path=path,
            )
        return _read_all(fd, "secret file", path)
    finally:
        os.close(fd)


def _read_fd(text: str, option: str) -> bytes:
    """Everything readable from descriptor ``text`` (a number), which is then closed."""
    try:
        fd = int(text)
    except ValueError:
        fd = -1
    if fd < 0 or str(fd) != text.strip():
        raise SecretError(f"{option} {text!r}: not a file descriptor number")
    try:
        os.fstat(fd)
    except OSError as err:
        raise SecretError(
            f"{option} {fd}: not an open file descriptor ({err.strerror})", errno=err.errno
        ) from None
    try:
        return _read_all(fd, f"{option} {fd}", None)
    finally:
        os.close(fd)


def _read_credential(name: str, option: str) -> bytes:
    """systemd's credential ``name`` of the running unit."""
    if not name or "/" in name or name in (".", ".."):
        raise SecretError(f"{option} {name!r}: not a credential name")
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise SecretError(
            f"{option} {name}: $CREDENTIALS_DIRECTORY is not set (run from a "
            f"systemd unit with LoadCredential={name}:...)"
        )
    # systemd makes credentials readable by the unit only (a private, read-only directory)
    return _read_file(os.path.join(directory, name), check_mode=False)


def _keyctl() -> Callable[..., int]:
    """libc's ``syscall`` (returns a C long; errno kept for ctypes.get_errno)."""
    import ctypes  # only for --secret-keyring: the other commands do not pay for it

    libc = ctypes.CDLL(None, use_errno=True)
    func = libc.syscall
    func.restype = ctypes.c_long
    syscall: Callable[..., int] = func
    return syscall


def _read_key(name: str, option: str) -> bytes:
    """The payload of the ``user`` key ``name`` (session keyring, then user keyring)."""
    import ctypes
    import platform

    number = _SYS_KEYCTL.get(platform.machine())
    if number is None:
        raise SecretError(f"{option} {name}: no keyctl system call known on {platform.machine()}")
    syscall = _keyctl()
    key_id = -1
    err = errno.ENOKEY
    for keyring in (_KEY_SPEC_SESSION_KEYRING, _KEY_SPEC_USER_KEYRING):
        key_id = syscall(
            ctypes.c_long(number),
            ctypes.c_long(_KEYCTL_SEARCH),
            ctypes.c_long(keyring),
            ctypes.c_char_p(b"user"),
            ctypes.c_char_p(os.fsencode(name)),
            ctypes.c_long(0),
        )
        if key_id >= 0:
            break
        err = ctypes.get_errno()
    if key_id < 0:
        if err in (errno.ENOKEY, errno.EKEYEXPIRED, errno.EKEYREVOKED):
            why = {
                errno.ENOKEY: "no such user key in the session or user keyring",
                errno.EKEYEXPIRED: "the key has expired",
                errno.EKEYREVOKED: "the key was revoked",
            }[err]
            raise SecretError(
                f"{option} {name}: {why} (add it with: keyctl padd user {name} @u)",
                errno=err,
            )
        raise SecretError(f"{option} {name}: {os.strerror(err)}", errno=err)
    size = MAX_SECRET
    buf = ctypes.create_string_buffer(size)
    length = syscall(
        ctypes.c_long(number),
        ctypes.c_long(_KEYCTL_READ),
        ctypes.c_long(key_id),
        buf,
        ctypes.c_long(size),
    )
    try:
        if length < 0:
            err = ctypes.get_errno()
            raise SecretError(
                f"{option} {name}: cannot read key {key_id}: {os.strerror(err)}",
                errno=err,
            )
        if length > size:
            raise SecretError(
                f"{option} {name}: more than {MAX_SECRET >> 10} KiB: not a passphrase"
            )
        return buf.raw[:length]
    finally:
        ctypes.memset(buf, 0, size)


#: A memory file system for plaintext TPM state staged for swtpm (Linux's shared memory).
MEMORY_TMP: Final = "/dev/shm"


def staging_dir() -> str | None:
    """Where TPM state is staged in the clear for swtpm (swtpm_setup's output, a dry
    load's copy): a memory file system when there is one, so that the state of an encrypted
    image never reaches a disk in the clear; None (the default temporary directory) when
    there is none."""
    if os.path.isdir(MEMORY_TMP) and os.access(MEMORY_TMP, os.W_OK | os.X_OK):
        return MEMORY_TMP
    return None


#: prctl(2)'s PR_SET_DUMPABLE (linux/prctl.h)
_PR_SET_DUMPABLE: Final = 4


def protect_process() -> None:
    """Make this process non-dumpable before it holds a secret: no core dump, and no
    other process of the same user may read its memory (ptrace, /proc/PID/mem) or its
    /proc files; programs it starts are dumpable again (the flag resets at exec)."""
    import ctypes  # only once a secret is read: the other commands do not pay for it

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise SecretError(f"cannot protect the secret from core dumps: {os.strerror(err)}")


def read_secret(sources: list[SecretSource]) -> bytes | None:
    """The secret of the one source given (None if none); more than one is refused.  The
    process is made non-dumpable first (:func:`protect_process`)."""
    if not sources:
        return None
    if len(sources) > 1:
        named = ", ".join(source.describe() for source in sources)
        raise SecretError(f"give one secret, not several ({named})")
    protect_process()
    return sources[0].read()


__all__ = [
    "KINDS",
    "MAX_SECRET",
    "OPTIONS_HINT",
    "SecretSource",
    "protect_process",
    "read_secret",
    "staging_dir",
]
