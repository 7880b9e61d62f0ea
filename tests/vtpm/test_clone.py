"""``vtpm-qcow clone`` (issue 15): independent copies of a vTPM image, also while a real swtpm
runs on it through the mount daemon; ``--new-identity`` re-manufactures the TPM.

Oracles: ``qemu-img convert -U`` + the linear codec for every state (current and each
snapshot), ``qemu-img check`` and ``snapshot -l`` for the copy, a real swtpm reading NV back
and tpm2-tools' ``tpm2_createek`` for the EK public key.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import xxhash

from tests.qcow2 import oracle
from tests.vtpm.mount_fixtures import (
    NV_INDEX,
    mounted,
    one_line_failure,
    qemu_img_check,
    qemu_img_snapshots,
    runtime_dir,  # noqa: F401  (fixture)
    vtpm_qcow,
)
from tests.vtpm.swtpm_fixtures import need_swtpm, running_swtpm, tpm2_tool, tpm_client
from vtpm_qcow.state import linear
from vtpm_qcow.state.store import Store

pytestmark = pytest.mark.usefixtures("runtime_dir")

#: The EK certificate's NV index (RSA 2048), written by swtpm_setup --create-ek-cert.
EK_CERT_INDEX = 0x01C00002


def states(image: Path) -> dict[str | None, dict[str, str]]:
    """Section digests of the current state (key None) and of each snapshot, per qemu-img."""
    out: dict[str | None, dict[str, str]] = {}
    for tag in [None, *qemu_img_snapshots(image)]:
        raw = oracle.convert(image, snapshot=tag, force_share=True)
        out[tag] = {
            name: xxhash.xxh3_128_hexdigest(blob)
            for name in linear.SECTION_NAMES
            if (blob := linear.read_section(raw, name, source=str(image))) is not None
        }
    return out


def nv_counter(image: Path, workdir: Path) -> int:
    """The NV counter a real swtpm reads from ``image``'s current state (exported)."""
    lin = workdir / "state.lin"
    workdir.mkdir()
    vtpm_qcow("export", str(image), str(lin))
    with (
        running_swtpm(f"backend-uri=file://{lin}", workdir / "swtpm") as swtpm,
        tpm_client(swtpm) as tpm,
    ):
        value: int = struct.unpack(">Q", tpm.nv_read(NV_INDEX, 8))[0]
        return value


def test_clone_of_a_served_image_is_an_independent_copy(tmp_path: Path) -> None:
    need_swtpm()
    src = tmp_path / "src.qcow2"
    vtpm_qcow("setup", "--create", str(src))
    dst, flat = tmp_path / "dst.qcow2", tmp_path / "flat.qcow2"
    with (
        mounted(src, tmp_path / "mnt") as mount,
        running_swtpm(mount.tpmstate, tmp_path / "swtpm") as swtpm,
        tpm_client(swtpm) as tpm,
    ):
        tpm.nv_define_space(NV_INDEX, 8)
        for value, tag in ((1, "S1"), (2, "S2"), (3, None)):
            tpm.nv_write(NV_INDEX, struct.pack(">Q", value))
            if tag:
                vtpm_qcow("snapshot", "-c", tag, str(src))  # through the daemon
        # swtpm runs on SRC and the daemon holds it: read through the daemon's capture.
        vtpm_qcow("clone", str(src), str(dst))
        vtpm_qcow("clone", "--flatten", str(src), str(flat))
        served = states(src)
        # DST is never overwritten, even by a clone of the same source.
        before = dst.read_bytes()
        assert "already exists" in one_line_failure("clone", str(src), str(dst))
        assert dst.read_bytes() == before
    assert states(src) == served  # the clone changed nothing on the source
    assert qemu_img_snapshots(dst) == ["S1", "S2"]
    assert states(dst) == served
    assert qemu_img_snapshots(flat) == [] and states(flat) == {None: served[None]}
    for image in (dst, flat):
        qemu_img_check(image)
    # Independent: changing one leaves the other as it was.
    vtpm_qcow("snapshot", "-a", "S1", str(dst))
    vtpm_qcow("snapshot", "-d", "S2", str(src))
    assert nv_counter(dst, tmp_path / "dst-now") == 1
    assert nv_counter(src, tmp_path / "src-now") == 3
    assert qemu_img_snapshots(dst) == ["S1", "S2"] and qemu_img_snapshots(src) == ["S1"]
    assert states(dst)["S2"] == served["S2"]
    # Refusals: one line, nothing written.
    assert "no such file" in one_line_failure("clone", str(tmp_path / "nope"), str(tmp_path / "x"))
    assert "--new-identity" in one_line_failure(
        "clone", str(src), str(tmp_path / "y"), "--create-ek-cert"
    )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def ek_public(image: Path, workdir: Path) -> tuple[bytes, bytes]:
    """(EK public key as tpm2_createek derives it, the EK certificate from NV)."""
    lin = workdir / "state.lin"
    workdir.mkdir()
    vtpm_qcow("export", str(image), str(lin))
    with running_swtpm(f"backend-uri=file://{lin}", workdir / "swtpm") as swtpm:
        pub = workdir / "ek.pub"
        tpm2_tool(swtpm, "createek", "-c", str(workdir / "ek.ctx"), "-G", "rsa", "-u", str(pub))
        cert = workdir / "ek.crt"
        tpm2_tool(swtpm, "nvread", "-C", "o", "-o", str(cert), hex(EK_CERT_INDEX))
        return pub.read_bytes(), cert.read_bytes()


