"""Secret sources (vtpm_qcow.state.secret): a private file, an fd, the kernel keyring, a
systemd credential; refusals name the source, never the secret."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import need
from vtpm_qcow.errors import SecretError
from vtpm_qcow.state.secret import MAX_SECRET, SecretSource, read_secret

#: a secret with what a careless reader would lose: spaces, non-ASCII, a trailing newline
SECRET = "correct horse battery staple \u00e9\n".encode()


def private_file(path: Path, data: bytes = SECRET, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


@contextlib.contextmanager
def user_key(data: bytes) -> Iterator[str]:
    """A ``user`` key in the user keyring, added by the real keyctl (payload on stdin)."""
    keyctl = need("keyctl")
    name = f"vtpm-qcow-test-{uuid.uuid4().hex[:12]}"
    done = subprocess.run(
        [keyctl, "padd", "user", name, "@u"], input=data, capture_output=True, check=True
    )
    key_id = done.stdout.decode().strip()
    try:
        yield name
    finally:
        subprocess.run([keyctl, "unlink", key_id, "@u"], capture_output=True, check=False)


def test_file_is_read_verbatim(tmp_path: Path) -> None:
    source = SecretSource("file", str(private_file(tmp_path / "key")))
    assert source.read() == SECRET
    assert read_secret([source]) == SECRET
    assert read_secret([]) is None


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644, 0o610])
def test_file_others_may_access_is_refused_like_ssh(tmp_path: Path, mode: int) -> None:
    path = private_file(tmp_path / "key", mode=mode)
    with pytest.raises(SecretError) as caught:
        SecretSource("file", str(path)).read()
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message and f"{mode:04o}" in message
    assert b"horse" not in message.encode()


def test_owner_only_modes_are_accepted(tmp_path: Path) -> None:
    for mode in (0o400, 0o600, 0o700):
        path = private_file(tmp_path / f"key{mode:o}", mode=mode)
        assert SecretSource("file", str(path)).read() == SECRET


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    for path, words in (
        (tmp_path / "missing", ["cannot open", "No such file"]),
        (tmp_path, ["not a regular file"]),
        (Path("/dev/null"), ["not a regular file"]),
        (private_file(tmp_path / "empty", b""), ["is empty", "--secret-file"]),
        (private_file(tmp_path / "big", b"x" * (MAX_SECRET + 1)), ["not a passphrase"]),
    ):
        with pytest.raises(SecretError) as caught:
            SecretSource("file", str(path)).read()
        assert str(path) in str(caught.value)
        for word in words:
            assert word in str(caught.value)


def test_fd_is_read_to_its_end_then_closed() -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, SECRET)
    os.close(write_end)
    assert SecretSource("fd", str(read_end)).read() == SECRET
    with pytest.raises(OSError):
        os.fstat(read_end)  # closed


def test_bad_fds_are_refused() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    for text, words in (
        (str(read_end), ["not an open file descriptor"]),
        ("-1", ["not a file descriptor number"]),
        ("three", ["not a file descriptor number"]),
    ):
        with pytest.raises(SecretError) as caught:
            SecretSource("fd", text).read()
        for word in words:
            assert word in str(caught.value)


def test_kernel_keyring_user_key() -> None:
    with user_key(SECRET) as name:
        assert SecretSource("keyring", name).read() == SECRET
    with pytest.raises(SecretError) as caught:  # unlinked: gone
        SecretSource("keyring", name).read()
    assert f"--secret-keyring {name}: no such user key" in str(caught.value)


def test_systemd_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    private_file(creds / "vtpm-key", mode=0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert SecretSource("credential", "vtpm-key").read() == SECRET
    for name, words in (
        ("other", ["cannot open", "other"]),
        ("../x", ["not a credential name"]),
    ):
        with pytest.raises(SecretError) as caught:
            SecretSource("credential", name).read()
        for word in words:
            assert word in str(caught.value)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(SecretError) as caught:
        SecretSource("credential", "vtpm-key").read()
    assert "$CREDENTIALS_DIRECTORY is not set" in str(caught.value)


@pytest.mark.parametrize("data", [b"nul\x00inside", b"latin-1 \xe9"])
def test_what_qemu_would_refuse_is_refused(tmp_path: Path, data: bytes) -> None:
    path = private_file(tmp_path / "key", data)
    with pytest.raises(SecretError) as caught:
        SecretSource("file", str(path)).read()
    assert "not UTF-8 text without NUL bytes" in str(caught.value)
    assert str(path) in str(caught.value)


def test_two_sources_are_refused(tmp_path: Path) -> None:
    path = private_file(tmp_path / "key")
    with pytest.raises(SecretError) as caught:
        read_secret([SecretSource("file", str(path)), SecretSource("keyring", "k")])
    assert "give one secret" in str(caught.value)


def test_the_parsed_arguments_never_show_the_secret(tmp_path: Path) -> None:
    from vtpm_qcow.cli.main import build_parser
    from vtpm_qcow.cli.secrets import secret_key

    path = private_file(tmp_path / "key")
    args = build_parser().parse_args(["info", "--secret-file", str(path), "image.qcow2"])
    assert secret_key(args) == SECRET
    assert secret_key(args) == SECRET  # read once, kept
    assert b"horse" not in repr(args).encode() and "horse" not in str(vars(args))
    assert "<secret withheld>" in repr(args)


def test_a_process_holding_a_secret_is_not_dumpable(tmp_path: Path) -> None:
    """Under another group, /proc/PID/environ belongs to that group while the process is
    dumpable and to root once it is not (the kernel's task_dump_owner)."""
    setpriv = need("setpriv")
    image = tmp_path / "missing.qcow2"
    proc = subprocess.Popen(
        [setpriv, "--regid=65534", "--clear-groups", need("vtpm-qcow"), "info",
         "--secret-fd", "0", str(image)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stderr is not None
    try:
        # setpriv itself is not dumpable between its setregid and its exec: look once
        # vtpm-qcow runs and waits for the secret on the pipe
        wchan = Path(f"/proc/{proc.pid}/wchan")
        deadline = time.monotonic() + 30
        while not (
            b"vtpm-qcow" in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            and "pipe" in wchan.read_text()
        ):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "vtpm-qcow did not wait for the secret"
            time.sleep(0.02)
        assert Path(f"/proc/{proc.pid}/environ").stat().st_gid == 0, "dumpable"
        proc.stdin.write(SECRET)
        proc.stdin.close()
        assert proc.wait(60) == 1
        assert b"missing.qcow2: no such file" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
