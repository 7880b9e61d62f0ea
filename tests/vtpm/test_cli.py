"""The ``vtpm-qcow`` command, run as a subprocess against real swtpm, tpm2-tools and qemu-img."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import need_fuse
from tests.qcow2 import oracle
from tests.vtpm.swtpm_fixtures import (
    NV_INDEX,
    need_swtpm,
    running_swtpm,
    tpm2_tool,
    tpm_client,
)
from vtpm_qcow.state import linear
from vtpm_qcow.state.store import Store
from vtpm_qcow.tpm.swtpm import Swtpm

NV = "0x1500030"
EK_CERT_RSA_INDEX = 0x01C00002


def vtpm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m vtpm_qcow ARGS``."""
    return subprocess.run(
        [sys.executable, "-m", "vtpm_qcow", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        check=False,
    )


def ok(*args: str) -> str:
    done = vtpm(*args)
    assert done.returncode == 0, f"vtpm-qcow {' '.join(args)}: {done.stderr}"
    assert "Traceback" not in done.stderr
    return done.stdout


def fails(*args: str, env: dict[str, str] | None = None, status: int | None = None) -> str:
    """Run a failing command; it must print exactly one line and no traceback."""
    done = vtpm(*args, env=env)
    assert done.returncode != 0 and (status is None or done.returncode == status)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def nv_write(swtpm: object, data: bytes, tmp: Path) -> None:
    source = tmp / "nv.bin"
    source.write_bytes(data)
    tpm2_tool(swtpm, "nvwrite", NV, "-C", NV, "-i", str(source))  # type: ignore[arg-type]


def nv_read(swtpm: object, tmp: Path) -> bytes:
    out = tmp / "nv-read.bin"
    tpm2_tool(swtpm, "nvread", NV, "-C", NV, "-s", "16", "-o", str(out))  # type: ignore[arg-type]
    return out.read_bytes()


def owner_auth_works(swtpm: object, password: str) -> bool:
    """tpm2_changeauth to the same password succeeds only with the right one."""
    try:
        tpm2_tool(swtpm, "changeauth", "-c", "o", "-p", password, password)  # type: ignore[arg-type]
    except AssertionError:
        return False
    return True


def test_setup_snapshot_apply_restores_nv_and_owner_auth(tmp_path: Path) -> None:
    need_swtpm()
    image = tmp_path / "vtpm.qcow2"
    ok("setup", "--create", str(image), "--create-ek-cert", "--create-platform-cert")
    oracle.assert_clean(image)
    info = json.loads(ok("info", "--json", str(image)))
    permall = info["sections"]["permall"]
    assert permall["size"] > 4096 and permall["blob"]["header"]["version"] == 2
    assert not permall["blob"]["encrypted"] and info["snapshots"] == []
    assert info["tpm_version"] == "2.0"

    state = tmp_path / "state"
    ok("export", str(image), f"{state}/")
    with running_swtpm(f"dir={state}", tmp_path / "run1") as swtpm:
        with tpm_client(swtpm) as tpm:
            assert EK_CERT_RSA_INDEX in tpm.nv_indices()  # --create-ek-cert went through
        tpm2_tool(
            swtpm,
            "nvdefine",
            NV,
            "-C",
            "o",
            "-s",
            "16",
            "-a",
            "ownerread|ownerwrite|authread|authwrite",
        )
        nv_write(swtpm, b"first contents!!", tmp_path)
        tpm2_tool(swtpm, "changeauth", "-c", "o", "first-owner")
    ok("import", str(image), str(state))
    ok("snapshot", "-c", "S1", str(image))

    ok("export", str(image), f"{state}/")
    with running_swtpm(f"dir={state}", tmp_path / "run2") as swtpm:
        assert nv_read(swtpm, tmp_path) == b"first contents!!"
        nv_write(swtpm, b"second contents!", tmp_path)
        tpm2_tool(swtpm, "changeauth", "-c", "o", "-p", "first-owner", "second-owner")
    ok("import", str(image), str(state))
    listed = ok("snapshot", "-l", str(image))
    assert "S1" in listed
    changed = json.loads(ok("info", "--json", str(image)))
    assert changed["state_digest"] != changed["snapshots"][0]["state_digest"]

    ok("snapshot", "-a", "S1", str(image))
    applied = json.loads(ok("info", "--json", str(image)))
    assert applied["state_digest"] == applied["snapshots"][0]["state_digest"]
    restored = tmp_path / "restored.lin"
    ok("export", str(image), str(restored))  # as a linear file this time
    with running_swtpm(f"backend-uri=file://{restored}", tmp_path / "run3") as swtpm:
        assert nv_read(swtpm, tmp_path) == b"first contents!!"
        assert owner_auth_works(swtpm, "first-owner")
        assert not owner_auth_works(swtpm, "second-owner")
    oracle.assert_clean(image)
    assert [s["name"] for s in oracle.snapshot_list(image)] == ["S1"]
    ok("snapshot", "-d", "S1", str(image))
    assert oracle.snapshot_list(image) == []
    assert "No snapshots" in ok("snapshot", "-l", str(image))


def test_import_export_round_trip_of_linear_files_and_dirs(tmp_path: Path) -> None:
    need_swtpm()
    source = tmp_path / "src.lin"
    subprocess.run(
        ["swtpm_setup", "--tpm2", "--tpmstate", f"file://{source}", "--overwrite"],
        check=True,
        capture_output=True,
    )
    image = tmp_path / "vtpm.qcow2"
    ok("create", str(image), "--size", "1M")
    assert oracle.info(image)["virtual-size"] == 1 << 20
    ok("import", str(image), str(source))
    out = tmp_path / "out.lin"
    ok("export", str(image), str(out))
    assert out.read_bytes() == source.read_bytes()
    as_dir = tmp_path / "as-dir"
    ok("export", "--dir", str(image), str(as_dir))
    assert (as_dir / "tpm2-00.permall").read_bytes() == linear.read_section(
        source.read_bytes(), "permall"
    )
    again = tmp_path / "again.qcow2"
    ok("create", str(again))
    ok("import", str(again), str(as_dir))
    with Store.open(again, writable=False) as store:
        assert store.read_section("permall") == linear.read_section(source.read_bytes(), "permall")
    text = ok("info", str(again))
    assert "permall" in text and "snapshots: 0" in text


def test_errors_are_one_line_with_non_zero_status(tmp_path: Path) -> None:
    image = tmp_path / "vtpm.qcow2"
    assert "required" in fails("snapshot", str(image), status=2)
    assert "invalid size" in fails("create", str(image), "--size", "lots", status=2)
    assert "unrecognized arguments" in fails("info", str(image), "--bogus", status=2)
    assert "no such file" in fails("info", str(tmp_path / "missing.qcow2"))
    garbage = tmp_path / "garbage.qcow2"
    garbage.write_bytes(os.urandom(4096))
    assert str(garbage) in fails("info", str(garbage))
    ok("create", str(image))
    assert "already exists" in fails("create", str(image))
    assert "no snapshot 'nope'" in fails("snapshot", "-a", "nope", str(image))
    ok("snapshot", "-c", "T", str(image))
    assert "already exists" in fails("snapshot", "-c", "T", str(image))
    ok("snapshot", "-c", "T", "--overwrite", str(image))
    not_state = tmp_path / "not-state.lin"
    not_state.write_bytes(b"\x01" * 300)
    assert "bad magic" in fails("import", str(image), str(not_state))
    assert "no tpm2-00.permall" in fails("import", str(image), str(tmp_path))
    assert "holds no TPM state" in fails("export", str(image), str(tmp_path / "x.lin"))
    empty_path = tmp_path / "empty-path"
    empty_path.mkdir()
    line = fails("setup", "--create", str(tmp_path / "new.qcow2"), env={"PATH": str(empty_path)})
    assert "swtpm_setup: not found on PATH" in line
    assert not (tmp_path / "new.qcow2").exists()
    oracle.assert_clean(image)


def test_snapshot_of_an_image_held_elsewhere_says_so(tmp_path: Path) -> None:
    image = tmp_path / "vtpm.qcow2"
    ok("create", str(image))
    with Store.open(image):  # this process holds the write lock; no daemon serves it
        line = fails("snapshot", "-c", "T", str(image))
        assert "locked by another process" in line and "no vtpm-qcow mount daemon" in line
        assert "snapshots: 0" in ok("info", str(image))  # info still reads it (shared)


def test_snapshots_of_a_mounted_image_go_through_the_daemon(tmp_path: Path) -> None:
    """While `vtpm-qcow mount` holds the image, `snapshot` talks to its control socket."""
    need_swtpm()
    need_fuse()
    image, mountpoint = tmp_path / "vtpm.qcow2", tmp_path / "mnt"
    mountpoint.mkdir()
    ok("setup", "--create", str(image))
    control = tmp_path / "control.sock"
    ok("mount", "--control", str(control), str(image), str(mountpoint))
    try:
        state_file = mountpoint / "tpmstate"
        created = vtpm("snapshot", "-c", "clean", "--control", str(control), str(image))
        assert created.returncode == 0 and "through the mount daemon" in created.stderr
        with (
            running_swtpm(f"backend-uri=file://{state_file}", tmp_path / "run1") as swtpm,
            tpm_client(swtpm) as tpm,
        ):
            tpm.nv_define_space(NV_INDEX, 8)
            tpm.nv_write(NV_INDEX, b"mounted!")
        applied = vtpm("snapshot", "-a", "clean", "--control", str(control), str(image))
        assert applied.returncode == 0 and "through the mount daemon" in applied.stderr
        with (
            running_swtpm(f"backend-uri=file://{state_file}", tmp_path / "run2") as swtpm,
            tpm_client(swtpm) as tpm,
        ):
            assert NV_INDEX not in tpm.nv_indices()
        assert "clean" in ok("snapshot", "-l", str(image))  # read shared, no daemon needed
        line = fails("snapshot", "-d", "clean", str(image))  # the daemon is not at the default
        assert "no vtpm-qcow mount daemon answers" in line
    finally:
        done = vtpm("umount", str(mountpoint))
        if done.returncode != 0:
            subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)
    assert [s["name"] for s in oracle.snapshot_list(image)] == ["clean"]
    oracle.assert_clean(image)


