"""Structure-aware fuzzing of the qcow2 reader (issue 13): seeds, fields, mutations, a
bounded runner.

Seeds are small images made by ``qemu-img``/``qemu-io`` (v3 with a snapshot, compressed
and zero clusters and a persistent bitmap; v2; extended L2; 8-bit refcounts; LUKS
encrypted, two key slots).  Each seed is parsed into its metadata *fields*: header fields,
header extensions (type, length, data words; the crypto header extension's offset and
length), L1 and L2 entries (active and snapshot tables), refcount table and block
entries, snapshot table entries, the bitmap directory and bitmap tables, and the LUKS
header (magic, version, cipher, mode and hash names, payload offset, key bytes, master key
digest, salt and iterations, each key slot's state, iterations, salt, key material offset
and stripes) with the first words of each slot's key material.  A mutation sets
one field to a value chosen with the field in mind (0, all ones, sign bits, the value
plus or minus one, one bit flipped, cluster multiples inside and past the file, the L2
flag bits...).  :func:`exercise` then opens the image read-only, reads it, checks it,
maps it and reads its first snapshots through the library, and runs ``info``/``check``/``map``
of the ``qcow2`` command, in a forked child with bounded address space and time; an
encrypted image is opened and run through the command a second time with its secret.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import signal
import subprocess
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from tests.qcow2 import oracle

KiB = 1024
#: Extra address space a child may use beyond what it had at fork time.
MEMORY = 512 << 20
#: Seconds a child may take for one image.
SECONDS = 20


@dataclass(frozen=True)
class Field:
    """``size`` bytes (1, 2, 4 or 8; big-endian) at ``offset`` that mean ``what``."""

    what: str
    offset: int
    size: int


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    cluster_size: int
    fields: tuple[Field, ...]


def _u(data: bytes | bytearray, offset: int, size: int) -> int:
    return int.from_bytes(data[offset : offset + size], "big")


HEADER_FIELDS = [
    ("magic", 0, 4),
    ("version", 4, 4),
    ("backing_file_offset", 8, 8),
    ("backing_file_size", 16, 4),
    ("cluster_bits", 20, 4),
    ("size", 24, 8),
    ("crypt_method", 32, 4),
    ("l1_size", 36, 4),
    ("l1_table_offset", 40, 8),
    ("refcount_table_offset", 48, 8),
    ("refcount_table_clusters", 56, 4),
    ("nb_snapshots", 60, 4),
    ("snapshots_offset", 64, 8),
]
HEADER_V3_FIELDS = [
    ("incompatible_features", 72, 8),
    ("compatible_features", 80, 8),
    ("autoclear_features", 88, 8),
    ("refcount_order", 96, 4),
    ("header_length", 100, 4),
    ("compression_type", 104, 1),
]
BITMAPS_EXTENSION = 0x23852875
CRYPTO_EXTENSION = 0x0537BE77
#: This library's commit records (qcow2.commit_records): two slots of RECORD_SLOT bytes.
RECORDS_EXTENSION = 0x636F6D72
RECORD_SLOT = 1024
#: The LUKS seed's passphrase (``--object secret,id=sec0,data=...``).
SECRET = "fuzz-secret"
SECRET2 = "fuzz-other"
#: LUKS1 header fields (offset, size) within the header, then per key slot (48 bytes
#: from 208): QEMU's ``QCryptoBlockLUKSHeader``.
LUKS_FIELDS = [
    ("luks_magic", 0, 4),
    ("luks_magic_end", 4, 2),
    ("luks_version", 6, 2),
    *[("luks_cipher_name", 8 + k, 8) for k in range(0, 32, 8)],
    *[("luks_cipher_mode", 40 + k, 8) for k in range(0, 32, 8)],
    *[("luks_hash_spec", 72 + k, 8) for k in range(0, 32, 8)],
    ("luks_payload_offset", 104, 4),
    ("luks_key_bytes", 108, 4),
    ("luks_mk_digest", 112, 8),
    ("luks_mk_digest_salt", 132, 8),
    ("luks_mk_digest_iter", 164, 4),
    ("luks_uuid", 168, 8),
]
LUKS_SLOT_FIELDS = [
    ("luks_slot_active", 0, 4),
    ("luks_slot_iterations", 4, 4),
    ("luks_slot_salt", 8, 8),
    ("luks_slot_key_offset", 40, 4),
    ("luks_slot_stripes", 44, 4),
]


def _words(what: str, offset: int, length: int, size: int = 8) -> list[Field]:
    return [Field(what, offset + i, size) for i in range(0, length - size + 1, size)]


def parse_fields(data: bytes) -> tuple[int, list[Field]]:
    """The cluster size and the metadata fields of the valid image ``data``."""
    version = _u(data, 4, 4)
    cs = 1 << _u(data, 20, 4)
    fields = [Field(*f) for f in HEADER_FIELDS]
    header_length = 72
    refcount_order = 4
    extended = False
    if version >= 3:
        fields += [Field(*f) for f in HEADER_V3_FIELDS]
        header_length = _u(data, 100, 4)
        refcount_order = _u(data, 96, 4)
        extended = bool(_u(data, 72, 8) & 16)
    # header extensions
    pos = header_length
    bitmap_directory = (0, 0)
    while pos + 8 <= cs:
        kind, length = _u(data, pos, 4), _u(data, pos + 4, 4)
        fields += [Field("extension_type", pos, 4), Field("extension_length", pos + 4, 4)]
        if kind == 0:
            break
        fields += _words(f"extension_{kind:#x}", pos + 8, min(length, 64))
        if kind == CRYPTO_EXTENSION:  # the LUKS header's offset and length
            fields += [
                Field("crypto_header_offset", pos + 8, 8),
                Field("crypto_header_length", pos + 16, 8),
            ]
            fields += luks_fields(data, _u(data, pos + 8, 8))
        if kind == RECORDS_EXTENSION:
            fields += record_fields(data, pos + 8)
        if kind == BITMAPS_EXTENSION:  # nb_bitmaps, reserved, directory size, offset
            fields.append(Field("bitmaps_count", pos + 8, 4))
            bitmap_directory = (_u(data, pos + 24, 8), _u(data, pos + 16, 8))
        pos += 8 + (length + 7) // 8 * 8
    mask = 0x00FFFFFFFFFFFE00
    # L1 and L2 tables: the active one, then each snapshot's
    tables = [(_u(data, 40, 8), _u(data, 36, 4))]
    snapshots_offset, pos = _u(data, 64, 8), _u(data, 64, 8)
    for _ in range(_u(data, 60, 4)):
        fields += [
            Field("snapshot_l1_table_offset", pos, 8),
            Field("snapshot_l1_size", pos + 8, 4),
            Field("snapshot_id_size", pos + 12, 2),
            Field("snapshot_name_size", pos + 14, 2),
            Field("snapshot_vm_state_size", pos + 32, 4),
            Field("snapshot_extra_size", pos + 36, 4),
        ]
        tables.append((_u(data, pos, 8), _u(data, pos + 8, 4)))
        extra = _u(data, pos + 36, 4)
        fields += _words("snapshot_extra", pos + 40, extra)
        pos += 40 + extra + _u(data, pos + 12, 2) + _u(data, pos + 14, 2)
        pos = (pos + 7) // 8 * 8
    del snapshots_offset
    seen_l2: set[int] = set()
    for l1_offset, l1_size in tables:
        for i in range(l1_size):
            fields.append(Field("l1_entry", l1_offset + 8 * i, 8))
            l2 = _u(data, l1_offset + 8 * i, 8) & mask
            if l2 and l2 not in seen_l2:
                seen_l2.add(l2)
                l2_words = _words("l2_entry", l2, cs)
                used = [f for f in l2_words if _u(data, f.offset, 8)]
                fields += (
                    used + l2_words[:2] + ([Field("l2_bitmap", l2 + 8, 8)] if extended else [])
                )
    # refcount table and blocks
    reftable = _u(data, 48, 8)
    for i in range(_u(data, 56, 4) * cs // 8):
        block = _u(data, reftable + 8 * i, 8)
        if not block and i > 1:
            continue
        fields.append(Field("reftable_entry", reftable + 8 * i, 8))
        if block:
            bits = 1 << refcount_order
            size = max(bits // 8, 1)
            entries = [
                Field("refcount", block + k, size)
                for k in range(0, cs, size)
                if _u(data, block + k, size)
            ]
            fields += entries[:64]
            if bits < 8:
                fields += [Field("refcount_byte", block + k, 1) for k in range(0, 16)]
    # bitmap directory and tables
    directory, directory_size = bitmap_directory
    pos = directory
    while directory and pos < directory + directory_size:
        fields += [
            Field("bitmap_table_offset", pos, 8),
            Field("bitmap_table_size", pos + 8, 4),
            Field("bitmap_flags", pos + 12, 4),
            Field("bitmap_type", pos + 16, 1),
            Field("bitmap_granularity_bits", pos + 17, 1),
            Field("bitmap_name_size", pos + 18, 2),
            Field("bitmap_extra_size", pos + 20, 4),
        ]
        table, table_size = _u(data, pos, 8), _u(data, pos + 8, 4)
        fields += _words("bitmap_table_entry", table, 8 * table_size)
        pos += 24 + _u(data, pos + 20, 4) + _u(data, pos + 18, 2)
        pos = (pos + 7) // 8 * 8
    return cs, [f for f in fields if f.offset + f.size <= len(data)]


def record_fields(data: bytes, slots: int) -> list[Field]:
    """Each commit record's generation, base and new header bytes, extent count, extents
    and digest (:mod:`qcow2.commit_records`; :func:`mutated` recomputes the digests, so a
    mutated record is believed as far as its digest goes)."""
    fields = []
    for slot in range(2):
        base = slots + slot * RECORD_SLOT
        if data[base : base + 8] != b"qcow2rec":
            continue
        count = min(_u(data, base + 112, 4), 55)
        fields += [Field("record_generation", base + 8, 8), Field("record_count", base + 112, 4)]
        fields += _words("record_base", base + 16, 48) + _words("record_new", base + 64, 48)
        for i in range(count):
            fields.append(Field("record_extent_offset", base + 120 + 16 * i, 8))
            fields.append(Field("record_extent_length", base + 128 + 16 * i, 8))
        fields += _words("record_digest", base + 120 + 16 * count, 16)
    return fields


def fix_record_digests(data: bytearray) -> None:
    """Recompute the digest of every commit record in ``data`` (as a writer would have):
    the fuzzer's mutations then reach past the digest check into roll-forward."""
    import xxhash

    from qcow2.commit_records import parse_record, slots_offset
    from qcow2.errors import Qcow2Error
    from qcow2.format.header import read_header
    from qcow2.format.layout import COMMIT_RECORD_SLOT_SIZE

    class _Bytes:  # the little of HostFile that read_header needs
        path = "fuzz"

        def size(self) -> int:
            return len(data)

        def pread(self, offset: int, length: int) -> bytes:
            return bytes(data[offset : offset + length])

    try:
        header = read_header(_Bytes(), mode="check")  # type: ignore[arg-type]
    except Qcow2Error:
        return
    start = slots_offset(header)
    if start is None:
        return
    for slot in range(2):
        base = start + slot * COMMIT_RECORD_SLOT_SIZE
        record = parse_record(bytes(data[base : base + COMMIT_RECORD_SLOT_SIZE]))
        if record is None:
            continue
        digest = xxhash.xxh3_128(record.head)
        for offset, length in record.extents:
            digest.update(bytes(data[offset : offset + min(length, 1 << 20)]))
        end = base + len(record.head)
        data[end : end + 16] = digest.digest()


