"""The ``qcow2`` command on LUKS-encrypted images, golden-tested against qemu-img 7.2.

Both tools get the same arguments (``--object secret,...``, ``--image-opts driver=qcow2,
file.filename=IMG,encrypt.key-secret=ID``, ``create -o encrypt.*``) on identical copies of
an image that qemu-img created and qemu-io wrote through its key; stdout, stderr and the
exit code must match.  What cannot match byte for byte (a new LUKS header has random salts
and machine-timed iteration counts) is judged by qemu-img reading our image with the key.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.qcow2 import oracle
from tests.qcow2.test_cli import (  # noqa: F401 - restore_cwd is an autouse fixture
    Run,
    restore_cwd,
    run_cli,
    run_qemu_img,
)

MiB = 1024 * 1024
SECRET = "secret,id=sec0,data=pass phrase"
#: The same passphrase as a base64 secret.
SECRET_B64 = "secret,id=sec0,data=cGFzcyBwaHJhc2U="
OPTS = "driver=qcow2,file.filename=img.qcow2,encrypt.key-secret=sec0"


def luks_create_args(path: str, *extra: str) -> tuple[str, ...]:
    """``create`` arguments of a 16 MiB LUKS image (passphrase of :data:`SECRET`)."""
    return (
        "create",
        "-f",
        "qcow2",
        "--object",
        SECRET,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        *extra,
        path,
        "16M",
    )


def create_luks(path: Path, *extra: str) -> Run:
    """qemu-img create of a LUKS image.  qemu times PBKDF2 with getrusage, which can read
    zero CPU time on a busy machine ("Unable to get accurate CPU usage", whatever the
    iteration time): retry a few times."""
    last = Run(1, "", "not attempted")
    for _ in range(12):
        last = run_qemu_img(*luks_create_args(str(path), *extra))
        if last.code == 0:
            return last
    raise AssertionError(f"qemu-img could not create a LUKS image: {last.err}")


def _qemu_io(path: Path, *commands: str) -> None:
    args = ["--object", SECRET, "--image-opts", OPTS.replace("img.qcow2", str(path))]
    for command in commands:
        args += ["-c", command]
    proc = oracle._run([oracle.need("qemu-io"), *args])
    assert b"failed" not in proc.stdout, proc.stdout


@pytest.fixture(scope="module")
def luks_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16 MiB LUKS image with data, a zero range and one snapshot."""
    path = tmp_path_factory.mktemp("luks") / "img.qcow2"
    create_luks(path)
    _qemu_io(path, "write -P 0x11 0 1M", "write -P 0x22 4M 64k", "write -z 8M 1M")
    oracle.qemu_img(
        "snapshot",
        "--object",
        SECRET,
        "--image-opts",
        OPTS.replace("img.qcow2", str(path)),
        "-c",
        "first",
    )
    _qemu_io(path, "write -P 0x33 0 64k")
    return path


def _both(tmp_path: Path, image: Path, *args: str) -> tuple[Run, Run, Path, Path]:
    """Run qemu-img and qcow2 with ``args`` in two directories holding a copy of ``image``
    named img.qcow2 (the argument strings name it relatively)."""
    dirs = []
    for name in ("q", "o"):
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        shutil.copyfile(image, d / "img.qcow2")
        dirs.append(d)
    os.chdir(dirs[0])
    theirs = run_qemu_img(*args)
    os.chdir(dirs[1])
    ours = run_cli(*args)
    return theirs, ours, dirs[0], dirs[1]


def _assert_same(theirs: Run, ours: Run) -> None:
    assert (ours.code, ours.out, ours.err) == (theirs.code, theirs.out, theirs.err)


KEYED = ("--object", SECRET, "--image-opts", OPTS)


