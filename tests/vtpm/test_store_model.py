"""A hypothesis state machine: random section, file view and snapshot operations on a real
Store, compared after every step with a model (bytes of the disk plus a dict of snapshots),
and at the end with what qemu-img reads and checks."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.qcow2 import oracle
from vtpm_qcow.errors import StateFormatError, StoreError
from vtpm_qcow.state import linear
from vtpm_qcow.state.store import Store

SIZE = 128 * 1024
TAGS = st.sampled_from(["a", "b", "c"])
SECTIONS = st.sampled_from(linear.SECTION_NAMES)
#: Blobs with zero bytes in them: stale non-zero bytes under a new section must not survive.
BLOBS = st.tuples(st.integers(1, 20000), st.integers(1, 255)).map(
    lambda t: (bytes([t[1]]) + bytes(t[1] % 7)) * (t[0] // (1 + t[1] % 7) + 1)
)


def current_layout(disk: bytes | bytearray) -> bytes | None:
    """The layout part of the disk, b"" if unformatted, None if the header is damaged
    (a truncate into the header keeps the magic but cuts the slots)."""
    if not linear.is_formatted(bytes(disk)):
        return b""
    try:
        return bytes(disk[: linear.parse_header(bytes(disk)).end])
    except StateFormatError:
        return None


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="store-model-"))
        self.path = self.dir / "vtpm.qcow2"
        self.store = Store.create(self.path, size=SIZE)
        self.disk = bytearray(SIZE)
        self.disk[: linear.HEADER_SIZE] = linear.empty_layout()
        self.snapshots: dict[str, bytes] = {}
        self.generation = self.store.generation

    def _apply(self, update: linear.LinearUpdate) -> None:
        for offset, chunk in update.writes:
            self.disk[offset : offset + len(chunk)] = chunk

    @rule(name=SECTIONS, blob=BLOBS)
    def write_section(self, name: str, blob: bytes) -> None:
        current = current_layout(self.disk)
        if current is None:
            with pytest.raises(StateFormatError):
                self.store.write_section(name, blob)
            return
        window = min(SIZE, max(len(current), linear.store_window(bytes(self.disk), len(blob))))
        update = linear.store_section(bytes(self.disk[:window]), name, blob)
        if update.size > SIZE:
            try:
                self.store.write_section(name, blob)
            except StoreError:
                return
            raise AssertionError("a section beyond the capacity was accepted")
        self.store.write_section(name, blob)
        self._apply(update)
        assert self.store.read_section(name) == blob  # whatever stale bytes were there

    @rule(name=SECTIONS)
    def delete_section(self, name: str) -> None:
        current = current_layout(self.disk)
        if current is None:
            with pytest.raises(StateFormatError):
                self.store.delete_section(name)
            return
        self.store.delete_section(name)
        if linear.read_section(current, name) is not None:
            self._apply(linear.delete_section(current, name))

    @rule(offset=st.integers(0, SIZE - 1), data=st.binary(min_size=1, max_size=3000))
    def file_view_write(self, offset: int, data: bytes) -> None:
        data = data[: SIZE - offset]
        if offset < linear.HEADER_SIZE:  # keep the layout parseable: write past the header
            offset = linear.HEADER_SIZE + offset
            data = data[: SIZE - offset]
        if not data:
            return
        self.store.commit_linear([(offset, data)])
        self.disk[offset : offset + len(data)] = data

    @rule(new_size=st.integers(0, SIZE))
    def truncate(self, new_size: int) -> None:
        self.store.resize_linear(new_size)
        self.disk[new_size:] = bytes(SIZE - new_size)

    @rule(tag=TAGS, overwrite=st.booleans())
    def create_snapshot(self, tag: str, overwrite: bool) -> None:
        if tag in self.snapshots and not overwrite:
            try:
                self.store.create_snapshot(tag)
            except StoreError:
                return
            raise AssertionError("duplicate tag accepted")
        self.store.create_snapshot(tag, overwrite=overwrite)
        self.snapshots[tag] = bytes(self.disk)

    @rule(tag=TAGS)
    def apply_snapshot(self, tag: str) -> None:
        if tag not in self.snapshots:
            try:
                self.store.apply_snapshot(tag)
            except StoreError:
                return
            raise AssertionError("unknown tag applied")
        self.store.apply_snapshot(tag)
        self.disk[:] = self.snapshots[tag]

    @rule(tag=TAGS)
    def delete_snapshot(self, tag: str) -> None:
        if tag not in self.snapshots:
            try:
                self.store.delete_snapshot(tag)
            except StoreError:
                return
            raise AssertionError("unknown tag deleted")
        self.store.delete_snapshot(tag)
        del self.snapshots[tag]

    @invariant()
    def content_matches_model(self) -> None:
        assert self.store.generation >= self.generation
        self.generation = self.store.generation
        assert self.store.read_linear(0, SIZE) == bytes(self.disk)
        assert sorted(s.tag for s in self.store.snapshots()) == sorted(self.snapshots)

    def teardown(self) -> None:
        try:
            self.store.close()
            oracle.assert_clean(self.path)
            assert oracle.convert(self.path) == bytes(self.disk)
            listed = sorted(s["name"] for s in oracle.snapshot_list(self.path))
            assert listed == sorted(self.snapshots)
            for tag, content in self.snapshots.items():
                assert oracle.convert(self.path, snapshot=tag) == content
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


StoreMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
test_store_against_model = StoreMachine.TestCase