def test_clone_new_identity_gets_a_new_ek_and_no_snapshots(tmp_path: Path) -> None:
    need_swtpm()
    src = tmp_path / "template.qcow2"
    vtpm_qcow("setup", "--create", str(src), "--create-ek-cert", "--create-platform-cert")
    vtpm_qcow("snapshot", "-c", "golden", str(src))
    dst = tmp_path / "vm3.qcow2"
    done = vtpm_qcow("clone", "--new-identity", str(src), str(dst))
    assert "NEW TPM identity" in done.stderr and "sealed" in done.stderr.lower()
    assert "snapshots" in done.stderr
    assert qemu_img_snapshots(dst) == []  # snapshots hold the old identity: not copied
    qemu_img_check(dst)
    old_ek, old_cert = ek_public(src, tmp_path / "old")
    new_ek, new_cert = ek_public(dst, tmp_path / "new")
    assert old_ek != new_ek  # a different endorsement key...
    modulus = new_ek[-256:]  # (TPM2B_PUBLIC of an RSA 2048 key: the modulus ends it)
    assert modulus in new_cert and modulus not in old_cert  # ...with its own certificate
    assert old_ek[-256:] in old_cert
    # A plain clone keeps the identity.
    same = tmp_path / "same.qcow2"
    vtpm_qcow("clone", str(src), str(same))
    assert ek_public(same, tmp_path / "same")[0] == old_ek
    assert "--flatten" in one_line_failure(
        "clone", "--new-identity", "--flatten", str(src), str(tmp_path / "z.qcow2")
    )


def test_clone_of_an_encrypted_image_stays_encrypted(tmp_path: Path) -> None:
    from tests.vtpm.test_secret import private_file

    need_swtpm()
    key = private_file(tmp_path / "vtpm.key")
    src = tmp_path / "src.qcow2"
    vtpm_qcow("setup", "--create", "--encrypt", "--iter-time", "10", "--secret-file", str(key),
              str(src))  # fmt: skip
    vtpm_qcow("snapshot", "-c", "S1", "--secret-file", str(key), str(src))
    # Without the secret: refused (a plain copy of the TPM's secrets would leak them).
    assert "LUKS-encrypted" in one_line_failure("clone", str(src), str(tmp_path / "plain.qcow2"))
    assert not (tmp_path / "plain.qcow2").exists()
    dst = tmp_path / "dst.qcow2"
    vtpm_qcow("clone", "--secret-file", str(key), str(src), str(dst))
    with Store.open(dst, writable=False, key=key.read_bytes()) as copy:
        assert copy.encrypted and copy.snapshot_tags() == ["S1"]
        with Store.open(src, writable=False, key=key.read_bytes()) as original:
            assert copy.layout() == original.layout()
            assert copy.snapshot_section("S1", "permall") == original.snapshot_section(
                "S1", "permall"
            )
