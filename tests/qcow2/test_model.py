"""Property test: random operation sequences against an in-memory model of the disk.

Each example starts from a fresh image made by qemu-img, runs a random sequence of writes,
zero writes, discards, atomic commits, grows, shrinks and snapshot create/apply/delete through our
``Image``, and then requires ``qemu-img check`` to call the image clean and every snapshot
(read by qemu-img convert -l and by our views) and the active disk to equal the model.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import qcow2
from tests.qcow2 import oracle

KiB = 1024
CLUSTER = 4096
START_SIZE = 256 * KiB
MAX_SIZE = 512 * KiB


@dataclass
class ModelSnapshot:
    id: str
    name: str
    content: bytes


class QcowModel(RuleBasedStateMachine):
    """The model: ``disk`` (bytes of the active state) and an ordered snapshot list."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(prefix="qcow2-model-")
        self.path = Path(self.tmp.name) / "m.qcow2"
        self.image: qcow2.Image | None = None
        self.disk = bytearray()
        self.snaps: list[ModelSnapshot] = []

    @initialize(
        compat=st.sampled_from(["0.10", "1.1"]),
        refcount_bits=st.sampled_from([8, 16, 64]),
        refill=st.booleans(),
    )
    def start(self, compat: str, refcount_bits: int, refill: bool) -> None:
        if compat == "0.10":
            refcount_bits = 16  # v2 has no refcount_order
        oracle.create(
            self.path, START_SIZE, compat=compat, cluster_size=CLUSTER, refcount_bits=refcount_bits
        )
        if refill:
            oracle.qemu_io(self.path, "write -P 0x5a 0 20k", "write -P 0x5b 100k 12k")
        self.disk = bytearray(oracle.convert(self.path))
        self.image = qcow2.open(str(self.path), writable=True)

    def _img(self) -> qcow2.Image:
        assert self.image is not None
        return self.image

    def _range(self, data: st.DataObject, max_len: int = 3 * CLUSTER) -> tuple[int, int]:
        size = len(self.disk)
        offset = data.draw(st.integers(0, size - 1), label="offset")
        length = data.draw(st.integers(1, min(max_len, size - offset)), label="length")
        return offset, length

    @rule(data=st.data(), fill=st.integers(1, 255))
    def write(self, data: st.DataObject, fill: int) -> None:
        offset, length = self._range(data)
        payload = bytes([fill]) * length
        self._img().write(offset, payload)
        self.disk[offset : offset + length] = payload

    @rule(data=st.data())
    def write_zeroes(self, data: st.DataObject) -> None:
        offset, length = self._range(data)
        self._img().write_zeroes(offset, length)
        self.disk[offset : offset + length] = bytes(length)

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        # Whole clusters only: partial discards are ignored by qemu and need not zero.
        clusters = len(self.disk) // CLUSTER
        first = data.draw(st.integers(0, clusters - 1), label="first cluster")
        count = data.draw(st.integers(1, min(4, clusters - first)), label="clusters")
        self._img().discard(first * CLUSTER, count * CLUSTER)
        self.disk[first * CLUSTER : (first + count) * CLUSTER] = bytes(count * CLUSTER)

    @rule(data=st.data(), extents=st.integers(1, 4), fill=st.integers(1, 255))
    def commit(self, data: st.DataObject, extents: int, fill: int) -> None:
        writes = []
        for i in range(extents):
            offset, length = self._range(data, 2 * CLUSTER)
            writes.append((offset, bytes([(fill + i) % 256]) * length))
        self._img().commit_atomically(writes)
        for offset, payload in writes:
            self.disk[offset : offset + len(payload)] = payload

    @rule(grow=st.integers(1, 64))
    def resize(self, grow: int) -> None:
        new_size = min(MAX_SIZE, len(self.disk) + grow * CLUSTER)
        self._img().resize(new_size)
        self.disk += bytes(new_size - len(self.disk))

    @rule(cut=st.integers(1, 32))
    def shrink(self, cut: int) -> None:
        # qemu 7.2 allows shrinking an image with snapshots; they keep their own size.
        new_size = max(16 * CLUSTER, len(self.disk) - cut * CLUSTER)
        self._img().resize(new_size)
        del self.disk[new_size:]

    @rule(name=st.sampled_from(["a", "b", "c"]))
    def create_snapshot(self, name: str) -> None:
        entry = self._img().create_snapshot(name)
        ids = [int(s.id) for s in self.snaps]
        expected_id = str(max(ids, default=0) + 1)
        assert entry.id == expected_id
        self.snaps.append(ModelSnapshot(expected_id, name, bytes(self.disk)))

    @rule(name=st.sampled_from(["a", "b", "c"]))
    def apply_snapshot(self, name: str) -> None:
        match = next((s for s in self.snaps if s.name == name), None)
        if match is None:
            return
        self._img().apply_snapshot(name)
        self.disk = bytearray(match.content)

    @rule(name=st.sampled_from(["a", "b", "c"]))
    def delete_snapshot(self, name: str) -> None:
        match = next((s for s in self.snaps if s.name == name), None)
        if match is None:
            return
        self._img().delete_snapshot(name)
        self.snaps.remove(match)

    @invariant()
    def reads_match_model(self) -> None:
        if self.image is not None:
            assert self.image.virtual_size == len(self.disk)
            assert self.image.read(0, len(self.disk)) == bytes(self.disk)

    def teardown(self) -> None:
        try:
            if self.image is None:
                return
            for snap in self.snaps:
                view = self.image.snapshot(snap.id)
                assert view.read(0, len(snap.content)) == snap.content
            self.image.close()
            self.image = None
            oracle.assert_clean(self.path)
            assert oracle.convert(self.path) == bytes(self.disk)
            listed = oracle.snapshot_list(self.path)
            assert [(s["id"], s["name"]) for s in listed] == [(s.id, s.name) for s in self.snaps]
            size = len(self.disk)
            for snap in self.snaps:
                # convert -l gives the current size: the snapshot's content, cut or padded.
                want = snap.content[:size] + bytes(max(0, size - len(snap.content)))
                assert oracle.convert(self.path, snapshot_id=snap.id) == want
        finally:
            if self.image is not None:
                self.image.close()
            self.tmp.cleanup()


QcowModel.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=16,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_qcow2_model = QcowModel.TestCase