@pytest.mark.parametrize(
    "args",
    [
        ("info", *KEYED),
        ("info", "--output=json", *KEYED),
        ("check", *KEYED),
        ("check", "--output=json", *KEYED),
        ("map", *KEYED),
        ("map", "--output=json", *KEYED),
        ("snapshot", "-l", *KEYED),
        ("compare", *KEYED, OPTS),
        ("compare", "--object", "secret,id=sec0,data=wrong", "--image-opts", OPTS, OPTS),
        ("check", "--object", "secret,id=sec0,data=wrong", "--image-opts", OPTS),
        ("check", "--object", f"{SECRET_B64},format=base64", "--image-opts", OPTS),
        ("map", "--object", "secret,id=other,data=x", "--image-opts", OPTS),
        ("check", "--image-opts", OPTS),
        ("info", "--image-opts", OPTS),
        ("info", "--image-opts", "driver=qcow2,file.filename=img.qcow2"),
        ("check", "--object", SECRET, "img.qcow2"),
        ("check", "-f", "qcow2", "--image-opts", OPTS),
        ("check", "--object", "secret,data=x", "img.qcow2"),
        ("check", "--object", "secret,id=a,data=x,file=y", "img.qcow2"),
        ("check", "--object", "secret,id=a", "img.qcow2"),
        ("check", "--object", "foo,id=a", "img.qcow2"),
        ("info", "--object", "secret,id=,data=x", "img.qcow2"),
        ("info", "--object", "secret,id=9a,data=x", "img.qcow2"),
        ("check", "--object", "secret,id=a,data=x", "--object", "secret,id=a,data=y", "img.qcow2"),
    ],
    ids=lambda a: " ".join(a).replace(OPTS, "OPTS").replace(SECRET, "SECRET"),
)
def test_read_commands_match_qemu_img(
    luks_image: Path, tmp_path: Path, args: tuple[str, ...]
) -> None:
    theirs, ours, _, _ = _both(tmp_path, luks_image, *args)
    _assert_same(theirs, ours)


def test_secret_from_a_file_matches_qemu_img(luks_image: Path, tmp_path: Path) -> None:
    secret = tmp_path / "pass.txt"
    secret.write_bytes(b"pass phrase")
    for path in (secret, tmp_path / "missing.txt"):
        obj = f"secret,id=sec0,file={path}"
        theirs, ours, _, _ = _both(
            tmp_path, luks_image, "check", "--object", obj, "--image-opts", OPTS
        )
        _assert_same(theirs, ours)


def test_convert_decrypts_like_qemu_img(luks_image: Path, tmp_path: Path) -> None:
    """The active state and a snapshot (-l) come out as qemu-img decrypts them."""
    firsts = []
    for extra in ((), ("-l", "first")):
        work = tmp_path / ("-".join(extra) or "active")
        work.mkdir()
        args = ("convert", *extra, "-O", "raw", *KEYED, "out.raw")
        theirs, ours, q, o = _both(work, luks_image, *args)
        _assert_same(theirs, ours)
        assert (o / "out.raw").read_bytes() == (q / "out.raw").read_bytes()
        firsts.append((o / "out.raw").read_bytes()[:1])
    assert firsts == [b"\x33", b"\x11"]  # the fixture's writes after / before the snapshot


def test_snapshot_create_apply_delete_with_the_key(luks_image: Path, tmp_path: Path) -> None:
    """Our snapshot changes on an encrypted image read back through qemu-img and its key."""
    img = tmp_path / "img.qcow2"
    shutil.copyfile(luks_image, img)
    os.chdir(tmp_path)
    before = tmp_path / "before.raw"
    oracle.qemu_img("convert", "-O", "raw", *KEYED, str(before))
    assert run_cli("snapshot", "-c", "mine", *KEYED).code == 0
    _qemu_io(img, "write -P 0x44 0 2M")
    assert run_cli("snapshot", "-a", "mine", *KEYED).code == 0
    oracle.qemu_img("compare", *KEYED, "driver=raw,file.filename=before.raw")
    listing = oracle.qemu_img("snapshot", "-l", *KEYED).stdout.decode()
    assert " mine " in listing and " first " in listing
    assert run_cli("snapshot", "-d", "mine", *KEYED).code == 0
    assert " mine " not in oracle.qemu_img("snapshot", "-l", *KEYED).stdout.decode()
    oracle.qemu_img("check", *KEYED)
    # without the key, or with a wrong one, nothing changes and the errors match
    wrong = ("--object", "secret,id=sec0,data=bad", "--image-opts", OPTS)
    for args in (("snapshot", "-c", "x", "img.qcow2"), ("snapshot", "-d", "first", *wrong)):
        data = img.read_bytes()
        theirs = run_qemu_img(*args)
        assert theirs.code != 0
        _assert_same(theirs, run_cli(*args))
        assert img.read_bytes() == data


