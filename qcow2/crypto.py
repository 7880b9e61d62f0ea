"""LUKS1 encryption of qcow2 guest data (``crypt_method`` 2), as QEMU 7.2 does it.

The LUKS area (extension 0x0537be77) holds a LUKS1 header and its key material; only
guest data clusters are encrypted, with AES-XTS over 512-byte sectors whose IV (plain64)
is the **host file** sector number (``crypto/block-luks.c``, ``block/qcow2.c``).

* :func:`read_luks_header` parses and validates the header;
* :func:`unlock` turns a passphrase into the master key (PBKDF2, AF-merge, digest check);
* :class:`SectorCipher` encrypts/decrypts sector-aligned byte ranges at host offsets;
* :func:`build_luks_area` lays out a fresh LUKS area (one active key slot) for ``create``;
* :func:`add_key_slot` / :func:`erase_key_slots`: ``qemu-img amend``'s ``encrypt.state``
  ``active`` / ``inactive`` (a passphrase more, or fewer), with QEMU's messages;
* :class:`LegacyAesCipher` reads legacy qcow AES images (``crypt_method`` 1: AES-128-CBC,
  plain64 IVs of the **guest** sector, the key is the passphrase's first 16 bytes).
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import time
import uuid
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from .errors import EncryptionKeyError, InvalidImageError, UnsupportedFeatureError
from .format import layout
from .io.fileio import HostFile

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

SECTOR_SIZE = layout.LUKS_SECTOR_SIZE

#: Hash specs this implementation supports (QEMU supports the same three plus others).
HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha512": hashes.SHA512,
}
#: AES key sizes by XTS key length (two AES keys each).
_XTS_KEY_BYTES = (32, 64)
#: Largest PBKDF2 iteration count accepted from an image (QEMU has no bound; a crafted
#: header could make unlocking run for hours).  25x what iter-time=2000 gives here.
MAX_ITERATIONS = 50_000_000


@dataclass(frozen=True)
class LuksKeySlot:
    """One LUKS1 key slot; ``key_offset`` in sectors from the LUKS header start."""

    active: int
    iterations: int
    salt: bytes
    key_offset: int
    stripes: int

    @property
    def enabled(self) -> bool:
        """True if the slot holds key material."""
        return self.active == layout.LUKS_KEY_SLOT_ENABLED

    def pack(self) -> bytes:
        """The 48 on-disk bytes."""
        return layout.LUKS_KEY_SLOT_STRUCT.pack(
            self.active, self.iterations, self.salt, self.key_offset, self.stripes
        )


@dataclass(frozen=True)
class LuksHeader:
    """A parsed LUKS1 header (cipher ``aes``, mode ``xts-plain64`` only)."""

    cipher_name: str
    cipher_mode: str
    hash_spec: str
    payload_offset: int
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iter: int
    uuid: bytes
    slots: tuple[LuksKeySlot, ...]

    @property
    def material_length(self) -> int:
        """Bytes of (AF-split) key material per slot."""
        return self.key_bytes * layout.LUKS_STRIPES

    def pack(self) -> bytes:
        """The 592 on-disk bytes (header and the 8 key slots)."""
        fixed = layout.LUKS_HEADER_STRUCT.pack(
            layout.LUKS_MAGIC,
            layout.LUKS_VERSION,
            self.cipher_name.encode(),
            self.cipher_mode.encode(),
            self.hash_spec.encode(),
            self.payload_offset,
            self.key_bytes,
            self.mk_digest,
            self.mk_digest_salt,
            self.mk_digest_iter,
            self.uuid,
        )
        return fixed + b"".join(slot.pack() for slot in self.slots)


#: Bytes of the LUKS1 header including its key slots.
LUKS_HEADER_LENGTH = layout.LUKS_HEADER_STRUCT.size + (
    layout.LUKS_NUM_KEY_SLOTS * layout.LUKS_KEY_SLOT_STRUCT.size
)


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def parse_luks_header(raw: bytes, *, path: str, area_length: int) -> LuksHeader:
    """Parse and validate the LUKS1 header at the start of the LUKS area.

    Raises ``InvalidImageError`` for a malformed header (QEMU's messages where it has
    one) and ``UnsupportedFeatureError`` for ciphers/hashes this package does not do.
    """
    if len(raw) < LUKS_HEADER_LENGTH or raw[:6] != layout.LUKS_MAGIC:
        raise InvalidImageError("Volume is not in LUKS format", path=path)
    (_magic, version, cipher, mode, hash_spec, payload, key_bytes, digest, digest_salt,
     digest_iter, volume_uuid) = layout.LUKS_HEADER_STRUCT.unpack_from(raw)  # fmt: skip
    if version != layout.LUKS_VERSION:
        raise InvalidImageError(f"LUKS version {version} is not supported", path=path)
    header = LuksHeader(
        cipher_name=_cstr(cipher),
        cipher_mode=_cstr(mode),
        hash_spec=_cstr(hash_spec),
        payload_offset=payload,
        key_bytes=key_bytes,
        mk_digest=digest,
        mk_digest_salt=digest_salt,
        mk_digest_iter=digest_iter,
        uuid=volume_uuid,
        slots=tuple(
            LuksKeySlot(*layout.LUKS_KEY_SLOT_STRUCT.unpack_from(raw, pos))
            for pos in range(
                layout.LUKS_HEADER_STRUCT.size, LUKS_HEADER_LENGTH, layout.LUKS_KEY_SLOT_STRUCT.size
            )
        ),
    )
    if header.cipher_name != "aes" or header.cipher_mode != "xts-plain64":
        raise UnsupportedFeatureError(
            f"LUKS cipher {header.cipher_name}-{header.cipher_mode} is not supported "
            "(only aes xts-plain64)",
            path=path,
        )
    if header.key_bytes not in _XTS_KEY_BYTES:
        raise InvalidImageError(f"LUKS key_bytes {header.key_bytes} invalid for aes-xts", path=path)
    if header.hash_spec not in HASHES:
        raise UnsupportedFeatureError(f"LUKS hash {header.hash_spec!r} is not supported", path=path)
    if not 0 < header.mk_digest_iter <= MAX_ITERATIONS:
        raise InvalidImageError(
            f"LUKS mk_digest_iter {header.mk_digest_iter} invalid (1..{MAX_ITERATIONS})",
            path=path,
        )
    for index, slot in enumerate(header.slots):
        if not slot.enabled:
            continue
        end = slot.key_offset * SECTOR_SIZE + slot.stripes * header.key_bytes
        if slot.stripes != layout.LUKS_STRIPES:
            raise InvalidImageError(
                f"LUKS key slot {index} stripes {slot.stripes} invalid (expected "
                f"{layout.LUKS_STRIPES})",
                path=path,
            )
        if not 0 < slot.iterations <= MAX_ITERATIONS:
            raise InvalidImageError(
                f"LUKS key slot {index} iterations {slot.iterations} invalid (1..{MAX_ITERATIONS})",
                path=path,
            )
        if slot.key_offset * SECTOR_SIZE < LUKS_HEADER_LENGTH or end > area_length:
            raise InvalidImageError(
                f"LUKS key slot {index} key material offset {slot.key_offset * SECTOR_SIZE:#x} "
                f"outside the LUKS area ({area_length:#x} bytes)",
                path=path,
            )
    return header


def read_luks_header(f: HostFile, area_offset: int, area_length: int) -> LuksHeader:
    """Read and parse the LUKS header of the area at ``area_offset``."""
    return parse_luks_header(
        f.pread(area_offset, LUKS_HEADER_LENGTH), path=f.path, area_length=area_length
    )


# Section: primitives


def pbkdf2(hash_spec: str, secret: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    """PBKDF2-HMAC with the LUKS hash ``hash_spec``."""
    kdf = PBKDF2HMAC(algorithm=HASHES[hash_spec](), length=length, salt=salt, iterations=iterations)
    return kdf.derive(secret)


def _diffuse(hash_spec: str, block: bytes) -> bytes:
    """LUKS AF diffusion: each digest-sized chunk j becomes ``H(be32(j) || chunk)``."""
    algorithm = HASHES[hash_spec]()
    size = algorithm.digest_size
    out = bytearray()
    for j, pos in enumerate(range(0, len(block), size)):
        chunk = block[pos : pos + size]
        h = hashes.Hash(HASHES[hash_spec]())
        h.update(j.to_bytes(4, "big") + chunk)
        out += h.finalize()[: len(chunk)]
    return bytes(out)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def af_merge(hash_spec: str, material: bytes, key_bytes: int, stripes: int) -> bytes:
    """Recover the key from ``stripes`` AF-split blocks of ``key_bytes`` each."""
    d = bytes(key_bytes)
    for i in range(stripes - 1):
        d = _diffuse(hash_spec, _xor(d, material[i * key_bytes : (i + 1) * key_bytes]))
    return _xor(d, material[(stripes - 1) * key_bytes : stripes * key_bytes])


def af_split(
    hash_spec: str, key: bytes, stripes: int, random: Callable[[int], bytes] = os.urandom
) -> bytes:
    """AF-split ``key`` into ``stripes`` blocks (the inverse of :func:`af_merge`)."""
    key_bytes = len(key)
    blocks = bytearray(random((stripes - 1) * key_bytes))
    d = bytes(key_bytes)
    for i in range(stripes - 1):
        d = _diffuse(hash_spec, _xor(d, bytes(blocks[i * key_bytes : (i + 1) * key_bytes])))
    return bytes(blocks) + _xor(d, key)


_BLOCK = 16
_BLOCKS_PER_SECTOR = SECTOR_SIZE // _BLOCK
#: GF(2^128) reduction of the XTS tweak doubling (x^128 = x^7 + x^2 + x + 1).
_GF_REDUCTION = 0x87
#: Below this many sectors one XTS context per sector is cheaper than batching.
_MIN_BATCH = 4
#: Sectors per batch (the tweak doubling is linear in the batch, done 32 times).
_BATCH = 64


def _xor_bytes(a: bytes, b: bytes) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")


class SectorCipher:
    """AES-XTS with plain64 IVs over 512-byte sectors: the sector at byte ``offset`` has
    IV ``le64(offset // 512)``.  Offsets and lengths must be sector aligned.

    Runs of sectors are done in batches (IEEE 1619 XTS spelled out over AES-ECB): the
    tweaks of a batch are encrypted in one call and doubled in GF(2^128) lane-wise on one
    big integer, so the cost per sector is a few big-integer operations instead of a
    cipher context; a few sectors use ``modes.XTS`` directly.  ``tests/qcow2/test_luks.py``
    checks it against per-sector ``modes.XTS`` and qemu.
    """

    #: The IV counts host file sectors (LUKS), not guest sectors.
    guest_iv = False

    def __init__(self, key: bytes) -> None:
        if len(key) not in _XTS_KEY_BYTES:
            raise ValueError(f"AES-XTS key of {len(key)} bytes (expected 32 or 64)")
        half = len(key) // 2
        if key[:half] == key[half:]:
            raise ValueError("AES-XTS key halves must differ")
        self._xts_key = algorithms.AES(key)
        self._data_key = algorithms.AES(key[:half])
        self._tweak_key = algorithms.AES(key[half:])

    def _tweaks(self, first_sector: int, sectors: int) -> bytes:
        """The XTS tweak of every 16-byte block of ``sectors`` sectors, in data order."""
        ivs = b"".join((first_sector + i).to_bytes(_BLOCK, "little") for i in range(sectors))
        encrypted = Cipher(self._tweak_key, modes.ECB()).encryptor().update(ivs)
        lane_bits = 8 * _BLOCK
        lanes = int.from_bytes(encrypted, "little")  # lane i: tweak of sector i
        # bit 0 of every lane; doubling drops what shifts out of a lane (bit 127), the
        # carry folds back in as 0x87
        low_bits = int.from_bytes((b"\1" + bytes(_BLOCK - 1)) * sectors, "little")
        keep = ((1 << lane_bits * sectors) - 1) & ~(low_bits << lane_bits)
        out = memoryview(bytearray(sectors * SECTOR_SIZE)).cast("Q")
        words = _BLOCK // 8
        step = _BLOCKS_PER_SECTOR * words
        for j in range(_BLOCKS_PER_SECTOR):
            current = memoryview(lanes.to_bytes(_BLOCK * sectors, "little")).cast("Q")
            for k in range(words):
                out[j * words + k :: step] = current[k::words]
            carry = (lanes >> (lane_bits - 1)) & low_bits
            lanes = ((lanes << 1) & keep) ^ (carry * _GF_REDUCTION)
        return bytes(out.cast("B"))

    def _apply(self, offset: int, data: bytes | bytearray | memoryview, encrypt: bool) -> bytes:
        if offset % SECTOR_SIZE or len(data) % SECTOR_SIZE:
            raise ValueError(f"unaligned encryption request {offset:#x}+{len(data):#x}")
        view = memoryview(data)
        sector = offset // SECTOR_SIZE
        if len(data) < _MIN_BATCH * SECTOR_SIZE:
            return b"".join(
                self._one_sector(sector + i, view[pos : pos + SECTOR_SIZE], encrypt)
                for i, pos in enumerate(range(0, len(data), SECTOR_SIZE))
            )
        out = bytearray()
        ecb = Cipher(self._data_key, modes.ECB())
        ctx = ecb.encryptor() if encrypt else ecb.decryptor()
        for pos in range(0, len(data), _BATCH * SECTOR_SIZE):
            chunk = bytes(view[pos : pos + _BATCH * SECTOR_SIZE])
            tweaks = self._tweaks(sector + pos // SECTOR_SIZE, len(chunk) // SECTOR_SIZE)
            out += _xor_bytes(ctx.update(_xor_bytes(chunk, tweaks)), tweaks)
        return bytes(out)

    def _one_sector(self, sector: int, data: memoryview, encrypt: bool) -> bytes:
        cipher = Cipher(self._xts_key, modes.XTS(sector.to_bytes(_BLOCK, "little")))
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        return ctx.update(data)

    def encrypt(self, offset: int, data: bytes | bytearray | memoryview) -> bytes:
        """Ciphertext of the plaintext ``data`` stored at host byte ``offset``."""
        return self._apply(offset, data, True)

    def decrypt(self, offset: int, data: bytes | bytearray | memoryview) -> bytes:
        """Plaintext of the ciphertext ``data`` read at host byte ``offset``."""
        return self._apply(offset, data, False)


class LegacyAesCipher:
    """qcow's legacy AES (``crypt_method`` 1, QEMU's ``crypto/block-qcow.c``): AES-128-CBC
    per 512-byte sector, IV ``le64(guest offset // 512)``; decryption only."""

    guest_iv = True

    def __init__(self, secret: bytes) -> None:
        key = secret.split(b"\0", 1)[0][:16]  # QEMU: strlen() of the secret, at most 16
        self._algorithm = algorithms.AES(key + bytes(16 - len(key)))

    def decrypt(self, offset: int, data: bytes | bytearray | memoryview) -> bytes:
        """Plaintext of the ciphertext ``data`` of the guest bytes at ``offset``."""
        if offset % SECTOR_SIZE or len(data) % SECTOR_SIZE:
            raise ValueError(f"unaligned decryption request {offset:#x}+{len(data):#x}")
        view = memoryview(data)
        out = bytearray(len(data))
        sector = offset // SECTOR_SIZE
        for pos in range(0, len(data), SECTOR_SIZE):
            ctx = Cipher(self._algorithm, modes.CBC(sector.to_bytes(16, "little"))).decryptor()
            out[pos : pos + SECTOR_SIZE] = ctx.update(view[pos : pos + SECTOR_SIZE])
            sector += 1
        return bytes(out)

    def encrypt(self, offset: int, data: bytes | bytearray | memoryview) -> bytes:
        """Not supported: legacy AES images are read-only here."""
        raise UnsupportedFeatureError("writing legacy AES encrypted images is not supported")


#: What decrypts an encrypted image's data clusters.
DataCipher = SectorCipher | LegacyAesCipher


# Section: unlocking


def unlock(f: HostFile, area_offset: int, header: LuksHeader, secret: bytes) -> bytes:
    """The master key of the LUKS area at ``area_offset``, from the first key slot that
    ``secret`` opens.  Raises :class:`EncryptionKeyError` if none does."""
    for slot in header.slots:
        if not slot.enabled:
            continue
        slot_key = pbkdf2(header.hash_spec, secret, slot.salt, slot.iterations, header.key_bytes)
        length = layout.align_up(header.material_length, SECTOR_SIZE)
        material = SectorCipher(slot_key).decrypt(
            0, f.pread(area_offset + slot.key_offset * SECTOR_SIZE, length)
        )
        master = af_merge(header.hash_spec, material, header.key_bytes, slot.stripes)
        digest = pbkdf2(
            header.hash_spec,
            master,
            header.mk_digest_salt,
            header.mk_digest_iter,
            layout.LUKS_DIGEST_LEN,
        )
        if hmac.compare_digest(digest, header.mk_digest):
            return master
    raise EncryptionKeyError(EncryptionKeyError.WRONG_KEY, path=f.path)


def _slot_opens(
    f: HostFile, area_offset: int, header: LuksHeader, index: int, secret: bytes
) -> bool:
    """True if ``secret`` opens key slot ``index``."""
    one = tuple(slot if i == index else _disabled(slot) for i, slot in enumerate(header.slots))
    try:
        unlock(f, area_offset, dataclasses.replace(header, slots=one), secret)
    except EncryptionKeyError:
        return False
    return True


def _disabled(slot: LuksKeySlot) -> LuksKeySlot:
    return LuksKeySlot(
        layout.LUKS_KEY_SLOT_DISABLED, 0, bytes(layout.LUKS_SALT_LEN), slot.key_offset, slot.stripes
    )


def _checked_area(f: HostFile, area: tuple[int, int] | None) -> tuple[int, int]:
    """The LUKS area ``(offset, length)``, validated against the file."""
    if area is None:
        raise InvalidImageError("Missing CRYPTO header for crypt method 2", path=f.path)
    offset, length = area
    if offset <= 0 or length < LUKS_HEADER_LENGTH or offset + length > f.size():
        raise InvalidImageError(
            f"LUKS area {offset:#x}+{length:#x} invalid (file of {f.size():#x} bytes)",
            path=f.path,
        )
    return offset, length


def open_cipher(f: HostFile, area: tuple[int, int] | None, secret: bytes) -> SectorCipher:
    """Validate the LUKS area ``(offset, length)`` and unlock it with ``secret``."""
    offset, length = _checked_area(f, area)
    header = read_luks_header(f, offset, length)
    return SectorCipher(unlock(f, offset, header, secret))


# Section: key slots (qemu-img amend -o encrypt.state=active|inactive)


def _slot_index(header: LuksHeader, keyslot: int, path: str) -> int:
    last = layout.LUKS_NUM_KEY_SLOTS - 1
    if not 0 <= keyslot <= last:
        raise UnsupportedFeatureError(
            f"Invalid keyslot {keyslot} specified, must be between 0 and {last}", path=path
        )
    return keyslot


def add_key_slot(
    f: HostFile,
    area: tuple[int, int] | None,
    secret: bytes,
    new_secret: bytes,
    *,
    keyslot: int | None = None,
    iter_time_ms: int = 2000,
    random: Callable[[int], bytes] = os.urandom,
) -> int:
    """Make ``new_secret`` open the image too, like ``qemu-img amend -o
    encrypt.state=active,encrypt.new-secret=...``: ``secret`` unlocks the master key, which
    is AF-split into key slot ``keyslot`` (the first free one by default) under a key
    derived from ``new_secret``.  The key material is written and flushed before the
    header that enables the slot (a crash leaves the slot unused).  Returns the slot."""
    offset, length = _checked_area(f, area)
    header = read_luks_header(f, offset, length)
    master = unlock(f, offset, header, secret)
    if keyslot is None:
        free = [i for i, slot in enumerate(header.slots) if not slot.enabled]
        if not free:
            raise UnsupportedFeatureError(
                "Can't add a keyslot - all keyslots are in use", path=f.path
            )
        keyslot = free[0]
    index = _slot_index(header, keyslot, f.path)
    slot = header.slots[index]
    if slot.enabled:
        raise UnsupportedFeatureError(
            f"Refusing to overwrite active keyslot {index} - please erase it first", path=f.path
        )
    if iter_time_ms < 0:
        raise UnsupportedFeatureError(f"encrypt.iter-time {iter_time_ms} must not be negative")
    digest_size = HASHES[header.hash_spec]().digest_size
    blocks = -(-header.key_bytes // digest_size)
    iterations = max(
        int(_iterations_per_ms(header.hash_spec) * iter_time_ms / blocks),
        layout.LUKS_MIN_SLOT_KEY_ITERS,
    )
    padded = layout.align_up(header.material_length, SECTOR_SIZE)
    start = slot.key_offset * SECTOR_SIZE
    if start < LUKS_HEADER_LENGTH or start + padded > length:
        raise InvalidImageError(
            f"LUKS key slot {index} key material offset {start:#x} outside the LUKS area "
            f"({length:#x} bytes)",
            path=f.path,
        )
    salt = random(layout.LUKS_SALT_LEN)
    slot_key = pbkdf2(header.hash_spec, new_secret, salt, iterations, header.key_bytes)
    split = af_split(header.hash_spec, master, layout.LUKS_STRIPES, random)
    material = SectorCipher(slot_key).encrypt(0, split + bytes(padded - header.material_length))
    f.pwrite(offset + start, material)
    f.flush()
    active = LuksKeySlot(
        layout.LUKS_KEY_SLOT_ENABLED, iterations, salt, slot.key_offset, layout.LUKS_STRIPES
    )
    slots = tuple(active if i == index else old for i, old in enumerate(header.slots))
    f.pwrite(offset, dataclasses.replace(header, slots=slots).pack())
    f.flush()
    return index


def erase_key_slots(
    f: HostFile,
    area: tuple[int, int] | None,
    *,
    old_secret: bytes | None = None,
    keyslot: int | None = None,
    random: Callable[[int], bytes] = os.urandom,
) -> list[int]:
    """Erase key slots, like ``qemu-img amend -o encrypt.state=inactive`` with
    ``encrypt.old-secret`` (every slot it opens) or ``encrypt.keyslot``; refused, as QEMU
    refuses it, when no active slot would remain.  Each slot's key material is overwritten
    with random bytes and flushed before the header disables it.  Returns the slots."""
    offset, length = _checked_area(f, area)
    header = read_luks_header(f, offset, length)
    if (old_secret is None) == (keyslot is None):
        raise UnsupportedFeatureError(
            "erasing key slots needs either encrypt.old-secret or encrypt.keyslot", path=f.path
        )
    if keyslot is not None:
        index = _slot_index(header, keyslot, f.path)
        if not header.slots[index].enabled:
            raise UnsupportedFeatureError(
                f"Given keyslot {index} is already erased (inactive)", path=f.path
            )
        erase = [index]
    else:
        assert old_secret is not None
        erase = [
            i
            for i, slot in enumerate(header.slots)
            if slot.enabled and _slot_opens(f, offset, header, i, old_secret)
        ]
        if not erase:
            raise UnsupportedFeatureError(
                "No keyslots match given (old) password for erase operation", path=f.path
            )
    active = [i for i, slot in enumerate(header.slots) if slot.enabled]
    if set(active) <= set(erase):
        raise UnsupportedFeatureError(
            f"Attempt to erase the only active keyslot {active[0]} which will erase all the "
            "data in the image irreversibly - refusing operation",
            path=f.path,
        )
    padded = layout.align_up(header.material_length, SECTOR_SIZE)
    slots = list(header.slots)
    for index in erase:
        f.pwrite(offset + slots[index].key_offset * SECTOR_SIZE, random(padded))
        f.flush()
        slots[index] = _disabled(slots[index])
        f.pwrite(offset, dataclasses.replace(header, slots=tuple(slots)).pack())
        f.flush()
    return erase


# Section: creation


def _iterations_per_ms(hash_spec: str) -> float:
    """PBKDF2 iterations (one digest-sized output block) per millisecond on this host."""
    size = HASHES[hash_spec]().digest_size
    iterations = 1 << 12
    while True:
        start = time.perf_counter()
        pbkdf2(hash_spec, b"benchmark", bytes(layout.LUKS_SALT_LEN), iterations, size)
        elapsed_ms = (time.perf_counter() - start) * 1000
        if elapsed_ms >= 20 or iterations >= 1 << 24:
            return iterations / max(elapsed_ms, 1e-3)
        iterations *= 2


def build_luks_area(
    secret: bytes,
    *,
    hash_spec: str = "sha256",
    iter_time_ms: int = 2000,
    key_bytes: int = 64,
    random: Callable[[int], bytes] = os.urandom,
) -> tuple[bytes, bytes]:
    """A fresh LUKS area laid out like QEMU's (header, 8 slots with material aligned to
    4 KiB, slot 0 active) and its master key: ``(area, master_key)``.

    Iteration counts are benchmarked like QEMU's for ``iter_time_ms`` (master key digest
    an eighth of it), at least 1000 (so 0 gives the minimum counts).
    """
    if hash_spec not in HASHES:
        raise UnsupportedFeatureError(f"LUKS hash {hash_spec!r} is not supported")
    if key_bytes not in _XTS_KEY_BYTES:
        raise UnsupportedFeatureError(f"AES-XTS key of {key_bytes} bytes is not supported")
    if iter_time_ms < 0:
        raise UnsupportedFeatureError(f"encrypt.iter-time {iter_time_ms} must not be negative")
    digest_size = HASHES[hash_spec]().digest_size
    rate = _iterations_per_ms(hash_spec)
    blocks = -(-key_bytes // digest_size)
    slot_iters = max(int(rate * iter_time_ms / blocks), layout.LUKS_MIN_SLOT_KEY_ITERS)
    mk_iters = max(
        int(rate * iter_time_ms / -(-layout.LUKS_DIGEST_LEN // digest_size) / 8),
        layout.LUKS_MIN_MASTER_KEY_ITERS,
    )
    master = random(key_bytes)
    while master[: key_bytes // 2] == master[key_bytes // 2 :]:  # XTS refuses equal halves
        master = random(key_bytes)
    mk_salt = random(layout.LUKS_SALT_LEN)
    slot_salt = random(layout.LUKS_SALT_LEN)
    header_sectors = layout.LUKS_KEY_SLOT_ALIGN // SECTOR_SIZE
    material_length = key_bytes * layout.LUKS_STRIPES
    slot_sectors = layout.align_up(material_length, layout.LUKS_KEY_SLOT_ALIGN) // SECTOR_SIZE
    slots = tuple(
        LuksKeySlot(
            active=layout.LUKS_KEY_SLOT_ENABLED if i == 0 else layout.LUKS_KEY_SLOT_DISABLED,
            iterations=slot_iters if i == 0 else 0,
            salt=slot_salt if i == 0 else bytes(layout.LUKS_SALT_LEN),
            key_offset=header_sectors + i * slot_sectors,
            stripes=layout.LUKS_STRIPES,
        )
        for i in range(layout.LUKS_NUM_KEY_SLOTS)
    )
    payload = header_sectors + layout.LUKS_NUM_KEY_SLOTS * slot_sectors
    header = LuksHeader(
        cipher_name="aes",
        cipher_mode="xts-plain64",
        hash_spec=hash_spec,
        payload_offset=payload,
        key_bytes=key_bytes,
        mk_digest=pbkdf2(hash_spec, master, mk_salt, mk_iters, layout.LUKS_DIGEST_LEN),
        mk_digest_salt=mk_salt,
        mk_digest_iter=mk_iters,
        uuid=str(uuid.UUID(bytes=random(16), version=4)).encode(),
        slots=slots,
    )
    slot_key = pbkdf2(hash_spec, secret, slot_salt, slot_iters, key_bytes)
    split = af_split(hash_spec, master, layout.LUKS_STRIPES, random)
    material = SectorCipher(slot_key).encrypt(
        0, split + bytes(layout.align_up(material_length, SECTOR_SIZE) - material_length)
    )
    area = bytearray(payload * SECTOR_SIZE)
    packed = header.pack()
    area[: len(packed)] = packed
    start = slots[0].key_offset * SECTOR_SIZE
    area[start : start + len(material)] = material
    return bytes(area), master