def test_setup_passes_options_through_and_info_shows_encryption(tmp_path: Path) -> None:
    need_swtpm()
    image, pwdfile = tmp_path / "vtpm.qcow2", tmp_path / "pwd"
    pwdfile.write_text("a passphrase")
    ok("setup", "--create", str(image), "--pwdfile", str(pwdfile))
    info = json.loads(ok("info", "--json", str(image)))
    blob = info["sections"]["permall"]["blob"]
    assert blob["encrypted"] and "encrypted" in blob["header"]["flag_names"]
    assert "encrypted-data" in [t["name"] for t in blob["tlvs"]]
    assert info["tpm_version"] is None  # libtpms' magic is inside the ciphertext
    assert "encrypted" in ok("info", str(image))
    assert "already holds TPM state" in fails("setup", str(image))
    ok("setup", str(image), "--overwrite")  # a plain TPM this time
    plain = json.loads(ok("info", "--json", str(image)))["sections"]["permall"]["blob"]
    assert not plain["encrypted"]


def test_info_reports_an_unreadable_layout_without_failing(tmp_path: Path) -> None:
    image = tmp_path / "vtpm.qcow2"
    ok("create", str(image))
    oracle.qemu_io(image, "write -P 0x55 12 12")  # slot 0: garbage offsets and lengths
    text = ok("info", str(image))
    assert "state: unreadable" in text and "slot 0" in text
    assert json.loads(ok("info", "--json", str(image)))["layout_error"].startswith(str(image))
    assert "slot 0" in fails("export", str(image), str(tmp_path / "out.lin"))
    need_swtpm()
    assert "already holds TPM state" in fails("setup", str(image))
    ok("setup", str(image), "--overwrite")  # replaces the damaged layout entirely
    repaired = json.loads(ok("info", "--json", str(image)))
    assert repaired["layout_error"] is None and list(repaired["sections"]) == ["permall"]
    disk = oracle.convert(image)
    end = linear.parse_header(disk).end
    assert disk[end:].count(0) == len(disk) - end
    oracle.assert_clean(image)