def _luks_info(path: Path) -> dict[str, object]:
    """qemu-img info's LUKS fields that do not depend on randomness or timing."""
    info = json.loads(
        oracle.qemu_img(
            "info",
            "--output=json",
            "--object",
            SECRET,
            "--image-opts",
            OPTS.replace("img.qcow2", str(path)),
        ).stdout
    )
    data = info["format-specific"]["data"]
    encrypt = data.pop("encrypt")
    for field in ("uuid", "master-key-iters"):
        encrypt.pop(field)
    for slot in encrypt["slots"]:
        slot.pop("iters", None)
    for field in ("filename", "actual-size", "dirty-flag"):
        info.pop(field, None)
    return {"info": info, "encrypt": encrypt}


@pytest.mark.parametrize("extra", [(), ("-o", "cluster_size=4096,encrypt.hash-alg=sha512")])
def test_create_encrypted_like_qemu_img(tmp_path: Path, extra: tuple[str, ...]) -> None:
    """Same "Formatting" line; qemu-img unlocks our image with the passphrase, writes and
    reads it, and sees the LUKS layout it would have made."""
    q, o = tmp_path / "q", tmp_path / "o"
    q.mkdir()
    o.mkdir()
    theirs = create_luks(q / "img.qcow2", *extra)
    os.chdir(o)
    ours = run_cli(*luks_create_args("img.qcow2", *extra))
    _assert_same(
        Run(theirs.code, theirs.out.replace(str(q / "img.qcow2"), "img.qcow2"), theirs.err), ours
    )
    assert _luks_info(o / "img.qcow2") == _luks_info(q / "img.qcow2")
    _qemu_io(o / "img.qcow2", "write -P 0x5a 1M 64k", "read -P 0x5a 1M 64k")
    oracle.qemu_img(
        "check", "--object", SECRET, "--image-opts", OPTS.replace("img.qcow2", str(o / "img.qcow2"))
    )


@pytest.mark.parametrize(
    "options",
    [
        ("-o", "encrypt.format=luks"),
        ("-o", "encrypt.format=luks,encrypt.key-secret=nope"),
        ("--object", "secret,id=s", "-o", "encrypt.format=luks,encrypt.key-secret=s"),
        ("-o", "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=abc"),
    ],
    ids=["no-key-secret", "unknown-secret", "bad-object", "bad-iter-time"],
)
def test_create_errors_match_qemu_img(tmp_path: Path, options: tuple[str, ...]) -> None:
    os.chdir(tmp_path)
    theirs = run_qemu_img("create", "-f", "qcow2", *options, "q.qcow2", "1M")
    ours = run_cli("create", "-f", "qcow2", *options, "q.qcow2", "1M")
    _assert_same(theirs, ours)
    assert not (tmp_path / "q.qcow2").exists()


def test_convert_to_an_encrypted_image(luks_image: Path, tmp_path: Path) -> None:
    """convert -o encrypt.*: qemu-img decrypts our output to the source's content (the
    source being itself encrypted, through --image-opts) and finds it clean."""
    os.chdir(tmp_path)
    shutil.copyfile(luks_image, tmp_path / "img.qcow2")
    encrypt = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"
    ours = run_cli("convert", "-O", "qcow2", "-o", encrypt, *KEYED, "out.qcow2")
    assert (ours.code, ours.out, ours.err) == (0, "", "")
    out_opts = OPTS.replace("img.qcow2", "out.qcow2")
    oracle.qemu_img("compare", "--object", SECRET, "--image-opts", OPTS, out_opts)
    oracle.qemu_img("check", "--object", SECRET, "--image-opts", out_opts)
    info = json.loads(
        oracle.qemu_img(
            "info", "--output=json", "--object", SECRET, "--image-opts", out_opts
        ).stdout
    )
    assert info["encrypted"] is True


@pytest.mark.parametrize(
    "options",
    [
        ("-c", "-o", "encrypt.format=luks,encrypt.key-secret=sec0"),
        ("-o", "encrypt.format=luks,encrypt.key-secret=nope"),
        ("-o", "encrypt.format=luks"),
        ("-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=x"),
    ],
    ids=["compressed", "unknown-secret", "no-key-secret", "bad-iter-time"],
)
def test_convert_to_encrypted_errors_match_qemu_img(
    tmp_path: Path, options: tuple[str, ...]
) -> None:
    src = oracle.create(tmp_path / "src.qcow2", MiB)
    args = ("convert", "-O", "qcow2", "--object", SECRET, *options, str(src))
    theirs = run_qemu_img(*args, str(tmp_path / "q.qcow2"))
    ours = run_cli(*args, str(tmp_path / "o.qcow2"))
    assert theirs.code != 0
    _assert_same(theirs, Run(ours.code, ours.out, ours.err.replace("o.qcow2", "q.qcow2")))