def luks_fields(data: bytes, base: int) -> list[Field]:
    """The LUKS header's fields at ``base``, and each active slot's first key material
    words (in sectors of 512 bytes from ``base``)."""
    fields = [Field(what, base + offset, size) for what, offset, size in LUKS_FIELDS]
    for slot in range(8):
        at = base + 208 + 48 * slot
        fields += [Field(what, at + offset, size) for what, offset, size in LUKS_SLOT_FIELDS]
        if _u(data, at, 4) == 0x00AC71F3:  # enabled: its key material
            fields += _words("luks_key_material", base + 512 * _u(data, at + 40, 4), 32)
    return fields


def _secret_options(*secrets: tuple[str, str]) -> list[str]:
    return [a for sid, value in secrets for a in ("--object", f"secret,id={sid},data={value}")]


def _seed_luks(path: Path) -> None:
    """LUKS (iter-time 10 ms: cheap to unlock) with a second key slot, data, a zero cluster
    and a snapshot."""
    qemu_img = oracle.need("qemu-img")
    secret = _secret_options(("sec0", SECRET))
    opts = f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"
    for args in (
        [qemu_img, "create", "-q", "-f", "qcow2", *secret, "-o",
         "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,cluster_size=4096",
         os.fspath(path), "256K"],
        [oracle.need("qemu-io"), *secret, "--image-opts", opts,
         "-c", "write -P 0x51 0 12k", "-c", "write -z 16k 4k"],
        [qemu_img, "snapshot", *secret, "--image-opts", opts, "-c", "snap"],
        [qemu_img, "amend", *_secret_options(("sec0", SECRET), ("sec1", SECRET2)),
         "--image-opts", opts, "-o",
         "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10,encrypt.keyslot=1"],
    ):  # fmt: skip
        subprocess.run(args, check=True, capture_output=True, timeout=60)


