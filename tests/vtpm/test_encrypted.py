"""LUKS-encrypted vTPM stores (issue 16), with the real tools as oracles: qemu-img, qemu-io
and qemu-storage-daemon open what ``vtpm-qcow create --encrypt`` makes and the other way
round, swtpm runs on an encrypted store through ``vtpm-qcow serve`` and through
qemu-storage-daemon, and the secret shows up in no process's command line or environment.

Every process started here is stopped in ``finally`` blocks (mount_fixtures, qsd below).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import need
from tests.vtpm.mount_fixtures import (
    force_unmount,
    is_mounted,
    pid_alive,
    qsd_fuse_export,
    runtime_dir,  # noqa: F401  (fixture)
    vtpm_qcow,
    wait_gone,
)
from tests.vtpm.swtpm_fixtures import NV_INDEX, running_swtpm, setup_state, tpm_client
from tests.vtpm.test_secret import SECRET, private_file, user_key
from vtpm_qcow.export.control import ControlClient, pid_path_for
from vtpm_qcow.state import linear
from vtpm_qcow.state.store import DEFAULT_SIZE, Store
from vtpm_qcow.tpm.client import SwtpmSocketTransport, Tpm
from vtpm_qcow.tpm.swtpm import CMD_SHUTDOWN, control_command, free_tcp_port_pair

pytestmark = pytest.mark.usefixtures("runtime_dir")

#: How the secret's text would show up in argv or an environment block.
SECRET_TEXT = b"correct horse"
ITER = "10"  # milliseconds of PBKDF2: fast tests


def qemu_secret(key: Path) -> list[str]:
    """QEMU's secret object for the key file (the same file vtpm-qcow reads)."""
    return ["--object", f"secret,id=s0,file={key}"]


def image_opts(image: Path) -> str:
    return f"driver=qcow2,file.filename={image},encrypt.key-secret=s0"


def run(*argv: str, ok: bool = True) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(list(argv), capture_output=True, timeout=120, check=False)
    if ok and done.returncode:
        raise AssertionError(f"{argv} exited {done.returncode}: {done.stderr!r}")
    return done


def qemu_raw(image: Path, key: Path, out: Path) -> bytes:
    """The guest content of the encrypted image as qemu-img converts it."""
    run(need("qemu-img"), "convert", *qemu_secret(key), "--image-opts", image_opts(image),
        "-O", "raw", str(out))  # fmt: skip
    return out.read_bytes()


def qemu_check(image: Path, key: Path) -> None:
    done = run(need("qemu-img"), "check", *qemu_secret(key), "--image-opts", image_opts(image))
    assert b"No errors were found" in done.stdout, done.stdout


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line(done: subprocess.CompletedProcess[str], *words: str) -> None:
    """A refusal: non-zero exit, one line on stderr naming ``words``, no traceback and no
    trace of the secret."""
    assert done.returncode != 0, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert SECRET_TEXT.decode() not in done.stderr + done.stdout
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def key(tmp_path: Path) -> Path:
    return private_file(tmp_path / "vtpm.key")


@pytest.fixture
def tpm_image(tmp_path: Path, key: Path) -> Path:
    """An encrypted store holding a TPM manufactured by swtpm_setup (vtpm-qcow setup)."""
    image = tmp_path / "vtpm.qcow2"
    vtpm_qcow("setup", "--create", "--encrypt", "--iter-time", ITER, "--secret-file", str(key),
              str(image))  # fmt: skip
    return image


# Section: the image is QEMU's LUKS qcow2


def test_create_encrypt_makes_what_qemu_img_opens(tmp_path: Path, key: Path) -> None:
    image = tmp_path / "vtpm.qcow2"
    vtpm_qcow("create", "--encrypt", "--iter-time", ITER, "--secret-file", str(key), str(image))
    info = json.loads(run(need("qemu-img"), "info", "--output=json", str(image)).stdout)
    assert info["encrypted"] is True
    luks = info["format-specific"]["data"]["encrypt"]
    assert (luks["format"], luks["cipher-alg"], luks["cipher-mode"], luks["ivgen-alg"]) == (
        "luks", "aes-256", "xts", "plain64",
    )  # fmt: skip
    assert luks["hash-alg"] == "sha256"
    assert [slot["active"] for slot in luks["slots"]] == [True] + [False] * 7
    qemu_check(image, key)
    # the empty linear layout, as QEMU decrypts it; and nowhere in the clear on disk
    raw = qemu_raw(image, key, tmp_path / "out.raw")
    assert len(raw) == DEFAULT_SIZE
    assert raw[: len(linear.empty_layout())] == linear.empty_layout()
    assert linear.empty_layout()[:8] not in image.read_bytes()


