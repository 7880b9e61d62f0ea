"""vtpm_qcow.state.linear against files the real swtpm writes, and swtpm against files it builds."""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.vtpm.swtpm_fixtures import NV_INDEX, running_swtpm, setup_state, tpm_client
from vtpm_qcow.errors import StateFormatError
from vtpm_qcow.state import linear
from vtpm_qcow.state.blob import TAG_DATA, parse_blob


def sections_of(data: bytes) -> dict[str, bytes | None]:
    return {name: linear.read_section(data, name) for name in linear.SECTION_NAMES}


def test_parses_what_swtpm_setup_writes(tmp_path: Path) -> None:
    path = tmp_path / "state.lin"
    setup_state(f"file://{path}")
    data = path.read_bytes()
    header = linear.parse_header(data)
    permall = header.slot("permall")
    assert permall.offset == header.hdrsize == linear.HEADER_SIZE
    assert permall.data_length <= permall.section_length < 2 * permall.data_length
    assert len(data) == header.end == permall.end  # swtpm ftruncates to the last section
    assert not header.slot("volatilestate").allocated and not header.slot("savestate").allocated
    blob = parse_blob(linear.read_section(data, "permall") or b"")
    assert blob.header is not None and blob.header.totlen == permall.data_length
    assert [t.tag for t in blob.tlvs] == [TAG_DATA] and not blob.encrypted


def test_store_and_delete_match_swtpm_byte_for_byte(tmp_path: Path) -> None:
    """Replay every state write swtpm makes on our model of the previous file."""
    path = tmp_path / "state.lin"
    setup_state(f"file://{path}")
    files = [path.read_bytes()]
    with running_swtpm(f"backend-uri=file://{path}", tmp_path / "run") as swtpm:
        files.append(path.read_bytes())
        swtpm.store_volatile()  # new section after permall
        files.append(path.read_bytes())
        with tpm_client(swtpm) as tpm:
            tpm.nv_define_space(NV_INDEX, 2048)  # permall outgrows its section: moves last
            files.append(path.read_bytes())
            tpm.nv_write(NV_INDEX, bytes(range(256)) * 4)
            files.append(path.read_bytes())
            tpm.nv_undefine_space(NV_INDEX)  # permall shrinks inside its section
            files.append(path.read_bytes())
        swtpm.store_volatile()
        files.append(path.read_bytes())
        swtpm.init(delete_volatile=True)  # volatilestate removed, permall moves down
        files.append(path.read_bytes())
    operations = []
    for before, after in itertools.pairwise(files):
        if before == after:
            continue
        changed = [
            n for n in linear.SECTION_NAMES if sections_of(before)[n] != sections_of(after)[n]
        ]
        assert len(changed) == 1, f"one section per state write, got {changed}"
        (name,) = changed
        blob = linear.read_section(after, name)
        if blob is None:
            update = linear.delete_section(before, name)
            operations.append(f"delete {name}")
        else:
            update = linear.store_section(before, name, blob)
            operations.append(f"store {name}")
        assert update.size == len(after)
        assert linear.apply_update(before, update) == after, operations
        assert update.header == linear.parse_header(after)
    # The scenario must really have exercised allocation, moving and deletion.
    assert "store volatilestate" in operations and "delete volatilestate" in operations
    moved = [linear.parse_header(f).slot("permall").offset for f in files]
    assert len(set(moved)) >= 2, "permall never moved"


def test_swtpm_runs_on_a_file_built_here(tmp_path: Path) -> None:
    """State from the dir backend, packed with store_section, is what swtpm then serves."""
    state = tmp_path / "dir"
    state.mkdir()
    setup_state(str(state))
    payload = b"written through the dir backend"
    with running_swtpm(f"dir={state}", tmp_path / "run1") as swtpm:
        with tpm_client(swtpm) as tpm:
            tpm.nv_define_space(NV_INDEX, len(payload))
            tpm.nv_write(NV_INDEX, payload)
        swtpm.store_volatile()
    data = b""
    for name in ("volatilestate", "permall"):  # volatile first: permall lands after it
        blob = (state / linear.dir_file_name(name)).read_bytes()
        data = linear.apply_update(data, linear.store_section(data, name, blob))
    header = linear.parse_header(data)
    assert header.slot("permall").offset > header.slot("volatilestate").offset
    path = tmp_path / "built.lin"
    path.write_bytes(data)
    with (
        running_swtpm(f"backend-uri=file://{path}", tmp_path / "run2") as swtpm,
        tpm_client(swtpm) as tpm,
    ):
        assert tpm.nv_read(NV_INDEX, len(payload)) == payload
        tpm.nv_write(NV_INDEX, payload.upper())
    after = path.read_bytes()
    linear.parse_header(after)
    permall = linear.read_section(after, "permall")
    assert permall is not None and permall != linear.read_section(data, "permall")


