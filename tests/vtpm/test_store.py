"""The vTPM Store (vtpm_qcow.state.store) against qemu-img/qemu-io, swtpm state and qsd."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from qcow2.errors import ImageLockedError
from qcow2.io.fileio import inject_fault
from tests.helpers import need
from tests.qcow2 import oracle
from tests.vtpm.mount_fixtures import qsd_fuse_export
from tests.vtpm.swtpm_fixtures import NV_INDEX, running_swtpm, setup_state, tpm_client
from vtpm_qcow.backup import plainstate
from vtpm_qcow.errors import StateFormatError, StoreError
from vtpm_qcow.state import linear
from vtpm_qcow.state.store import DEFAULT_CLUSTER_SIZE, DEFAULT_SIZE, Store, digest

MiB = 1024 * 1024


def raw(path: Path, snapshot: str | None = None) -> bytes:
    """The virtual disk as qemu-img reads it."""
    return oracle.convert(path, snapshot=snapshot)


def layout_end(data: bytes) -> int:
    return linear.parse_header(data).end if linear.is_formatted(data) else 0


def assert_disk_is(path: Path, layout: bytes, snapshot: str | None = None) -> None:
    """qemu-img sees exactly ``layout`` followed by zeros."""
    disk = raw(path, snapshot)
    assert disk[: len(layout)] == layout
    assert disk[len(layout) :].count(0) == len(disk) - len(layout)


def host_clusters_in_use(path: Path) -> int:
    """Host clusters with a non-zero refcount, read straight from the file.

    With ``qemu-img check`` clean (refcounts equal references) this is the number of
    clusters the image really uses.
    """
    data = path.read_bytes()
    (cluster_bits,) = struct.unpack_from(">I", data, 20)
    reftable_offset, reftable_clusters = struct.unpack_from(">QI", data, 48)
    (refcount_order,) = struct.unpack_from(">I", data, 96)
    cluster_size, bits = 1 << cluster_bits, 1 << refcount_order
    assert bits == 16, "the store creates images with 16-bit refcounts"
    in_use = 0
    for i in range(reftable_clusters * cluster_size // 8):
        (block,) = struct.unpack_from(">Q", data, reftable_offset + 8 * i)
        block &= ~0x1FF
        if block:
            counts = struct.unpack_from(f">{cluster_size // 2}H", data, block)
            in_use += sum(1 for count in counts if count)
    return in_use


@pytest.fixture(scope="module")
def tpm_states(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Two real swtpm linear files: A fresh from swtpm_setup, B after an NV define+write."""
    tmp = tmp_path_factory.mktemp("states")
    path = tmp / "a.lin"
    setup_state(f"file://{path}")
    state_a = plainstate.layout_from_file(path)
    with running_swtpm(f"backend-uri=file://{path}", tmp / "run") as swtpm:
        with tpm_client(swtpm) as tpm:
            tpm.nv_define_space(NV_INDEX, 16)
            tpm.nv_write(NV_INDEX, b"state B contents")
        swtpm.store_volatile()
    state_b = plainstate.layout_from_file(path)
    assert state_a != state_b
    return {"A": state_a, "B": state_b}


def test_create_gives_a_clean_image_holding_an_empty_layout(tmp_path: Path) -> None:
    path = tmp_path / "vtpm.qcow2"
    with Store.create(path) as store:
        assert store.linear_size == DEFAULT_SIZE and store.sections() == {}
    info = oracle.info(path)
    assert info["virtual-size"] == DEFAULT_SIZE and info["cluster-size"] == DEFAULT_CLUSTER_SIZE
    oracle.assert_clean(path)
    assert_disk_is(path, linear.empty_layout())
    with pytest.raises(StoreError, match="already exists"):
        Store.create(path)


