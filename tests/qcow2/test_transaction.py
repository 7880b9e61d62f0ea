"""Metadata transactions (qcow2/transaction.py): snapshot create/apply/delete are crash-clean.

The standard: a crash at any moment of a snapshot operation leaves an image that
``qemu-img check`` calls clean (exit 0: not even a leak) and whose active content and every
snapshot's content (read by ``qemu-img convert [-l]`` and by our reader) are exactly the
state before or after the operation.  Checked by replaying every prefix of the recorded
write log (plus the reordered and torn variants of ``test_crash.crash_variants``) over
images with several snapshots, shared, exclusive, zero and compressed clusters, v2 and v3,
cluster sizes 512 and 4096 (refblocks are copied and added, the reftable grows), extended
L2, and refcount widths 2, 4, 16 and 64.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcow2
from qcow2.errors import Qcow2Error, SnapshotError
from qcow2.format import layout
from qcow2.io.fileio import WriteEvent
from tests.qcow2 import oracle
from tests.qcow2.test_crash import (
    Operation,
    State,
    read_state,
    run_recorded,
    verify_all_prefixes,
)

KiB = 1024
MiB = 1024 * KiB


def snapshot_names(path: Path) -> list[str]:
    return [s["name"] for s in oracle.snapshot_list(path)]


def expected_states(base: Path, tmp_path: Path, ops: list[Operation]) -> list[State]:
    """The state before and after each operation, computed on a scratch copy (one open per
    operation, read back through qemu-img)."""
    scratch = tmp_path / "scratch.qcow2"
    shutil.copyfile(base, scratch)
    states = [read_state(scratch, snapshot_names(scratch))]
    for op in ops:
        with qcow2.open(str(scratch), writable=True) as image:
            op(image)
        oracle.assert_clean(scratch)
        states.append(read_state(scratch, snapshot_names(scratch)))
    return states


def crash_check(tmp_path: Path, img: Path, ops: list[Operation]) -> int:
    """Record ``ops`` on ``img`` and verify every crash prefix: exit 0 and old-or-new state."""
    base = img.read_bytes()
    states = expected_states(img, tmp_path, ops)
    events, ends = run_recorded(img, ops)
    oracle.assert_clean(img)
    assert read_state(img, snapshot_names(img)) == states[-1]
    checked = verify_all_prefixes(tmp_path, base, events, ends, states)
    assert checked > len(events)
    return checked


def scenario_image(tmp_path: Path, **opts: object) -> Path:
    """Snapshot "a" (made by qemu) shares clusters with the active state, which also has
    exclusive clusters, compressed clusters (several per host cluster, each counting as a
    reference to it) and zero clusters.  With refcount_bits=2 (at most 3 references) only
    one compressed cluster, alone in its host cluster."""
    img = oracle.create(tmp_path / "a.qcow2", 256 * KiB, **opts)
    many = opts.get("refcount_bits") != 2
    compressed = "write -c -P 0x42 64k 16k" if many else "write -c -P 0x42 64k 4k"
    oracle.qemu_io(img, "write -P 0x41 0 24k", compressed, "write -z 96k 4k")
    oracle.snapshot(img, "create", "a")
    oracle.qemu_io(img, "write -P 0x43 8k 8k", "write -P 0x44 128k 16k")
    if many:
        oracle.qemu_io(img, "write -c -P 0x45 192k 16k")
    return img


SCENARIO_OPS: list[Operation] = [
    lambda image: image.create_snapshot("b"),
    lambda image: image.apply_snapshot("a"),
    lambda image: image.delete_snapshot("a"),
    lambda image: image.delete_snapshot("b"),
]


@pytest.mark.parametrize(
    "opts",
    [
        {"compat": "1.1", "cluster_size": 4096, "refcount_bits": 2},
        {"compat": "1.1", "cluster_size": 4096, "refcount_bits": 4},
        {"compat": "1.1", "cluster_size": 512, "refcount_bits": 16},
        {"compat": "0.10", "cluster_size": 512},
        {"compat": "1.1", "cluster_size": 512, "refcount_bits": 64},
        {"compat": "1.1", "cluster_size": 16384, "extended_l2": True},
    ],
    ids=["v3-4k-r2", "v3-4k-r4", "v3-512-r16", "v2-512", "v3-512-r64", "v3-16k-extl2"],
)
def test_snapshot_ops_clean_at_every_crash_point(tmp_path: Path, opts: dict[str, object]) -> None:
    img = scenario_image(tmp_path, **opts)
    crash_check(tmp_path, img, SCENARIO_OPS)


def reftable_clusters(path: Path) -> int:
    raw = path.read_bytes()[:72]
    name = "refcount_table_clusters"
    return int(layout.field_struct(name).unpack_from(raw, layout.field_offset(name))[0])


def test_reftable_grows_inside_the_transaction(tmp_path: Path) -> None:
    """512-byte clusters and 64-bit refcounts: one reftable cluster covers 2 MiB of file.
    The create (L1 copy, every active L2 copied to clear COPIED, copied refblocks) crosses
    that line, so the new generation carries a bigger reftable, switched in by the same
    header write."""
    img = oracle.create(tmp_path / "a.qcow2", 4 * MiB, cluster_size=512, refcount_bits=64)
    oracle.qemu_io(img, "write -P 0x51 0 1930k", "write -c -P 0x52 3m 2k")
    assert reftable_clusters(img) == 1
    ops: list[Operation] = [lambda image: image.create_snapshot("b")]
    crash_check(tmp_path, img, ops)
    assert reftable_clusters(img) > 1


def test_qemu_uses_what_the_transactions_made(tmp_path: Path) -> None:
    """Differential: after each of our operations qemu-img lists, reads, applies and
    deletes the snapshots and keeps finding the image clean."""
    img = scenario_image(tmp_path, cluster_size=4096)
    with qcow2.open(str(img), writable=True) as image:
        image.create_snapshot("b")
        ours_b = image.read(0, image.virtual_size)
        image.write(4 * KiB, b"\x61" * 9000)  # after create: COW of shared data only
        assert image.snapshot("b").read(0, image.virtual_size) == ours_b
        image.apply_snapshot("a")
        ours_a = image.read(0, image.virtual_size)
        image.write(100 * KiB, b"\x62" * 3000)
        image.create_snapshot("c")
        ours_c = image.read(0, image.virtual_size)
    oracle.assert_clean(img)
    assert snapshot_names(img) == ["a", "b", "c"]
    assert oracle.convert(img, snapshot="b") == ours_b
    assert oracle.convert(img, snapshot="a") == ours_a
    assert oracle.convert(img, snapshot="c") == ours_c
    for name, content in (("b", ours_b), ("c", ours_c), ("a", ours_a)):
        oracle.snapshot(img, "apply", name)
        oracle.assert_clean(img)
        assert oracle.convert(img) == content
    for name in ("b", "a", "c"):
        oracle.snapshot(img, "delete", name)
        oracle.assert_clean(img)
    assert oracle.convert(img) == ours_a


def test_snapshot_of_a_resized_image_applies_size_and_content(tmp_path: Path) -> None:
    """apply switches disk size and tables in one write, both directions."""
    img = scenario_image(tmp_path, cluster_size=4096)
    with qcow2.open(str(img), writable=True) as image:
        small = image.read(0, image.virtual_size)
        image.create_snapshot("small")
        image.resize(1 * MiB)
        image.write(900 * KiB, b"\x71" * 5000)
        big = image.read(0, image.virtual_size)
        image.create_snapshot("big")
    ops: list[Operation] = [
        lambda image: image.apply_snapshot("small"),
        lambda image: image.apply_snapshot("big"),
    ]
    crash_check(tmp_path, img, ops)
    with qcow2.open(str(img)) as image:
        assert image.virtual_size == 1 * MiB and image.read(0, MiB) == big
    assert oracle.info(img)["virtual-size"] == 1 * MiB
    oracle.snapshot(img, "apply", "small")
    assert oracle.convert(img) == small


def test_overflow_is_refused_before_any_write(tmp_path: Path) -> None:
    """refcount_bits=2: the third reference to a cluster would need refcount 4."""
    img = oracle.create(tmp_path / "a.qcow2", 1 * MiB, refcount_bits=2, cluster_size=4096)
    oracle.qemu_io(img, "write -P 0x5 0 64k")
    with qcow2.open(str(img), writable=True) as image:
        image.create_snapshot("s0")
        image.create_snapshot("s1")
        image.flush()
        before = img.read_bytes()
        with pytest.raises(SnapshotError, match="would exceed 3"):
            image.create_snapshot("s2")
        assert img.read_bytes() == before
        assert [e.name for e in image.snapshots] == ["s0", "s1"]
        image.delete_snapshot("s0")  # still usable
        image.create_snapshot("s2")
    oracle.assert_clean(img)
    assert snapshot_names(img) == ["s1", "s2"]


def test_lazy_refcounts_dirty_image(tmp_path: Path) -> None:
    """With lazy refcounts the dirty bit is set by the first write; the transaction flushes
    the cached refcounts first, so the new generation is exact."""
    img = oracle.create(tmp_path / "a.qcow2", 1 * MiB, lazy_refcounts=True, cluster_size=4096)
    oracle.qemu_io(img, "write -P 0x7 0 64k")
    with qcow2.open(str(img), writable=True) as image:
        image.write(128 * KiB, b"\x08" * 8192)  # a new cluster: metadata changes
        assert image.header.dirty
        image.create_snapshot("s")
        image.write(0, b"\x09" * 100)
        image.delete_snapshot("s")
    oracle.assert_clean(img)
    expected = bytearray(b"\x07" * 64 * KiB)
    expected[:100] = b"\x09" * 100
    content = oracle.convert(img)
    assert content[: 64 * KiB] == expected and content[128 * KiB : 136 * KiB] == b"\x08" * 8192


@pytest.mark.parametrize(
    "opts",
    [
        {"compat": "1.1", "cluster_size": 512, "refcount_bits": 64},
        {"compat": "0.10", "cluster_size": 512},
    ],
    ids=["v3-512-r64", "v2-512"],
)
def test_commit_clean_at_every_crash_point(tmp_path: Path, opts: dict[str, object]) -> None:
    """commit_atomically over shared, compressed and zero clusters: also a transaction."""
    img = scenario_image(tmp_path, **opts)

    def committer(writes: list[tuple[int, bytes]]) -> Operation:
        return lambda image: image.commit_atomically(writes)

    ops = [
        committer([(0, b"\xe1" * 5000), (66 * KiB, b"\xe2" * 9000), (97 * KiB, b"\xe3")]),
        committer([(255 * KiB, b"\xe4" * 1024), (8 * KiB, b"\xe5" * 100)]),
    ]
    crash_check(tmp_path, img, ops)


@pytest.mark.parametrize("op", ["create", "apply", "delete", "commit"])
def test_failed_write_of_the_new_generation(tmp_path: Path, op: str) -> None:
    """An I/O error while the new generation is written (before the switch): memory and
    file keep the old generation, clean, and the image stays usable."""
    img = scenario_image(tmp_path, cluster_size=4096)
    before = read_state(img, snapshot_names(img))
    writes = {"n": 0}

    def fail(event: WriteEvent) -> None:
        if event.kind == "write":
            writes["n"] += 1
            raise OSError(5, "injected write failure")

    with qcow2.open(str(img), writable=True) as image:
        action: dict[str, Callable[[], object]] = {
            "create": lambda: image.create_snapshot("t"),
            "apply": lambda: image.apply_snapshot("a"),
            "delete": lambda: image.delete_snapshot("a"),
            "commit": lambda: image.commit_atomically([(0, b"\xf0" * 10000)]),
        }
        image.file.observers.append(fail)
        with pytest.raises((Qcow2Error, OSError)):
            action[op]()
        image.file.observers.remove(fail)
        assert writes["n"] == 1
        assert [e.name for e in image.snapshots] == list(before.snapshots)
        assert image.read(0, len(before.content)) == before.content
        action[op]()  # the same operation now succeeds
    oracle.assert_clean(img)


_op = st.tuples(
    st.sampled_from(["write", "commit", "create", "apply", "delete"]),
    st.integers(0, 255 * KiB),
    st.integers(1, 20 * KiB),
    st.integers(0, 255),
)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    opts=st.sampled_from(
        [
            {"compat": "1.1", "cluster_size": 4096},
            {"compat": "0.10", "cluster_size": 512},
            {"compat": "1.1", "cluster_size": 512, "refcount_bits": 64},
        ]
    ),
    ops=st.lists(_op, min_size=1, max_size=8),
)
def test_random_snapshot_sequences_stay_clean(
    opts: dict[str, object], ops: list[tuple[str, int, int, int]]
) -> None:
    """Random writes, commits and snapshot operations against a model of the content and
    of every snapshot; ``qemu-img check`` exit 0 after every step."""
    size = 256 * KiB
    with tempfile.TemporaryDirectory() as tmp:
        img = oracle.create(Path(tmp) / "p.qcow2", size, **opts)
        model = bytearray(size)
        snaps: dict[str, bytes] = {}
        with qcow2.open(str(img), writable=True) as image:
            for step, (kind, offset, length, byte) in enumerate(ops):
                length = min(length, size - offset)
                names = list(snaps)
                if kind in ("write", "commit"):
                    data = bytes([byte]) * length
                    if kind == "write":
                        image.write(offset, data)
                    else:
                        image.commit_atomically([(offset, data)])
                    model[offset : offset + length] = data
                elif kind == "create":
                    image.create_snapshot(f"s{step}")
                    snaps[f"s{step}"] = bytes(model)
                elif names and kind == "apply":
                    model[:] = snaps[names[byte % len(names)]]
                    image.apply_snapshot(names[byte % len(names)])
                elif names:
                    image.delete_snapshot(names[byte % len(names)])
                    del snaps[names[byte % len(names)]]
                image.flush()
                result = oracle.check(img, force_share=True)
                assert result["exit-code"] == oracle.CHECK_CLEAN, result["stderr"]
                assert image.read(0, size) == model
                for name, content in snaps.items():
                    assert image.snapshot(name).read(0, size) == content
        assert oracle.convert(img) == model
        for name, content in snaps.items():
            assert oracle.convert(img, snapshot=name) == content


def test_live_metadata_with_refcount_0_is_never_overwritten(tmp_path: Path) -> None:
    """A corrupt image whose active L1 cluster has refcount 0: the transaction would pick
    it as free, and the metadata overlap check refuses before anything is written."""
    img = oracle.create(tmp_path / "a.qcow2", 1 * MiB, cluster_size=4096)
    oracle.qemu_io(img, "write -P 0x3 0 8k")
    raw = bytearray(img.read_bytes())

    def field(name: str) -> int:
        return int(layout.field_struct(name).unpack_from(raw, layout.field_offset(name))[0])

    l1_cluster = field("l1_table_offset") // 4096
    refblock = int.from_bytes(raw[field("refcount_table_offset") :][:8], "big")
    raw[refblock + 2 * l1_cluster : refblock + 2 * l1_cluster + 2] = bytes(2)  # 16-bit entry
    img.write_bytes(bytes(raw))
    with qcow2.open(str(img), writable=True) as image:
        with pytest.raises(Qcow2Error, match="overlaps with active L1 table"):
            image.create_snapshot("s")
        # nothing written but the corrupt bit (QEMU marks the image)
        raw[layout.field_offset("incompatible_features") + 7] |= layout.INCOMPAT_CORRUPT
        assert img.read_bytes() == bytes(raw)
    assert oracle.convert(img)[: 8 * KiB] == b"\x03" * 8 * KiB
