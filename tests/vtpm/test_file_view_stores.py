"""The file view commits swtpm's stores, not its msyncs (issue 9).

:class:`LinearWriter` follows swtpm's linear backend (``swtpm_nvstore_linear.c`` and
``swtpm_nvstore_linear_file.c``, the same sequence from 0.7.1 to 0.10) step by step on a
real ``mmap(MAP_SHARED)`` of the mounted state file, so that the kernel turns each
``msync(MS_SYNC)`` into page writes and an fsync exactly as it does for swtpm.  After every
msync the test reads the image with qemu-img: a store half done must never be what the
image holds, its last msync must make all of it durable.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vtpm.mount_fixtures import (
    create_image,
    mounted,
    qemu_img_check,
    raw_sections,
    runtime_dir,  # noqa: F401  (fixture)
    state_blob,
)
from vtpm_qcow.export.control import ControlClient
from vtpm_qcow.state import linear

pytestmark = pytest.mark.usefixtures("runtime_dir")

PAGE = mmap.PAGESIZE


def blob(payload_size: int, fill: int) -> bytes:
    """A state blob as swtpm stores it, of ``payload_size`` bytes of ``fill``."""
    return state_blob(bytes([fill]) * payload_size)


class LinearWriter:
    """swtpm's linear file backend on a mapped file, one msync at a time.

    :meth:`store` and :meth:`delete` are generators that yield after every msync but the
    last one (the test looks at the image there) and return after the last.
    """

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.map = self._map()

    def _map(self) -> mmap.mmap:
        return mmap.mmap(self.fd, os.fstat(self.fd).st_size, mmap.MAP_SHARED)

    def close(self) -> None:
        """Unmap and close without a final msync (a writer that dies)."""
        self.map.close()
        os.close(self.fd)

    @property
    def header(self) -> linear.LinearHeader:
        return linear.parse_header(self.map[: linear.HEADER_SIZE], size=len(self.map))

    def _set_header(self, header: linear.LinearHeader) -> None:
        self.map[: linear.HEADER_SIZE] = header.pack()

    def msync(self, offset: int, count: int) -> None:
        """SWTPM_NVRAM_LinearFile_Flush: page-aligned msync(MS_SYNC)."""
        start = offset & ~(PAGE - 1)
        self.map.flush(start, min(len(self.map) - start, (count + PAGE - 1) & ~(PAGE - 1)))

    def resize(self, new_size: int) -> None:
        """SWTPM_NVRAM_LinearFile_Resize: flush all, munmap, ftruncate, mmap."""
        self.msync(0, len(self.map))
        self.map.close()
        os.ftruncate(self.fd, new_size)
        self.map = self._map()

    def format(self) -> None:
        """SWTPM_NVRAM_Prepare_Linear on an unformatted file, with its FlushHeader."""
        self._set_header(linear.LinearHeader())
        self.msync(0, linear.HEADER_SIZE)

    def _alloc(self, number: int, size: int) -> None:
        """SWTPM_NVRAM_Linear_AllocFile: a new section after the last one."""
        header = self.header
        section = 1 << max(0, (size - 1).bit_length())
        new_offset = header.end
        self.resize(new_offset + section)
        self._set_header(self.header.with_slot(number, linear.Slot(new_offset, size, section)))

    def _remove(self, number: int) -> None:
        """SWTPM_NVRAM_Linear_RemoveFile without its resize: empty, move the rest down."""
        header = self.header
        old = header.slots[number]
        slots = list(header.slots)
        slots[number] = linear.EMPTY_SLOT
        following = [s for s in header.slots if s.allocated and s.offset > old.offset]
        for i, s in enumerate(slots):
            if s.allocated and s.offset > old.offset:
                slots[i] = linear.Slot(
                    s.offset - old.section_length, s.data_length, s.section_length
                )
        self._set_header(linear.LinearHeader(header.version, header.hdrsize, tuple(slots)))
        if following:
            start = min(s.offset for s in following)
            end = max(s.end for s in following)
            self.map.move(old.offset, start, end - start)

    def store(self, name: str, data: bytes) -> Iterator[str]:
        """SWTPM_NVRAM_StoreData_Linear; yields the name of each intermediate msync."""
        number = linear.slot_number(name)
        slot = self.header.slots[number]
        hdr_flush = full_flush = False
        if not slot.allocated:
            self._alloc(number, len(data))
            yield "resize flush"
            hdr_flush = True
        elif len(data) > slot.section_length:
            self._remove(number)
            self.msync(0, len(self.map))  # the flush inside the resize of AllocFile
            yield "removed, whole file flushed"
            header = self.header
            section = 1 << max(0, (len(data) - 1).bit_length())
            os.ftruncate(self.fd, header.end + section)
            self.map.close()
            self.map = self._map()
            new = linear.Slot(header.end, len(data), section)
            self._set_header(self.header.with_slot(number, new))
            full_flush = True
        slot = self.header.slots[number]
        if slot.data_length != len(data):
            self._set_header(
                self.header.with_slot(
                    number, linear.Slot(slot.offset, len(data), slot.section_length)
                )
            )
            hdr_flush = True
        self.map[slot.offset : slot.offset + len(data)] = data
        if full_flush:
            self.msync(0, len(self.map))
            return
        if hdr_flush:
            self.msync(0, linear.HEADER_SIZE)
            yield "header flushed"
        self.msync(slot.offset, len(data))

    def delete(self, name: str) -> Iterator[str]:
        """SWTPM_NVRAM_DeleteName_Linear: remove, resize (flush + ftruncate), flush."""
        number = linear.slot_number(name)
        section = self.header.slots[number].section_length
        self._remove(number)
        self.msync(0, len(self.map))
        yield "removed, whole file flushed"
        os.ftruncate(self.fd, len(self.map) - section)
        self.map.close()
        self.map = self._map()
        self.msync(0, len(self.map))


def run(image: Path, steps: Iterator[str], before: dict[str, bytes]) -> None:
    """Drive a store: after each intermediate msync the image still holds ``before``."""
    for step in steps:
        assert raw_sections(image) == before, f"a half-done store was committed ({step})"


START = {"permall": blob(6001, 0x11), "volatilestate": blob(1500, 0x22)}


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[tuple[Path, LinearWriter]]:
    image = create_image(tmp_path / "vtpm.qcow2")
    with mounted(image, tmp_path / "mnt") as mount:
        w = LinearWriter(mount.state_path)
        try:
            for name, data in START.items():
                for _ in w.store(name, data):
                    pass
            assert raw_sections(image) == START
            yield image, w
        finally:
            w.close()
    qemu_img_check(image)


# (what swtpm stores, the sections afterwards)
CASES = {
    # a permall of 6011 bytes shrinking to 6006 spans two pages: header page first
    "shorter blob, same section": ("permall", blob(5996, 0x33)),
    "longer blob, same section": ("permall", blob(8000, 0x44)),
    "blob outgrows its section": ("permall", blob(9000, 0x55)),
    "volatile state outgrows its section": ("volatilestate", blob(2100, 0x66)),
    "new slot": ("savestate", blob(700, 0x77)),
    "same length": ("permall", blob(6001, 0x88)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_store_is_durable_at_its_last_msync_only(
    writer: tuple[Path, LinearWriter], case: str
) -> None:
    image, w = writer
    name, data = CASES[case]
    run(image, w.store(name, data), START)
    assert raw_sections(image) == {**START, name: data}


def test_a_delete_moving_a_section_is_durable_at_its_last_msync_only(
    writer: tuple[Path, LinearWriter],
) -> None:
    image, w = writer
    run(image, w.delete("permall"), START)
    assert raw_sections(image) == {"volatilestate": START["volatilestate"]}
    # and the moved-down volatile state grows back into a permall afterwards
    permall = blob(7000, 0x99)
    run(image, w.store("permall", permall), {"volatilestate": START["volatilestate"]})
    assert raw_sections(image) == {"volatilestate": START["volatilestate"], "permall": permall}


def test_a_writer_dying_half_way_leaves_the_last_complete_state(tmp_path: Path) -> None:
    image = create_image(tmp_path / "vtpm.qcow2")
    with mounted(image, tmp_path / "mnt") as mount:
        w = LinearWriter(mount.state_path)
        for name, data in START.items():
            for _ in w.store(name, data):
                pass
        steps = w.store("permall", blob(9000, 0xAA))
        assert next(steps) == "removed, whole file flushed"
        w.close()  # swtpm killed between its msyncs: its file is closed, the slot empty
        assert raw_sections(image) == START
        # the kernel's cached pages of the dropped store are gone too
        fresh = linear.read_section(mount.state_path.read_bytes(), "permall")
        assert fresh == START["permall"]
        status = ControlClient.for_image(image, timeout=30).request("info")
        assert status["dropped_stores"] == 1
        assert status["deferred_fsyncs"] >= 1
        w2 = LinearWriter(mount.state_path)
        try:
            permall = blob(9000, 0xBB)
            run(image, w2.store("permall", permall), START)
            assert raw_sections(image) == {**START, "permall": permall}
        finally:
            w2.close()
    qemu_img_check(image)


def test_a_complete_store_of_a_broken_blob_is_refused(writer: tuple[Path, LinearWriter]) -> None:
    image, w = writer
    broken = bytearray(blob(6001, 0xCC))
    struct.pack_into(">I", broken, 6, len(broken) + 1)  # totlen off by one
    with pytest.raises(OSError) as failed:
        for _ in w.store("permall", bytes(broken)):
            pass
    assert failed.value.errno == errno.EIO
    assert raw_sections(image) == START
    # the daemon goes on serving: the next good store commits
    good = blob(6001, 0xDD)
    run(image, w.store("permall", good), START)
    assert raw_sections(image) == {**START, "permall": good}


def test_a_truncate_into_the_state_is_durable_only_with_its_fsync(
    writer: tuple[Path, LinearWriter],
) -> None:
    image, w = writer
    # cutting the sections off under their header: a state swtpm would not load, refused
    os.ftruncate(w.fd, linear.HEADER_SIZE)
    assert raw_sections(image) == START
    with pytest.raises(OSError) as failed:
        os.fsync(w.fd)
    assert failed.value.errno == errno.EIO
    assert raw_sections(image) == START
    # cutting everything (no layout left) clears the state, at the fsync only
    os.ftruncate(w.fd, 0)
    assert raw_sections(image) == START
    os.fsync(w.fd)
    assert raw_sections(image) == {}