def test_sections_round_trip_and_disk_matches_the_linear_model(tmp_path: Path) -> None:
    path = tmp_path / "vtpm.qcow2"
    model = linear.empty_layout()
    blobs = {"permall": b"P" * 1300, "volatilestate": b"V" * 9000, "savestate": b"S" * 100}
    with Store.create(path) as store:
        generation = store.generation
        for name, blob in [*blobs.items(), ("permall", b"Q" * 5000), ("volatilestate", None)]:
            if blob is None:
                store.delete_section(name)
                model = linear.apply_update(model, linear.delete_section(model, name))
            else:
                store.write_section(name, blob)
                model = linear.apply_update(model, linear.store_section(model, name, blob))
            assert store.generation > generation
            generation = store.generation
            assert store.layout() == model
        assert store.read_section("permall") == b"Q" * 5000
        assert store.read_section("volatilestate") is None
        assert store.sections()["savestate"].digest == digest(b"S" * 100)
        store.delete_section("volatilestate")  # absent: nothing to do
        assert store.generation == generation
    oracle.assert_clean(path)
    assert_disk_is(path, model)
    with Store.open(path, writable=False) as store:
        assert store.read_section("savestate") == b"S" * 100
        with pytest.raises(StoreError, match="read-only"):
            store.write_section("savestate", b"x")


def test_seed_scenario_snapshot_apply_delete(tmp_path: Path, tpm_states: dict[str, bytes]) -> None:
    """State A, snapshot S, state B, apply S -> A; deleting S frees its clusters."""
    path = tmp_path / "vtpm.qcow2"
    with Store.create(path) as store:
        store.replace_layout(tpm_states["A"])
        digests_a = {n: s.digest for n, s in store.sections().items()}
        store.create_snapshot("S")
        store.replace_layout(tpm_states["B"])
        assert store.layout() == tpm_states["B"]
        held = oracle.info(path, force_share=True)  # qemu-img -U while the store holds it
        assert [s["name"] for s in held["snapshots"]] == ["S"]
        (snap,) = store.snapshots()
        assert snap.tag == "S" and {n: s.digest for n, s in snap.sections.items()} == digests_a
        assert store.snapshot_section("S", "permall") == linear.read_section(
            tpm_states["A"], "permall"
        )
    oracle.assert_clean(path)
    assert_disk_is(path, tpm_states["A"], snapshot="S")
    assert_disk_is(path, tpm_states["B"])
    with Store.open(path) as store:
        store.apply_snapshot("S")
        assert store.layout() == tpm_states["A"]
        assert {n: s.digest for n, s in store.sections().items()} == digests_a
    assert_disk_is(path, tpm_states["A"])
    # Make S own clusters: change the state after applying, then delete S.
    with Store.open(path) as store:
        store.replace_layout(tpm_states["B"])
    oracle.assert_clean(path)
    before = host_clusters_in_use(path)
    with Store.open(path) as store:
        store.delete_snapshot("S")
        assert store.snapshots() == []
        with pytest.raises(StoreError, match="no snapshot 'S'"):
            store.apply_snapshot("S")
    assert oracle.assert_clean(path).get("leaks", 0) == 0
    assert host_clusters_in_use(path) < before
    assert oracle.snapshot_list(path) == []
    assert_disk_is(path, tpm_states["B"])


@pytest.mark.parametrize(("past", "now"), [("A", "B"), ("B", "A")])
def test_a_past_state_is_filed_under_a_tag_and_the_active_state_stays(
    tmp_path: Path, tpm_states: dict[str, bytes], past: str, now: str
) -> None:
    """create_snapshot(layout=) files another state under the tag (the watcher's state of
    a pause): the snapshot reads exactly that layout, the active state does not move."""
    path = tmp_path / "vtpm.qcow2"
    with Store.create(path) as store:
        store.replace_layout(tpm_states[now])
        store.create_snapshot("then", layout=tpm_states[past])
        assert store.layout() == tpm_states[now]
        store.create_snapshot("then", overwrite=True, layout=tpm_states[past])
        (snap,) = store.snapshots()
        assert snap.tag == "then"
        assert store.snapshot_section("then", "permall") == linear.read_section(
            tpm_states[past], "permall"
        )
        with pytest.raises(StateFormatError):
            store.create_snapshot("bad", layout=b"not a linear file")
    oracle.assert_clean(path)
    assert_disk_is(path, tpm_states[past], snapshot="then")
    assert_disk_is(path, tpm_states[now])
    with Store.open(path) as store:
        store.apply_snapshot("then")
        assert store.layout() == tpm_states[past]
    assert [s["name"] for s in oracle.snapshot_list(path)] == ["then"]