def test_qemu_img_creates_qemu_io_writes_we_read(tmp_path: Path, key: Path) -> None:
    plain = tmp_path / "state.lin"
    setup_state(f"file://{plain}")
    state = plain.read_bytes()
    image = tmp_path / "vtpm.qcow2"
    run(need("qemu-img"), "create", "-f", "qcow2", *qemu_secret(key),
        "-o", f"encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time={ITER}",
        "-o", "cluster_size=4096",
        str(image), str(DEFAULT_SIZE))  # fmt: skip
    run(need("qemu-io"), *qemu_secret(key), "--image-opts", image_opts(image),
        "-c", f"write -s {plain} 0 {len(state)}")  # fmt: skip
    with Store.open(image, writable=False, key=SECRET) as store:
        assert store.encrypted
        assert store.read_linear(0, len(state)) == state
        sections = {name: store.read_section(name) for name in store.sections()}
    assert sections["permall"]
    # the command: info, check (a real swtpm dry-loads it), export
    info = json.loads(vtpm_qcow("info", "--json", "--secret-file", str(key), str(image)).stdout)
    assert info["encryption"]["format"] == "luks" and not info["locked"]
    assert info["loadable"] and info["tpm_version"] == "2.0"
    vtpm_qcow("check", "--secret-file", str(key), str(image))
    vtpm_qcow("export", "--secret-file", str(key), str(image), str(tmp_path / "out.lin"))
    assert (tmp_path / "out.lin").read_bytes()[: len(state)] == state


def test_we_set_up_and_snapshot_qemu_reads(tmp_path: Path, key: Path, tpm_image: Path) -> None:
    vtpm_qcow("snapshot", "-c", "first", "--secret-file", str(key), str(tpm_image))
    qemu_check(tpm_image, key)
    listed = run(need("qemu-img"), "snapshot", *qemu_secret(key), "-l", "--image-opts",
                 image_opts(tpm_image)).stdout.decode()  # fmt: skip
    assert "first" in listed
    raw = qemu_raw(tpm_image, key, tmp_path / "out.raw")
    with Store.open(tpm_image, writable=False, key=SECRET) as store:
        assert raw == store.read_linear(0, store.linear_size)
        permall = store.read_section("permall")
    assert permall and permall in raw
    # QEMU's view of the snapshot is the same state, decrypted
    snap = tmp_path / "snap.raw"
    run(need("qemu-img"), "convert", *qemu_secret(key), "-l", "snapshot.name=first",
        "--image-opts", image_opts(tpm_image), "-O", "raw", str(snap))  # fmt: skip
    assert snap.read_bytes() == raw
    assert permall not in tpm_image.read_bytes()  # ciphertext on disk


def test_qemu_storage_daemon_serves_our_encrypted_store_to_swtpm(
    tmp_path: Path, key: Path, tpm_image: Path
) -> None:
    payload = b"qsd+luks"
    with qsd_fuse_export(tpm_image, tmp_path / "tpmstate.raw", secret=qemu_secret(key)) as exported:
        assert os.path.getsize(exported) == DEFAULT_SIZE
        with (
            running_swtpm(f"backend-uri=file://{exported}", tmp_path / "run") as swtpm,
            tpm_client(swtpm) as tpm,
        ):
            tpm.nv_define_space(NV_INDEX, len(payload))
            tpm.nv_write(NV_INDEX, payload)
    qemu_check(tpm_image, key)
    vtpm_qcow("check", "--secret-file", str(key), str(tpm_image))
    out = tmp_path / "exported"
    vtpm_qcow("export", "--dir", "--secret-file", str(key), str(tpm_image), str(out))
    with running_swtpm(f"dir={out}", tmp_path / "run2") as swtpm, tpm_client(swtpm) as tpm:
        assert tpm.nv_read(NV_INDEX, len(payload)) == payload