def _corrupt(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _valid_file() -> bytes:
    data = linear.empty_layout()
    data = linear.apply_update(data, linear.store_section(data, "permall", b"p" * 100))
    return linear.apply_update(data, linear.store_section(data, "volatilestate", b"v" * 300))


SLOT1 = 12 + 12  # slot 1 starts after the 12-byte prefix and slot 0


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda d: d[:100], "shorter than the linear header"),
        (lambda d: _corrupt(d, 0, "<Q", 0x1234), "bad magic"),
        (lambda d: _corrupt(d, 8, "<B", 2), "version 2"),
        (lambda d: _corrupt(d, 10, "<H", 100), "hdrsize 100"),
        (lambda d: _corrupt(d, SLOT1, "<I", 64), "slot 1 offset 64 inside the header"),
        (lambda d: _corrupt(d, SLOT1 + 4, "<I", 1000), "slot 1 data_length 1000 >"),
        (lambda d: _corrupt(d, SLOT1 + 8, "<I", 384), "slot 1 section_length 384"),
        (lambda d: _corrupt(d, SLOT1 + 8, "<I", 1 << 20), "beyond file size"),
        (lambda d: _corrupt(d, SLOT1, "<I", 200), "overlap"),
    ],
)
def test_malformed_headers_raise_naming_the_field(mangle, message) -> None:  # type: ignore[no-untyped-def]
    data = mangle(_valid_file())
    with pytest.raises(StateFormatError, match=message) as info:
        linear.parse_header(data, source="x.lin")
    assert str(info.value).startswith("x.lin: ") and "\n" not in str(info.value)


def test_unformatted_file_holds_nothing_and_is_formatted_on_store() -> None:
    assert linear.read_section(bytes(4096), "permall") is None
    update = linear.store_section(bytes(4096), "savestate", b"s" * 10)
    data = linear.apply_update(bytes(4096), update)
    assert linear.read_section(data, "savestate") == b"s" * 10
    assert len(data) == linear.HEADER_SIZE + 16


def test_dir_file_names() -> None:
    assert linear.dir_file_name("permall") == "tpm2-00.permall"
    assert linear.dir_file_name("savestate", tpm2=False) == "tpm-00.savestate"
    assert linear.section_of_file_name("tpm-00.volatilestate") == ("volatilestate", False)
    assert linear.section_of_file_name("TMP2-00.permall") is None
    with pytest.raises(ValueError, match="unknown"):
        linear.slot_number("nvram")