def _seed_v3(path: Path) -> None:
    oracle.create(path, 256 * KiB, cluster_size=4096)
    oracle.qemu_io(path, "write -P 0x11 0 20k", "write -c -P 0x12 64k 4k", "write -z 8k 4k")
    oracle.qemu_img("snapshot", "-c", "snap", os.fspath(path))
    oracle.qemu_io(path, "write -P 0x13 4k 8k", "write -z 96k 4k")
    oracle.qemu_img("bitmap", "--add", os.fspath(path), "dirty0")


def _seed_v2(path: Path) -> None:
    oracle.create(path, 256 * KiB, cluster_size=4096, compat="0.10")
    oracle.qemu_io(path, "write -P 0x21 0 12k", "write -c -P 0x22 64k 4k")
    oracle.qemu_img("snapshot", "-c", "snap", os.fspath(path))
    oracle.qemu_io(path, "write -P 0x23 4k 4k")


def _seed_extended_l2(path: Path) -> None:
    oracle.create(path, 256 * KiB, cluster_size=16384, extended_l2=True)
    oracle.qemu_io(path, "write -P 0x31 0 2k", "write -P 0x32 20k 1k", "write -z 40k 8k")


def _seed_records(path: Path) -> None:
    """This library's commit records, as a crash leaves them: the header on disk one
    commit behind, the newest record to roll forward."""
    import qcow2
    from qcow2.commit_records import read_records

    oracle.create(path, 256 * KiB, cluster_size=4096)
    with qcow2.open(os.fspath(path), writable=True) as image:
        image.enable_commit_records()
        for i in range(3):
            image.commit_atomically([(i * 5000, bytes([0x51 + i]) * 6000)])
        newest = max(read_records(image.file, image.header), key=lambda r: r.generation)
    data = bytearray(path.read_bytes())
    data[24:72] = newest.base
    path.write_bytes(bytes(data))