# Section: serve on an encrypted store


def _no_secret_in(pid: int) -> None:
    """/proc/PID/cmdline and environ of a live process hold no trace of the secret."""
    for name in ("cmdline", "environ"):
        data = Path(f"/proc/{pid}/{name}").read_bytes()
        assert data, f"/proc/{pid}/{name} is empty"
        assert SECRET_TEXT not in data, f"the secret is in /proc/{pid}/{name}"


@contextlib.contextmanager
def serving(
    image: Path, tmp_path: Path, *secret: str, **popen: object
) -> Iterator[tuple[int, int]]:
    """``vtpm-qcow serve`` on ``image`` with swtpm's data channel on a TCP port: yields
    (the daemon's pid, the port); the daemon is always stopped after."""
    port = free_tcp_port_pair()
    ctrl = tmp_path / "swtpm.ctrl"
    done = subprocess.run(
        [
            need("vtpm-qcow"), "serve", str(image), "--ctrl", str(ctrl), *secret,
            "--swtpm-flags", "not-need-init,startup-clear",
            "--swtpm-option=--server", f"--swtpm-option=type=tcp,port={port}",
            "--log", str(tmp_path / "serve.log"),
        ],
        capture_output=True, text=True, timeout=120, check=False, **popen,  # type: ignore[call-overload]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    pid = int(pid_path_for(image).read_text())
    try:
        yield pid, port
        assert control_command(str(ctrl), CMD_SHUTDOWN) == 0
        assert wait_gone(pid), "serve did not exit after swtpm"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not wait_gone(pid, 20):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_gone(pid)


def test_serve_encrypted_store_keeps_nv_data_across_restart_and_never_shows_the_secret(
    tmp_path: Path, key: Path, tpm_image: Path
) -> None:
    payload = b"luks-nv!"
    with serving(tpm_image, tmp_path, "--secret-file", str(key)) as (pid, port):
        with ControlClient.for_image(tpm_image) as client:
            swtpm_pid = client.info()["swtpm_pid"]
        assert swtpm_pid and pid_alive(swtpm_pid)
        _no_secret_in(pid)
        _no_secret_in(swtpm_pid)
        with SwtpmSocketTransport(port) as transport:
            tpm = Tpm(transport)
            tpm.nv_define_space(NV_INDEX, len(payload))
            tpm.nv_write(NV_INDEX, payload)
    assert payload not in tpm_image.read_bytes()
    qemu_check(tpm_image, key)
    # again, the secret given by descriptor this time
    read_end, write_end = os.pipe()
    os.write(write_end, SECRET)
    os.close(write_end)
    try:
        with serving(tpm_image, tmp_path, "--secret-fd", str(read_end), pass_fds=(read_end,)) as (
            pid,
            port,
        ):
            _no_secret_in(pid)
            with SwtpmSocketTransport(port) as transport:
                assert Tpm(transport).nv_read(NV_INDEX, len(payload)) == payload
    finally:
        os.close(read_end)


def test_serve_with_the_secret_in_the_kernel_keyring(tmp_path: Path, tpm_image: Path) -> None:
    with (
        user_key(SECRET) as name,
        serving(tpm_image, tmp_path, "--secret-keyring", name) as (pid, port),
    ):
        _no_secret_in(pid)
        with SwtpmSocketTransport(port) as transport:
            assert len(Tpm(transport).get_random(8)) == 8


def refused_daemon(
    image: Path, *argv: str, mountpoint: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a ``mount``/``serve`` that must be refused; should it start a daemon anyway, that
    daemon is stopped (and its mount undone) before the test looks at the result."""
    done = vtpm_qcow(*argv, check=False)
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_path_for(image).read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not wait_gone(pid, 20):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_gone(pid)
    if mountpoint is not None:
        force_unmount(mountpoint)
    return done


def test_mount_and_serve_refuse_a_missing_or_wrong_secret(
    tmp_path: Path, key: Path, tpm_image: Path
) -> None:
    before = digest(tpm_image)
    wrong = private_file(tmp_path / "wrong.key", b"not the passphrase")
    loose = private_file(tmp_path / "loose.key", mode=0o640)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    ctrl = str(tmp_path / "ctrl")
    for command in (
        ["mount", str(tpm_image), str(mountpoint)],
        ["serve", str(tpm_image), "--ctrl", ctrl],
    ):
        for extra, words in (
            ([], ["LUKS-encrypted", "--secret-file"]),
            (["--secret-file", str(wrong)], ["Invalid password"]),
            (["--secret-file", str(loose)], [str(loose), "0640"]),
        ):
            assert not is_mounted(mountpoint)
            done = refused_daemon(tpm_image, *command, *extra, mountpoint=mountpoint)
            assert_one_line(done, *words)
    assert not is_mounted(mountpoint)
    assert digest(tpm_image) == before


# Section: plaintext TPM state never staged on a disk


@contextlib.contextmanager
def created_in(directory: Path) -> Iterator[list[str]]:
    """Names of what is created in ``directory`` meanwhile (inotify; filled in on exit)."""
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    in_create, in_nonblock = 0x100, os.O_NONBLOCK
    fd = libc.inotify_init1(in_nonblock)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    names: list[str] = []
    try:
        assert libc.inotify_add_watch(fd, os.fsencode(directory), in_create) >= 0
        yield names
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            data = b""
        while data:
            _wd, _mask, _cookie, size = struct.unpack_from("iIII", data)
            names.append(data[16 : 16 + size].rstrip(b"\0").decode())
            data = data[16 + size :]
    finally:
        os.close(fd)


def test_setup_and_the_dry_load_stage_plaintext_in_memory_not_in_tmpdir(
    tmp_path: Path, key: Path
) -> None:
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    image = tmp_path / "vtpm.qcow2"
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    with created_in(tmpdir) as names:
        for argv in (
            ["setup", "--create", "--encrypt", "--iter-time", ITER, "--secret-file", str(key)],
            ["check", "--secret-file", str(key)],  # a real swtpm dry-loads a copy
        ):
            done = subprocess.run(
                [need("vtpm-qcow"), *argv, str(image)],
                capture_output=True, text=True, timeout=120, env=env, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
    assert "state: loads" in done.stdout
    # swtpm_setup's configuration directory and swtpm_setup's own scratch directory may
    # be there; the state directories of setup and of the dry load may not
    staged = [name for name in names if name.startswith(("vtpm-qcow-setup-", "vtpm-qcow-probe-"))]
    assert staged == [], f"TPM state staged in $TMPDIR: {staged}"


# Section: every command takes the secret; refusals are one line


def _commands(image: Path, tmp_path: Path) -> list[list[str]]:
    """Each command that opens the image, as it would run (without a secret)."""
    plain = tmp_path / "plain-state"
    return [
        ["snapshot", "-l", str(image)],
        ["snapshot", "-c", "t", str(image)],
        ["check", "--no-load", str(image)],
        ["export", str(image), str(tmp_path / "exported.lin")],
        ["backup", str(image), str(tmp_path / "backup.qcow2")],
        ["import", str(image), str(plain)],
        ["setup", "--overwrite", str(image)],
        ["vm", "verify", "--disk", str(tmp_path / "disk.qcow2"), str(image)],
    ]


def test_commands_refuse_a_missing_wrong_or_unsafe_secret(
    tmp_path: Path, key: Path, tpm_image: Path
) -> None:
    setup_state(str(_plain_dir(tmp_path)))
    run(need("qemu-img"), "create", "-f", "qcow2", str(tmp_path / "disk.qcow2"), "1M")
    wrong = private_file(tmp_path / "wrong.key", b"not the passphrase")
    loose = private_file(tmp_path / "loose.key", mode=0o604)
    before = digest(tpm_image)
    for command in _commands(tpm_image, tmp_path):
        done = vtpm_qcow(*command, check=False)
        assert_one_line(done, str(tpm_image), "LUKS-encrypted", "--secret-file")
        done = vtpm_qcow(*command, "--secret-file", str(wrong), check=False)
        assert_one_line(done, str(tpm_image), "Invalid password")
        done = vtpm_qcow(*command, "--secret-file", str(loose), check=False)
        assert_one_line(done, str(loose), "0604")
        assert digest(tpm_image) == before, command
    assert not (tmp_path / "exported.lin").exists()
    assert not (tmp_path / "backup.qcow2").exists()


def _plain_dir(tmp_path: Path) -> Path:
    path = tmp_path / "plain-state"
    path.mkdir(exist_ok=True)
    return path


def test_commands_work_with_each_secret_source(
    tmp_path: Path, key: Path, tpm_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup_state(str(_plain_dir(tmp_path)))
    run(need("qemu-img"), "create", "-f", "qcow2", str(tmp_path / "disk.qcow2"), "1M")
    creds = tmp_path / "creds"
    creds.mkdir()
    private_file(creds / "vtpm", mode=0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    with user_key(SECRET) as name:
        sources = [
            ["--secret-file", str(key)],
            ["--secret-keyring", name],
            ["--secret-credential", "vtpm"],
        ]
        for number, command in enumerate(_commands(tpm_image, tmp_path)):
            secret = sources[number % len(sources)]
            if command[0] in ("export", "backup"):
                command = [*command[:-1], command[-1] + str(number)]
            if command[0] == "vm":  # it read the image: tag 't' is on the vTPM image only
                done = vtpm_qcow(*command, *secret, check=False)
                assert done.returncode == 1 and "MISSING-DISK" in done.stdout, done
                continue
            vtpm_qcow(*command, *secret)
    # and by descriptor
    read_end, write_end = os.pipe()
    os.write(write_end, SECRET)
    os.close(write_end)
    try:
        done = subprocess.run(
            [need("vtpm-qcow"), "info", "--json", "--secret-fd", str(read_end), str(tpm_image)],
            capture_output=True, text=True, timeout=60, pass_fds=(read_end,), check=True,
        )  # fmt: skip
    finally:
        os.close(read_end)
    info = json.loads(done.stdout)
    assert info["tpm_version"] == "2.0" and [s["tag"] for s in info["snapshots"]] == ["t"]
    qemu_check(tpm_image, key)


def test_info_without_the_secret_shows_the_luks_header(
    tmp_path: Path, key: Path, tpm_image: Path
) -> None:
    vtpm_qcow("snapshot", "-c", "before", "--secret-file", str(key), str(tpm_image))
    done = vtpm_qcow("info", str(tpm_image))
    assert "encryption: LUKS (aes-256 xts-plain64, sha256), key slots 0" in done.stdout
    assert "state: LUKS-encrypted (give --secret-file" in done.stdout
    assert "before" in done.stdout
    info = json.loads(vtpm_qcow("info", "--json", str(tpm_image)).stdout)
    assert info["locked"] is True and info["encryption"]["format"] == "luks"
    assert [s["tag"] for s in info["snapshots"]] == ["before"]
    assert "sections" not in info


def test_create_encrypt_needs_a_secret_and_a_secret_needs_encrypt(
    tmp_path: Path, key: Path
) -> None:
    image = tmp_path / "new.qcow2"
    assert_one_line(vtpm_qcow("create", "--encrypt", str(image), check=False), "--encrypt needs")
    assert_one_line(
        vtpm_qcow("create", "--secret-file", str(key), str(image), check=False), "--encrypt"
    )
    assert_one_line(
        vtpm_qcow("setup", "--create", "--encrypt", str(image), check=False), "--encrypt needs"
    )
    assert not image.exists()
    done = vtpm_qcow(
        "create", "--secret-file", str(key), "--secret-fd", "0", str(image), check=False
    )
    assert_one_line(done, "give one secret, not several", "--secret-file", "--secret-fd 0")
    assert not image.exists()


# Section: backups stay encrypted


def test_backup_of_an_encrypted_store_stays_encrypted(
    tmp_path: Path, key: Path, tpm_image: Path
) -> None:
    vtpm_qcow("snapshot", "-c", "s1", "--secret-file", str(key), str(tpm_image))
    backup = tmp_path / "backup.qcow2"
    vtpm_qcow("backup", "--secret-file", str(key), str(tpm_image), str(backup))
    info = json.loads(run(need("qemu-img"), "info", "--output=json", str(backup)).stdout)
    assert info["encrypted"] is True
    qemu_check(backup, key)
    done = vtpm_qcow("verify", "--json", "--secret-file", str(key), str(backup))
    checked = json.loads(done.stdout)["checked"]
    assert "qcow2 check" in checked and "snapshot 's1' sections" in checked
    # without the key: the ciphertext's digests and the qcow2 structure, and a note
    done = vtpm_qcow("verify", "--json", str(backup))
    verified = json.loads(done.stdout)
    assert verified["ok"] and "qcow2 check" in verified["checked"]
    assert "state sections" not in verified["checked"]
    assert "--secret-file" in verified["notes"][0]
    # a changed byte of ciphertext is found without the key
    tampered = tmp_path / "tampered" / backup.name
    tampered.parent.mkdir()
    data = bytearray(backup.read_bytes())
    data[-1] ^= 1
    tampered.write_bytes(bytes(data))
    manifest = Path(f"{backup}.manifest.json")
    Path(f"{tampered}.manifest.json").write_bytes(manifest.read_bytes())
    done = vtpm_qcow("verify", str(tampered), check=False)
    assert done.returncode == 1, done
    assert f"{tampered}: file backup.qcow2 differs from the manifest" in done.stderr
    # a plain backup of encrypted state is refused
    done = vtpm_qcow(
        "backup", "--format", "raw", "--secret-file", str(key), str(tpm_image),
        str(tmp_path / "b.raw"), check=False,
    )  # fmt: skip
    assert_one_line(done, "stays encrypted")
    assert not (tmp_path / "b.raw").exists()
    restored = tmp_path / "restored.qcow2"
    vtpm_qcow("restore", "--secret-file", str(key), str(backup), str(restored))
    assert json.loads(run(need("qemu-img"), "info", "--output=json", str(restored)).stdout)[
        "encrypted"
    ]
    with (
        Store.open(tpm_image, writable=False, key=SECRET) as original,
        Store.open(restored, writable=False, key=SECRET) as copy,
    ):
        assert copy.state_digest() == original.state_digest()
        assert copy.snapshot_tags() == ["s1"]


# Section: swtpm's own state key, as libvirt passes it


def _blob_encrypted(image: Path, *secret: str) -> bool:
    info = json.loads(vtpm_qcow("info", "--json", *secret, str(image)).stdout)
    return bool(info["sections"]["permall"]["blob"]["encrypted"])


def test_swtpm_state_key_through_setup_and_serve_survives_restart(
    tmp_path: Path, key: Path
) -> None:
    image = tmp_path / "vtpm.qcow2"
    secret = ["--secret-file", str(key)]
    vtpm_qcow("setup", "--create", "--swtpm-key", *secret, str(image))
    assert not Store.is_encrypted(image)  # the image is plain: swtpm encrypts its blobs
    assert _blob_encrypted(image)
    assert "encrypted layers: swtpm state key\n" in vtpm_qcow("info", str(image)).stdout
    both = tmp_path / "both.qcow2"
    vtpm_qcow("setup", "--create", "--encrypt", "--iter-time", ITER, "--swtpm-key", *secret,
              str(both))  # fmt: skip
    info = json.loads(vtpm_qcow("info", "--json", *secret, str(both)).stdout)
    assert info["encrypted_layers"] == ["qcow2 LUKS", "swtpm state key"]
    assert "encrypted layers: qcow2 LUKS\n" in vtpm_qcow("info", str(both)).stdout  # locked
    # check dry-loads it only with the key; a wrong key is a state swtpm does not load
    wrong = private_file(tmp_path / "wrong.key", b"not the passphrase")
    done = vtpm_qcow("check", str(image))
    assert "encrypted state: not dry-loaded (swtpm needs its key)" in done.stdout
    done = vtpm_qcow("check", "--swtpm-key", *secret, str(image))
    assert "state: loads: a real swtpm started on it" in done.stdout
    done = vtpm_qcow("check", "--swtpm-key", "--secret-file", str(wrong), str(image), check=False)
    assert done.returncode == 2 and "not loadable: dry load: swtpm exited" in done.stdout
    assert_one_line(
        vtpm_qcow("check", "--repair", "--swtpm-key", *secret, str(image), check=False),
        "--repair cannot tell a wrong --swtpm-key",
    )
    payload = b"swtpmkey"
    with serving(image, tmp_path, "--swtpm-key", *secret) as (pid, port):
        with ControlClient.for_image(image) as client:
            swtpm_pid = client.info()["swtpm_pid"]
        cmdline = Path(f"/proc/{swtpm_pid}/cmdline").read_bytes()
        assert b"--key\0pwdfd=" in cmdline and b"--migration-key\0pwdfd=" in cmdline
        _no_secret_in(pid)
        _no_secret_in(swtpm_pid)
        with SwtpmSocketTransport(port) as transport:
            tpm = Tpm(transport)
            tpm.nv_define_space(NV_INDEX, len(payload))
            tpm.nv_write(NV_INDEX, payload)
    assert _blob_encrypted(image)
    assert payload not in image.read_bytes()
    read_end, write_end = os.pipe()
    os.write(write_end, SECRET)
    os.close(write_end)
    try:
        with (
            serving(
                image, tmp_path, "--swtpm-key", "--secret-fd", str(read_end), pass_fds=(read_end,)
            ) as (_pid, port),
            SwtpmSocketTransport(port) as transport,
        ):
            assert Tpm(transport).nv_read(NV_INDEX, len(payload)) == payload
    finally:
        os.close(read_end)
    # without the key, or with another one, swtpm cannot load the state: one line
    before = digest(image)
    ctrl = str(tmp_path / "ctrl")
    assert_one_line(
        refused_daemon(image, "serve", str(image), "--ctrl", ctrl),
        "encrypted with its own key",
        "--swtpm-key",
    )
    done = refused_daemon(
        image, "serve", str(image), "--ctrl", ctrl, "--swtpm-key", "--secret-file", str(wrong),
        "--swtpm-flags", "not-need-init,startup-clear",
    )  # fmt: skip
    assert_one_line(done, "swtpm")
    assert_one_line(
        refused_daemon(image, "serve", str(image), "--ctrl", ctrl, "--swtpm-key"),
        "--swtpm-key needs the passphrase",
    )
    assert digest(image) == before


def test_libvirt_style_encrypted_state_dir_imports_and_serves(tmp_path: Path, key: Path) -> None:
    state = tmp_path / "tpm2"
    state.mkdir()
    fd = os.open(key, os.O_RDONLY)
    try:  # what libvirt runs for <encryption secret=...>
        subprocess.run(
            [need("swtpm_setup"), "--tpm2", "--tpmstate", str(state), "--pwdfile-fd", str(fd),
             "--cipher", "aes-256-cbc", "--overwrite"],
            capture_output=True, timeout=120, check=True, pass_fds=(fd,),
        )  # fmt: skip
    finally:
        os.close(fd)
    image = tmp_path / "vtpm.qcow2"
    vtpm_qcow("create", str(image))
    done = vtpm_qcow("import", str(image), str(state))
    assert "encrypted with swtpm's own key" in done.stderr and "--swtpm-key" in done.stderr
    assert _blob_encrypted(image)
    with (
        serving(image, tmp_path, "--swtpm-key", "--secret-file", str(key)) as (_pid, port),
        SwtpmSocketTransport(port) as transport,
    ):
        assert len(Tpm(transport).get_random(8)) == 8


# Section: rekey (qemu-img amend's encrypt.state parity)


def _opens_in_qemu(image: Path, key: Path) -> bool:
    done = run(need("qemu-io"), *qemu_secret(key), "--image-opts", image_opts(image),
               "-c", "read 0 512", ok=False)  # fmt: skip
    return done.returncode == 0 and b"Invalid password" not in done.stderr


def _slots(image: Path) -> list[int]:
    info = json.loads(run(need("qemu-img"), "info", "--output=json", str(image)).stdout)
    slots = info["format-specific"]["data"]["encrypt"]["slots"]
    return [i for i, slot in enumerate(slots) if slot["active"]]


def test_rekey_adds_and_erases_key_slots_as_qemu_img_amend_does(
    tmp_path: Path, key: Path, tpm_image: Path
) -> None:
    second = private_file(tmp_path / "second.key", b"second passphrase")
    third = private_file(tmp_path / "third.key", b"third passphrase")
    with Store.open(tpm_image, writable=False, key=SECRET) as store:
        state = store.state_digest()
    raw = qemu_raw(tpm_image, key, tmp_path / "before.raw")
    # ours adds, QEMU opens with the new passphrase
    vtpm_qcow("rekey", "--add", "--iter-time", ITER, "--secret-file", str(key),
              "--new-secret-file", str(second), str(tpm_image))  # fmt: skip
    assert _slots(tpm_image) == [0, 1]
    assert qemu_raw(tpm_image, second, tmp_path / "second.raw") == raw
    # QEMU adds, we open with its new passphrase
    run(need("qemu-img"), "amend", *qemu_secret(key), "--object", f"secret,id=s1,file={third}",
        "-o", f"encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time={ITER}",
        "--image-opts", image_opts(tpm_image))  # fmt: skip
    assert _slots(tpm_image) == [0, 1, 2]
    with Store.open(tpm_image, writable=False, key=third.read_bytes()) as store:
        assert store.state_digest() == state
    # an occupied slot is not overwritten; ours erases every slot a passphrase opens
    done = vtpm_qcow("rekey", "--add", "--keyslot", "1", "--secret-file", str(key),
                     "--new-secret-file", str(third), str(tpm_image), check=False)  # fmt: skip
    assert_one_line(done, "Refusing to overwrite active keyslot 1")
    vtpm_qcow("rekey", "--remove", "--secret-file", str(key), str(tpm_image))
    assert _slots(tpm_image) == [1, 2]
    assert not _opens_in_qemu(tpm_image, key) and _opens_in_qemu(tpm_image, second)
    assert_one_line(
        vtpm_qcow("info", "--secret-file", str(key), str(tpm_image), check=False),
        "Invalid password",
    )
    # QEMU erases slot 1 (the second passphrase): we refuse it then
    run(need("qemu-img"), "amend", "--object", f"secret,id=s0,file={third}",
        "-o", "encrypt.state=inactive,encrypt.keyslot=1",
        "--image-opts", image_opts(tpm_image))  # fmt: skip
    assert _slots(tpm_image) == [2]
    assert_one_line(
        vtpm_qcow("info", "--secret-file", str(second), str(tpm_image), check=False),
        "Invalid password",
    )
    # the last slot stays, as QEMU keeps it
    before = digest(tpm_image)
    done = vtpm_qcow("rekey", "--remove", "--secret-file", str(third), str(tpm_image), check=False)
    assert_one_line(done, "Attempt to erase the only active keyslot 2")
    done = vtpm_qcow("rekey", "--add", "--secret-file", str(third), str(tpm_image), check=False)
    assert_one_line(done, "--add needs the new passphrase")
    assert digest(tpm_image) == before
    qemu_check(tpm_image, third)
    assert qemu_raw(tpm_image, third, tmp_path / "after.raw") == raw


def test_check_repair_restores_an_encrypted_store(
    tmp_path: Path, key: Path, tpm_image: Path
) -> None:
    secret = ["--secret-file", str(key)]
    vtpm_qcow("snapshot", "-c", "good", *secret, str(tpm_image))
    with Store.open(tpm_image, key=SECRET) as store:
        good = store.state_digest()
        permall = store.sections()["permall"]
        store.commit_linear([(permall.offset + 100, b"\xff" * 64)])  # libtpms refuses it
    done = vtpm_qcow("check", *secret, str(tpm_image), check=False)
    assert done.returncode == 2 and "not loadable: dry load" in done.stdout
    done = vtpm_qcow("check", "--repair", *secret, str(tpm_image))
    assert "repair: restored" in done.stdout
    assert "(reach it with 'vtpm-qcow backup --snapshot unloadable-" in done.stdout
    assert "state: loads" in vtpm_qcow("check", *secret, str(tpm_image)).stdout
    with Store.open(tpm_image, writable=False, key=SECRET) as store:
        assert store.state_digest() == good
    qemu_check(tpm_image, key)