operation = st.tuples(
    st.sampled_from(linear.SECTION_NAMES),
    st.one_of(st.none(), st.binary(min_size=1, max_size=3000)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(operation, max_size=12))
def test_random_store_delete_sequences_keep_a_packed_valid_layout(ops) -> None:  # type: ignore[no-untyped-def]
    model: dict[str, bytes] = {}
    data = linear.empty_layout()
    for name, blob in ops:
        if blob is None:
            update = linear.delete_section(data, name)
            model.pop(name, None)
        else:
            update = linear.store_section(data, name, blob)
            model[name] = blob
        new = linear.apply_update(data, update)
        for offset, chunk in update.writes:  # every extent changes something
            assert chunk != data[offset : offset + len(chunk)].ljust(len(chunk), b"\0")
        data = new
        header = linear.parse_header(data)
        assert header == update.header and len(data) == header.end
        assert {n: linear.read_section(data, n) for n in linear.SECTION_NAMES} == {
            n: model.get(n) for n in linear.SECTION_NAMES
        }
        used = sorted((s for s in header.slots if s.allocated), key=lambda s: s.offset)
        pos = linear.HEADER_SIZE
        for slot in used:  # packed: no holes between sections (swtpm compacts on removal)
            assert slot.offset == pos
            pos = slot.end


@settings(max_examples=60, deadline=None)
@given(
    st.lists(operation, max_size=6),
    st.sampled_from(linear.SECTION_NAMES),
    st.binary(min_size=1, max_size=5000),
    st.binary(min_size=1, max_size=20000),
)
def test_stale_bytes_past_the_end_never_leak_into_a_section(ops, name, blob, stale) -> None:  # type: ignore[no-untyped-def]
    """On a fixed-size file the bytes past the layout are stale; a new section over them
    must read back exactly, and the rest of the window must read as zeros afterwards."""
    data = linear.empty_layout()
    for section, content in ops:
        update = (
            linear.delete_section(data, section)
            if content is None
            else linear.store_section(data, section, content)
        )
        data = linear.apply_update(data, update)
    window = linear.store_window(data, len(blob))
    disk = (data + stale * (window // len(stale) + 1))[: max(window, len(data))]
    update = linear.store_section(disk, name, blob)
    after = linear.apply_update(disk, update)
    assert linear.read_section(after, name) == blob
    written = bytearray(disk)
    for offset, chunk in update.writes:
        written[offset : offset + len(chunk)] = chunk
    assert written[update.size : len(disk)].count(0) == len(disk) - update.size
    assert update.size <= window


def test_blob_headers_and_tlvs_are_validated() -> None:
    """The state blob inside a section: swtpm's header check, then bounded TLVs."""
    tlv = struct.pack(">HI", TAG_DATA, 4) + b"data"
    good = struct.pack(">BBHHI", 2, 1, 10, 0, 10 + len(tlv)) + tlv
    info = parse_blob(good)
    assert info.header is not None and [(t.tag, t.length) for t in info.tlvs] == [(TAG_DATA, 4)]
    # swtpm's CheckHeader failing (totlen mismatch, min_version > 2) means "headerless blob"
    assert parse_blob(good + b"x").header is None
    assert parse_blob(struct.pack(">BBHHI", 3, 3, 10, 0, 10)).header is None
    overrun = struct.pack(">BBHHI", 2, 1, 10, 1, 16) + struct.pack(">HI", TAG_DATA, 99)
    with pytest.raises(StateFormatError, match="TLV tag 1 length 99 at offset 10 overruns"):
        parse_blob(overrun, source="x.permall")
    truncated = struct.pack(">BBHHI", 2, 1, 10, 0, 13) + b"\x00\x01\x00"
    with pytest.raises(StateFormatError, match="truncated TLV header at offset 10"):
        parse_blob(truncated)
    with pytest.raises(StateFormatError, match="hdrsize 4 out of range"):
        parse_blob(struct.pack(">BBHHI", 2, 1, 4, 0, 10))
    flags = parse_blob(struct.pack(">BBHHI", 2, 1, 10, 0x09 | 0x100, 10)).header
    assert flags is not None and flags.flag_names == ["encrypted", "aes-256-key", "0x100"]


def test_a_header_is_parsed_once_whatever_file_it_comes_from() -> None:
    """The memo is keyed by the header's bytes and the file size, not the source: the same
    header of every snapshot (``snapshot -l``, ``info``) is parsed once; an error still
    names the file it was read from (errors are not memoized)."""
    layout = linear.store_section(linear.empty_layout(), "permall", b"\x01" * 100).header.pack()
    linear._PARSED.clear()
    first = linear.parse_header(layout, size=4096, source="img@a")
    assert linear.parse_header(layout, size=4096, source="img@b") is first
    assert len(linear._PARSED) == 1
    bad = b"\x00" * linear.HEADER_SIZE
    for source in ("img@a", "img@b"):
        with pytest.raises(StateFormatError, match=f"^{source}: bad magic"):
            linear.parse_header(bad, size=4096, source=source)
    with pytest.raises(StateFormatError, match="beyond file size 200"):
        linear.parse_header(layout, size=200, source="img@c")  # another size: checked again