def test_snapshot_tags_agree_with_qemu_img(tmp_path: Path, tpm_states: dict[str, bytes]) -> None:
    path = tmp_path / "vtpm.qcow2"
    with Store.create(path) as store:
        store.replace_layout(tpm_states["A"])
        store.create_snapshot("one")
        store.create_snapshot("two")
        with pytest.raises(StoreError, match="snapshot 'one' already exists"):
            store.create_snapshot("one")
        store.replace_layout(tpm_states["B"])
        store.create_snapshot("one", overwrite=True)
        tags = [s.tag for s in store.snapshots()]
    listed = oracle.snapshot_list(path)
    assert sorted(s["name"] for s in listed) == sorted(tags) == ["one", "two"]
    assert_disk_is(path, tpm_states["B"], snapshot="one")
    assert_disk_is(path, tpm_states["A"], snapshot="two")
    oracle.assert_clean(path)
    # a snapshot qemu-img makes is one the store sees, with the same state
    oracle.snapshot(path, "create", "by-qemu-img")
    with Store.open(path) as store:
        by_qemu = {s.tag: s for s in store.snapshots()}["by-qemu-img"]
        assert {n: s.digest for n, s in by_qemu.sections.items()} == {
            n: s.digest for n, s in store.sections().items()
        }


def test_writable_store_holds_the_qemu_lock(tmp_path: Path) -> None:
    path = tmp_path / "vtpm.qcow2"
    with Store.create(path):
        done = subprocess.run(
            [need("qemu-img"), "info", str(path)], capture_output=True, text=True, check=False
        )
        assert done.returncode != 0 and "lock" in done.stderr
        with pytest.raises(ImageLockedError):
            Store.open(path)
    Store.open(path).close()  # released on close


def test_capacity_and_bad_input_leave_the_image_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "vtpm.qcow2"
    with Store.create(path, size=64 * 1024) as store:
        store.write_section("permall", b"p" * 1000)
        before = store.layout()
        with pytest.raises(StoreError, match="capacity"):
            store.write_section("volatilestate", b"v" * 70000)
        with pytest.raises(StoreError, match="capacity"):
            store.commit_linear([(64 * 1024 - 10, b"x" * 11)])
        with pytest.raises(StoreError, match="unknown TPM state section"):
            store.write_section("nvram", b"x")
        with pytest.raises(StoreError, match="capacity"):
            store.resize_linear(64 * 1024 + 1)
        assert store.layout() == before
    oracle.assert_clean(path)
    with pytest.raises(StoreError, match="no such file"):
        Store.open(tmp_path / "missing.qcow2")
    with pytest.raises(StoreError, match="size"):
        Store.create(tmp_path / "tiny.qcow2", size=100)


def test_resize_linear_zeroes_the_tail_and_keeps_the_capacity(tmp_path: Path) -> None:
    path = tmp_path / "vtpm.qcow2"
    with Store.create(path) as store:
        store.commit_linear([(0, b"a" * 5000), (MiB, b"b" * 100)])
        store.resize_linear(3000)
        assert store.linear_size == DEFAULT_SIZE
        assert store.read_linear(0, 5000) == b"a" * 3000 + bytes(2000)
        assert store.read_linear(MiB, 100) == bytes(100)
        assert store.read_linear(DEFAULT_SIZE - 10, 100) == bytes(10)  # short at the end
    disk = raw(path)
    assert disk[:3000] == b"a" * 3000 and disk[3000:].count(0) == len(disk) - 3000


def test_corrupt_layout_is_a_typed_error_naming_the_image(tmp_path: Path) -> None:
    path = tmp_path / "vtpm.qcow2"
    with Store.create(path) as store:
        store.write_section("permall", b"p" * 100)
    bad = bytearray(linear.empty_layout())
    bad[12:24] = struct.pack("<III", 192, 20, 16)  # slot 0: more data than section
    header_file = tmp_path / "header.bin"
    header_file.write_bytes(bytes(bad))
    oracle.qemu_io(path, f"write -s {header_file} 0 192")  # the disk is the linear file
    with Store.open(path) as store:
        with pytest.raises(StateFormatError, match="slot 0 data_length 20 > section") as info:
            store.read_section("permall")
        assert str(info.value).startswith(f"{path}: ")
        store.clear()
        assert store.read_section("permall") is None and store.sections() == {}
    oracle.assert_clean(path)
    assert raw(path).count(0) == DEFAULT_SIZE


# Section: interoperability with qemu-storage-daemon's FUSE export (the Proxmox VE stack)