def test_tpm12_state_round_trips_with_tpm_names(tmp_path: Path) -> None:
    need_swtpm()
    image = tmp_path / "tpm12.qcow2"
    ok("setup", "--create", "--tpm12", str(image))
    info = json.loads(ok("info", "--json", str(image)))
    assert info["tpm_version"] == "1.2"
    state = tmp_path / "state"
    ok("export", str(image), f"{state}/")
    assert sorted(os.listdir(state)) == ["tpm-00.permall"]  # named for a TPM 1.2
    with Swtpm.start(f"dir={state}", tmp_path / "run", tpm2=False) as swtpm:
        swtpm.store_volatile()  # a TPM 1.2 swtpm loads and extends this state
    assert (state / "tpm-00.volatilestate").exists()
    ok("import", str(image), str(state))
    again = json.loads(ok("info", "--json", str(image)))
    assert set(again["sections"]) == {"permall", "volatilestate"}
    assert again["sections"]["permall"]["digest"] == info["sections"]["permall"]["digest"]


def test_setup_into_an_image_qemu_img_created(tmp_path: Path) -> None:
    """Any qcow2 works as a store: qemu-img's (64 KiB clusters, zeros) is set up in place."""
    need_swtpm()
    image = tmp_path / "tpmstate0.qcow2"
    oracle.create(image, 4 * 1024 * 1024)
    ok("setup", str(image), "--create-ek-cert")
    info = json.loads(ok("info", "--json", str(image)))
    assert info["cluster_size"] == 65536 and info["tpm_version"] == "2.0"
    oracle.assert_clean(image)
    layout = oracle.convert(image)
    header = linear.parse_header(layout)
    assert linear.read_section(layout, "permall") is not None
    assert layout[header.end :].count(0) == len(layout) - header.end