def _seed_refcount8(path: Path) -> None:
    oracle.create(path, 256 * KiB, cluster_size=1024, refcount_bits=8)
    oracle.qemu_io(path, "write -P 0x41 0 6k", "write -c -P 0x42 32k 1k")
    oracle.qemu_img("snapshot", "-c", "s", os.fspath(path))


#: The seed images: a v3 image with a snapshot, compressed and zero clusters and a
#: persistent bitmap; a v2 one with a snapshot; extended L2; 8-bit refcounts.
SEED_BUILDERS: dict[str, Callable[[Path], None]] = {
    "v3": _seed_v3,
    "v2": _seed_v2,
    "extended_l2": _seed_extended_l2,
    "refcount8": _seed_refcount8,
    "luks": _seed_luks,
    "records": _seed_records,
}


def build_seeds(directory: Path) -> list[Seed]:
    seeds = []
    for name, builder in SEED_BUILDERS.items():
        path = directory / f"{name}.qcow2"
        builder(path)
        if name == "luks":  # qemu-img check needs the key
            subprocess.run(
                [oracle.need("qemu-img"), "check", *_secret_options(("sec0", SECRET)),
                 "--image-opts", f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
        else:
            oracle.assert_clean(path)
        data = path.read_bytes()
        cs, fields = parse_fields(data)
        seeds.append(Seed(name, data, cs, tuple(fields)))
    return seeds


# Section: mutations

COPIED, COMPRESSED, ZERO = 1 << 63, 1 << 62, 1


def values(
    field: Field, original: int, cluster_size: int, file_size: int
) -> st.SearchStrategy[int]:
    """Values worth trying in ``field`` (whose value is ``original``)."""
    bits = 8 * field.size
    top = (1 << bits) - 1
    special = {0, 1, 2, top, top - 1, 1 << (bits - 1), (1 << (bits - 1)) - 1}
    special |= {(original + d) & top for d in (-1, 1, cluster_size, -cluster_size, 512)}
    special |= {original * 2 & top, original // 2}
    if bits >= 32:
        clusters = file_size // cluster_size
        special |= {
            k * cluster_size & top
            for k in (0, 1, 2, 3, clusters - 1, clusters, clusters + 1, 1 << 20)
        }
        special |= {(file_size + 512) & top, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 65536, 65537}
    if bits == 64:
        special |= {original ^ COPIED, original ^ COMPRESSED, original ^ ZERO, original | 0x200}
        special |= {COPIED | k * cluster_size for k in (0, 1, 3, 4, 5)}
        special |= {1 << 56, 1 << 62, (1 << 63) - 1}
    return st.one_of(
        st.sampled_from(sorted(special)),
        st.integers(0, bits - 1).map(lambda b: original ^ (1 << b)),
        st.integers(0, top),
    )


@st.composite
def mutated(draw: st.DrawFn, seeds: list[Seed]) -> tuple[str, bytes, list[str]]:
    """A seed's bytes with one to four fields changed; the seed name and the changes."""
    seed = draw(st.sampled_from(seeds))
    data = bytearray(seed.data)
    changes = []
    kinds = sorted({f.what for f in seed.fields})
    for _ in range(draw(st.integers(1, 4))):
        # a kind of field first, then one of its fields: each kind as likely as the next
        what = draw(st.sampled_from(kinds))
        field = draw(st.sampled_from([f for f in seed.fields if f.what == what]))
        original = _u(data, field.offset, field.size)
        value = draw(values(field, original, seed.cluster_size, len(seed.data)))
        data[field.offset : field.offset + field.size] = value.to_bytes(field.size, "big")
        changes.append(f"{field.what}@{field.offset:#x}/{field.size}: {original:#x} -> {value:#x}")
    if seed.name == "records":
        fix_record_digests(data)
    return seed.name, bytes(data), changes


# Section: the property, run in a bounded child


#: PBKDF2 iterations (key slots tried plus the master key digest, per output block) a
#: keyed open may cost here.  Hostile counts are bounded by ``qcow2.crypto.MAX_ITERATIONS``
#: (50 million, over a minute per slot): a mutated header above this budget is exercised
#: without the key only.
KEYED_OPEN_ITERATIONS = 2_000_000


def keyed_open_cost(path: str) -> int | None:
    """What unlocking ``path`` with the seed's secret may cost in PBKDF2 iterations; None
    if it is no LUKS image the library accepts (nothing to unlock)."""
    from qcow2.crypto import HASHES, read_luks_header
    from qcow2.errors import Qcow2Error
    from qcow2.format.header import read_header
    from qcow2.io.fileio import HostFile

    f = HostFile(path, writable=False)
    try:
        area = read_header(f, mode="qemu").crypto_header
        if area is None:
            return None
        luks = read_luks_header(f, *area)
    except Qcow2Error:
        return None
    finally:
        f.close()
    size = HASHES[luks.hash_spec]().digest_size
    blocks = -(-luks.key_bytes // size)
    slots = sum(slot.iterations * blocks for slot in luks.slots if slot.enabled)
    return slots + luks.mk_digest_iter * -(-20 // size)


def exercise(path: str) -> None:
    """What any image must survive with nothing but :class:`~qcow2.errors.Qcow2Error`:
    a read-only open, reads at the start, middle and end, check, map, each snapshot's
    first bytes; and ``qcow2 info``/``check``/``map --output=json`` exit as qemu-img may
    (0-3, 63) without an internal error.  A LUKS image (within
    :data:`KEYED_OPEN_ITERATIONS`) goes through all of it again with the seed's secret."""
    _exercise(path, None)
    cost = keyed_open_cost(path)
    if cost is not None and cost <= KEYED_OPEN_ITERATIONS:
        _exercise(path, SECRET)


def _exercise(path: str, secret: str | None) -> None:
    import qcow2
    from qcow2.cli.main import main
    from qcow2.errors import Qcow2Error
    from qcow2.tools.map import map_entries

    key = secret.encode() if secret is not None else None
    try:
        with qcow2.open(path, key_secret=key, roll_forward=True) as image:
            size = image.virtual_size
            for offset in {0, size // 2 // 512 * 512, max(size - 65536, 0)}:
                image.read(offset, min(65536, size - offset))
            map_entries([image])
            image.check()
            for entry in image.snapshots[:8]:  # (a lookup by name is linear)
                with contextlib.suppress(Qcow2Error):
                    view = image.snapshot(entry.name)
                    view.read(0, min(65536, view.virtual_size))
    except Qcow2Error:
        pass
    commands: list[list[str]] = [["info", path], ["check", path], ["map", "--output=json", path]]
    if secret is not None:
        spec = f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"
        options = ["--object", f"secret,id=sec0,data={secret}", "--image-opts", spec]
        commands = [[argv[0], *argv[1:-1], *options] for argv in commands]
    for argv in commands:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        # qemu-img's codes; check of a raw file (the magic is gone) exits 63 as qemu-img's
        if code not in (0, 1, 2, 3, 63) or "internal error" in err.getvalue():
            raise AssertionError(f"qcow2 {argv[0]}: exit {code}: {err.getvalue().strip()}")


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def run_bounded(path: str, function: Callable[[str], None] = exercise) -> str | None:
    """Run ``function(path)`` in a forked child limited to :data:`MEMORY` more address
    space and :data:`SECONDS` seconds; None if it returned, else what went wrong."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test runner
        code = 0
        try:
            os.close(read_end)
            limit = _address_space() + MEMORY
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(SECONDS)
            function(path)
        except BaseException:
            code = 1
            with contextlib.suppress(BaseException):
                os.write(write_end, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"killed by {signal.Signals(sig).name}" + (
            " (time limit)" if sig == signal.SIGALRM else ""
        )
    if os.WEXITSTATUS(status):
        return report or f"exit {os.WEXITSTATUS(status)}"
    return None