def test_store_image_works_under_qemu_storage_daemon_and_back(
    tmp_path: Path, tpm_states: dict[str, bytes]
) -> None:
    path = tmp_path / "vtpm.qcow2"
    with Store.create(path) as store:
        store.replace_layout(tpm_states["B"])  # B holds NV_INDEX = "state B contents"
        store.create_snapshot("before-qsd")
    payload = b"written via QSD!"
    with qsd_fuse_export(path, tmp_path / "tpmstate.raw") as exported:
        assert os.path.getsize(exported) == DEFAULT_SIZE
        with (
            running_swtpm(f"backend-uri=file://{exported}", tmp_path / "run") as swtpm,
            tpm_client(swtpm) as tpm,
        ):
            assert tpm.nv_read(NV_INDEX, 16) == b"state B contents"
            tpm.nv_write(NV_INDEX, payload)
    oracle.assert_clean(path)
    with Store.open(path) as store:
        linear.parse_header(store.layout())
        exported_dir = tmp_path / "exported"
        plainstate.export_state(store, exported_dir, as_dir=True)
        assert [s.tag for s in store.snapshots()] == ["before-qsd"]
    with running_swtpm(f"dir={exported_dir}", tmp_path / "run2") as swtpm, tpm_client(swtpm) as tpm:
        assert tpm.nv_read(NV_INDEX, 16) == payload


def test_oversized_layouts_are_refused_not_read(tmp_path: Path) -> None:
    """A header claiming a 64 MiB section is an error, not a 64 MiB read."""
    path = tmp_path / "vtpm.qcow2"
    with pytest.raises(StoreError, match="4 GiB"):
        Store.create(tmp_path / "huge.qcow2", size=8 << 30)
    with Store.create(path, size=128 * MiB) as store:
        header = bytearray(linear.empty_layout())
        header[12:24] = struct.pack("<III", 192, 1, 64 * MiB)
        store.commit_linear([(0, bytes(header))])
        with pytest.raises(StateFormatError, match="beyond the 64 MiB"):
            store.read_section("permall")
        with pytest.raises(StateFormatError, match="beyond the 64 MiB"):
            store.layout()
        store.clear()  # the unreadable layout is replaced by zeros
        assert store.sections() == {}
    oracle.assert_clean(path)


def test_a_writable_store_commits_sections_without_reading_the_image_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writable store keeps the linear file's clusters it read or committed in qcow2's
    data cache (dir view commits read the layout and the clusters around their writes):
    no guest data is read from the image file again, and the kept bytes follow every
    commit, snapshot apply and resize."""
    path = tmp_path / "vtpm.qcow2"
    blob_a, blob_b, blob_c = b"A" * 3000, b"B" * 5000, b"C" * 1500
    with Store.create(path) as store:
        store.write_section("permall", blob_a)
        store.write_section("volatilestate", blob_b)
        store.create_snapshot("s1")
        assert store.read_section("permall") == blob_a  # one read of the start: kept
        reads: list[tuple[int, int]] = []
        uncached_read = store.image._read  # what the data cache fills itself with

        def counted(offset: int, length: int) -> bytes:
            reads.append((offset, length))
            return bytes(uncached_read(offset, length))

        monkeypatch.setattr(store.image, "_read", counted)
        store.write_section("permall", blob_c)
        store.write_section("permall", blob_a + b"x")
        assert store.read_section("permall") == blob_a + b"x"
        assert store.read_section("volatilestate") == blob_b
        assert reads == []
        expected = store.layout()
        store.apply_snapshot("s1")  # changes the disk behind the commit path: re-read
        assert store.read_section("permall") == blob_a
        assert reads
        store.write_section("permall", blob_c)
        store.resize_linear(192)  # zeroes everything after the header (which stays)
        assert store.read_section("permall") == bytes(len(blob_c))
        assert store.read_linear(192, 16) == bytes(16)
        store.write_section("permall", blob_b)
        expected = store.layout()
    assert_disk_is(path, expected)
    with Store.open(path) as store:
        assert store.read_section("permall") == blob_b


def test_a_failed_commit_forgets_the_kept_bytes(tmp_path: Path) -> None:
    path = tmp_path / "vtpm.qcow2"
    with Store.create(path) as store:
        store.write_section("permall", b"old" * 500)
        with inject_fault("commit.flush"), pytest.raises(OSError):
            store.write_section("permall", b"new" * 500)
        assert store.read_section("permall") == b"old" * 500
        store.write_section("permall", b"new" * 600)
        assert store.read_section("permall") == b"new" * 600
    with Store.open(path) as store:
        assert store.read_section("permall") == b"new" * 600
