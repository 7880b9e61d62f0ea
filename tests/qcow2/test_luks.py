"""LUKS-encrypted qcow2 images (crypt_method 2) against qemu-img / qemu-io 7.2.

qemu is the oracle both ways: images qemu created and wrote read back through
``qcow2.open(key_secret=...)`` byte-identical to ``qemu-img convert -O raw``; what we write
(in place, COW after snapshots, partial sectors, zeroes, discards) reads back in qemu-img
as a bytearray model of the guest disk says.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import qcow2
from qcow2 import crypto, errors
from qcow2.errors import CorruptImageError, InvalidImageError, UnsupportedFeatureError
from qcow2.format import layout
from qcow2.format.layout import ClusterType
from qcow2.tools.info import image_info
from tests.helpers import need
from tests.qcow2.oracle import OracleError, qemu_img

SECRET = b"PASS"
MIB = 1024 * 1024
SIZE = 4 * MIB
_OBJECT = ["--object", f"secret,id=sec0,data={SECRET.decode()}"]


def _image_opts(path: Path, *, secret_id: str = "sec0") -> str:
    return f"driver=qcow2,file.filename={path},encrypt.key-secret={secret_id}"


def q_io(path: Path, *commands: str) -> str:
    """qemu-io on the encrypted image (with the secret); qemu-io errors fail the test."""
    args = [need("qemu-io"), *_OBJECT, "--image-opts", _image_opts(path)]
    for command in commands:
        args += ["-c", command]
    proc = subprocess.run(args, capture_output=True, timeout=120, check=False)
    out = proc.stdout.decode(errors="replace")
    if proc.returncode or any("failed:" in line for line in out.splitlines()):
        raise OracleError(f"qemu-io {commands!r}: {out} {proc.stderr.decode(errors='replace')}")
    return out


def q_raw(path: Path, *, snapshot: str | None = None) -> bytes:
    """The guest disk as ``qemu-img convert -O raw`` decrypts it."""
    out = path.with_name(path.name + ".raw")
    extra = ["-l", f"snapshot.name={snapshot}"] if snapshot else []
    qemu_img("convert", *_OBJECT, "--image-opts", *extra, _image_opts(path), "-O", "raw", str(out))
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def q_check(path: Path) -> dict[str, Any]:
    """``qemu-img check --output=json`` with the secret, plus its exit code."""
    proc = qemu_img(
        "check", *_OBJECT, "--output=json", "--image-opts", _image_opts(path), ok=(0, 1, 2, 3)
    )
    result: dict[str, Any] = json.loads(proc.stdout)
    result["exit-code"] = proc.returncode
    return result


def q_create(path: Path, size: int, **options: str) -> None:
    """``qemu-img create`` of a LUKS qcow2, retried (iter-time raised) when qemu's PBKDF2
    benchmark fails on a busy host ("Unable to get accurate CPU usage")."""
    extra = "".join(f",{key}={value}" for key, value in options.items())
    last: Exception | None = None
    for iter_time in (10, 10, 100, 100, 1000):
        try:
            qemu_img(
                "create",
                "-q",
                "-f",
                "qcow2",
                *_OBJECT,
                "-o",
                f"encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time={iter_time}{extra}",
                str(path),
                str(size),
            )
            return
        except OracleError as err:  # "Unable to get accurate CPU usage" on a busy host
            last = err
    raise AssertionError(f"qemu-img could not create a LUKS image: {last}")


@pytest.fixture(scope="module")
def qemu_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One qemu-created LUKS image (qemu's PBKDF2 benchmark takes seconds), copied per test."""
    path = tmp_path_factory.mktemp("luks") / "template.qcow2"
    q_create(path, SIZE)
    return path


@pytest.fixture
def qemu_image(qemu_template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "qemu.qcow2"
    shutil.copyfile(qemu_template, path)
    return path


def _create_ours(path: Path, size: int = SIZE, **kwargs: Any) -> qcow2.Image:
    return qcow2.create(str(path), size, encrypt_key_secret=SECRET, encrypt_iter_time=10, **kwargs)


def _luks_area(path: Path) -> bytes:
    with qcow2.open(str(path)) as image:
        area = image.header.crypto_header
        assert area is not None
        return image.file.pread(area[0], area[1])


# Section: reading what qemu wrote


def test_reads_qemu_written_clusters_like_qemu_img(qemu_image: Path) -> None:
    """Normal (partial sectors too), compressed, zero and unallocated clusters."""
    q_io(
        qemu_image,
        "write -P 0x5a 0 1M",
        "write -P 0x11 1500 777",
        "write -c -P 0x33 2M 64k",
        "write -z 3M 64k",
        "write -P 0x77 3M 4k",
    )
    expected = q_raw(qemu_image)
    assert expected[:16] == b"\x5a" * 16  # the oracle really decrypted
    with qcow2.open(str(qemu_image), key_secret=SECRET) as image:
        assert image.encrypted
        assert image.clusters.lookup(2 * MIB)[0] == ClusterType.COMPRESSED
        assert image.read(0, SIZE) == expected
        assert image.read(1400, 1000) == expected[1400:2400]  # unaligned request


def test_reads_qemu_snapshots_and_cow(qemu_image: Path) -> None:
    q_io(qemu_image, "write -P 0x21 0 192k")
    qemu_img("snapshot", *_OBJECT, "--image-opts", _image_opts(qemu_image), "-c", "s1")
    q_io(qemu_image, "write -P 0x42 65000 1000")  # COW by qemu: new host offset
    current, old = q_raw(qemu_image), q_raw(qemu_image, snapshot="s1")
    assert current != old
    with qcow2.open(str(qemu_image), key_secret=SECRET) as image:
        assert image.read(0, SIZE) == current
        assert image.snapshot("s1").read(0, SIZE) == old


@pytest.mark.parametrize("hash_alg", ["sha1", "sha512"])
def test_unlocks_qemu_images_with_other_hashes(tmp_path: Path, hash_alg: str) -> None:
    path = tmp_path / "h.qcow2"
    q_create(path, MIB, **{"encrypt.hash-alg": hash_alg})
    q_io(path, "write -P 0x6b 4096 8192")
    expected = q_raw(path)
    with qcow2.open(str(path), key_secret=SECRET) as image:
        assert image.read(0, MIB) == expected


# Section: qemu reading what we wrote


def _apply(model: bytearray, offset: int, data: bytes) -> None:
    model[offset : offset + len(data)] = data


def test_our_created_image_is_qemu_compatible(tmp_path: Path, qemu_template: Path) -> None:
    """Same layout as qemu-img create (LUKS area after the L1 table, same slot offsets and
    payload), opens in qemu with the password, check clean, reads zeros."""
    path = tmp_path / "ours.qcow2"
    _create_ours(path).close()
    ours = qemu_img("info", "--output=json", str(path))
    theirs = qemu_img("info", "--output=json", str(qemu_template))
    ours_enc = json.loads(ours.stdout)["format-specific"]["data"]["encrypt"]
    theirs_enc = json.loads(theirs.stdout)["format-specific"]["data"]["encrypt"]
    for enc in (ours_enc, theirs_enc):
        del enc["uuid"], enc["master-key-iters"], enc["slots"][0]["iters"]
    assert ours_enc == theirs_enc
    with qcow2.open(str(path)) as a, qcow2.open(str(qemu_template)) as b:
        assert a.header.crypto_header == b.header.crypto_header
        assert a.header.crypt_method == layout.CRYPT_LUKS
    assert os.path.getsize(path) == os.path.getsize(qemu_template)
    result = q_check(path)
    assert result["exit-code"] == 0 and result["check-errors"] == 0
    assert q_raw(path) == bytes(SIZE)


@pytest.mark.parametrize(
    "options",
    [{}, {"extended_l2": True}, {"version": 2}],
    ids=["std", "extl2", "v2"],
)
def test_our_writes_read_back_in_qemu(tmp_path: Path, options: dict[str, Any]) -> None:
    """v2 writes zeroes as encrypted zero data; v3 uses zero flags / subcluster bits."""
    path = tmp_path / "ours.qcow2"
    model = bytearray(SIZE)
    snap = b""
    with _create_ours(path, **options) as image:
        for offset, data in (
            (0, b"\x5a" * 100_000),  # new clusters, partial last sector
            (70_000, b"hello"),  # in place, inside one sector
            (65_530, bytes(range(256)) * 3),  # across a cluster boundary, unaligned
            (2 * MIB - 300, b"\xee" * 5000),
        ):
            image.write(offset, data)
            _apply(model, offset, data)
        image.create_snapshot("s1")
        snap = bytes(model)
        for offset, data in ((1000, b"abc" * 1000), (2 * MIB + 100, b"\x01" * 10)):
            image.write(offset, data)  # COW: re-encrypted for the new host cluster
            _apply(model, offset, data)
        image.write_zeroes(64 * 1024, 64 * 1024)
        _apply(model, 64 * 1024, bytes(64 * 1024))
        image.write_zeroes(100, 50)  # partial: plaintext read-modify-write
        _apply(model, 100, bytes(50))
        image.discard(2 * MIB - 65536, 65536)
        _apply(model, 2 * MIB - 65536, bytes(65536))
        assert image.read(0, SIZE) == model
    assert q_raw(path) == model
    assert q_raw(path, snapshot="s1") == snap
    result = q_check(path)
    assert result["exit-code"] == 0 and result["check-errors"] == 0
    with qcow2.open(str(path), key_secret=SECRET) as image:
        assert image.read(0, SIZE) == model
        assert image.snapshot("s1").read(0, SIZE) == snap


def test_our_writes_over_qemu_clusters(qemu_image: Path) -> None:
    """In-place and COW writes into clusters qemu encrypted."""
    q_io(qemu_image, "write -P 0x5a 0 256k", "write -c -P 0x33 1M 64k")
    model = bytearray(q_raw(qemu_image))
    with qcow2.open(str(qemu_image), writable=True, key_secret=SECRET) as image:
        for offset, data in ((10, b"x" * 7), (130_000, b"y" * 70_000), (MIB + 5, b"z")):
            image.write(offset, data)
            _apply(model, offset, data)
        image.create_snapshot("s1")
        image.write(200_000, b"w" * 1000)
        _apply(model, 200_000, b"w" * 1000)
    assert q_raw(qemu_image) == model
    theirs = q_check(qemu_image)
    assert theirs["exit-code"] == 0
    with qcow2.open(str(qemu_image), key_secret=SECRET) as image:
        ours = image.check()  # metadata only: the LUKS area counts as a referenced range
    assert (ours.corruptions, ours.leaks, ours.allocated_clusters, ours.image_end_offset) == (
        0,
        0,
        theirs["allocated-clusters"],
        theirs["image-end-offset"],
    )


def test_shrink_and_grow_keep_encrypted_tail_zero(tmp_path: Path) -> None:
    path = tmp_path / "ours.qcow2"
    with _create_ours(path) as image:
        image.write(0, b"\x99" * SIZE)
        image.resize(MIB + 1536)  # the rest of that cluster becomes encrypted zeros
        image.resize(SIZE)
    model = b"\x99" * (MIB + 1536) + bytes(SIZE - MIB - 1536)
    assert q_raw(path) == model
    assert q_check(path)["exit-code"] == 0


# Section: what is on disk


def test_data_on_disk_is_ciphertext_and_luks_area_untouched(tmp_path: Path) -> None:
    path = tmp_path / "ours.qcow2"
    marker = b"PLAINTEXT-MARKER-" * 64
    _create_ours(path).close()
    area_before = _luks_area(path)
    with qcow2.open(str(path), writable=True, key_secret=SECRET) as image:
        for offset in (0, 5000, 70_000, 3 * MIB + 17):
            image.write(offset, marker)
        image.create_snapshot("s")
        image.write(5001, marker)  # COW
    raw = path.read_bytes()
    assert b"PLAINTEXT-MARKER" not in raw
    assert _luks_area(path) == area_before
    assert q_raw(path).count(marker) >= 3  # and qemu decrypts them


def test_same_plaintext_differs_per_host_offset(tmp_path: Path) -> None:
    """plain64 IV = host sector: identical clusters at different host offsets encrypt
    differently, and qemu still reads both (so the IV really is the host offset)."""
    path = tmp_path / "ours.qcow2"
    block = b"\x42" * 65536
    with _create_ours(path) as image:
        image.write(0, block)
        image.write(MIB, block)
        host_a = image.clusters.lookup(0)[1]
        host_b = image.clusters.lookup(MIB)[1]
    raw = path.read_bytes()
    assert host_a != host_b
    assert raw[host_a : host_a + 65536] != raw[host_b : host_b + 65536]
    data = q_raw(path)
    assert data[:65536] == block and data[MIB : MIB + 65536] == block


# Section: keys


def test_wrong_key_refused_like_qemu(qemu_image: Path, tmp_path: Path) -> None:
    with pytest.raises(errors.EncryptionKeyError, match="Invalid password, cannot unlock any"):
        qcow2.open(str(qemu_image), key_secret=b"wrong")
    ours = tmp_path / "ours.qcow2"
    _create_ours(ours).close()
    with pytest.raises(errors.EncryptionKeyError) as err:
        qcow2.open(str(ours), key_secret=b"PASs")
    assert str(err.value) == f"{ours}: {errors.EncryptionKeyError.WRONG_KEY}"
    proc = qemu_img(
        "check",
        "--object",
        "secret,id=bad,data=PASs",
        "--image-opts",
        _image_opts(ours, secret_id="bad"),
        ok=(1,),
    )
    assert b"Invalid password, cannot unlock any keyslot" in proc.stderr


def test_missing_key_allows_info_but_no_io(qemu_image: Path) -> None:
    q_io(qemu_image, "write -P 0x5a 0 64k")
    before = qemu_image.read_bytes()
    with qcow2.open(str(qemu_image), writable=True) as image:
        assert image_info(image)["encrypted"] is True
        assert image.snapshots == []
        calls = (
            lambda: image.read(0, 512),
            lambda: image.write(0, b"x"),
            lambda: image.write_zeroes(0, 65536),
            lambda: image.discard(0, 65536),
            lambda: image.create_snapshot("s"),
            lambda: image.resize(SIZE * 2),
            lambda: image.check(),
        )
        for call in calls:
            with pytest.raises(errors.EncryptionKeyError) as err:
                call()
            assert err.value.message == errors.EncryptionKeyError.MISSING_KEY
    assert qemu_image.read_bytes() == before


def test_commit_atomically_encrypts_for_the_new_host_offsets(tmp_path: Path) -> None:
    path = tmp_path / "ours.qcow2"
    model = bytearray(SIZE)
    with _create_ours(path) as image:
        image.write(0, b"a" * 70000)
        model[0:70000] = b"a" * 70000
        image.create_snapshot("before")
        writes = [(100, b"b" * 512), (65536 - 10, b"c" * 30), (200000, b"d" * 4096)]
        image.commit_atomically(writes)
        for offset, data in writes:
            model[offset : offset + len(data)] = data
        assert image.read(0, SIZE) == bytes(model)
    raw = path.read_bytes()
    for _, data in writes:
        assert data not in raw  # nothing stored in plaintext
    assert q_raw(path) == bytes(model)  # qemu-img decrypts what the commit staged
    assert q_check(path)["exit-code"] == 0


# Section: primitives and bad input


def test_af_split_merge_roundtrip() -> None:
    key = os.urandom(64)
    for hash_spec in crypto.HASHES:
        split = crypto.af_split(hash_spec, key, 50)
        assert len(split) == 64 * 50
        assert crypto.af_merge(hash_spec, split, 64, 50) == key
        damaged = bytes(split[:-1]) + bytes([split[-1] ^ 1])  # never equal to split
        assert crypto.af_merge(hash_spec, damaged, 64, 50) != key


@pytest.mark.parametrize(
    ("patch", "error", "message"),
    [
        (lambda a: b"XXXX" + a[4:], InvalidImageError, "Volume is not in LUKS format"),
        (lambda a: a[:40] + b"cbc-essiv".ljust(32, b"\0") + a[72:], UnsupportedFeatureError,
         "xts-plain64"),
        (lambda a: a[:72] + b"md5".ljust(32, b"\0") + a[104:], UnsupportedFeatureError, "md5"),
        (lambda a: a[:208 + 40] + (10**6).to_bytes(4, "big") + a[208 + 44:], InvalidImageError,
         "key slot 0 key material offset"),
        (lambda a: a[:208 + 44] + (7).to_bytes(4, "big") + a[208 + 48:], InvalidImageError,
         "stripes 7"),
        (lambda a: a[:208 + 4] + (2**32 - 1).to_bytes(4, "big") + a[208 + 8:], InvalidImageError,
         "key slot 0 iterations 4294967295 invalid"),
        (lambda a: a[:164] + (2**31).to_bytes(4, "big") + a[168:], InvalidImageError,
         "mk_digest_iter 2147483648 invalid"),
    ],
    ids=["magic", "cipher-mode", "hash", "slot-offset", "stripes", "slot-iters", "mk-iters"],
)  # fmt: skip
def test_malformed_luks_header_is_a_typed_one_line_error(
    tmp_path: Path, patch: Any, error: type[Exception], message: str
) -> None:
    path = tmp_path / "ours.qcow2"
    _create_ours(path).close()
    with qcow2.open(str(path)) as image:
        area = image.header.crypto_header
    assert area is not None
    raw = bytearray(path.read_bytes())
    raw[area[0] : area[0] + 592] = patch(bytes(raw[area[0] : area[0] + 592]))
    path.write_bytes(raw)
    with pytest.raises(error, match=message) as err:
        qcow2.open(str(path), key_secret=SECRET)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_missing_crypto_extension(tmp_path: Path) -> None:
    path = tmp_path / "plain.qcow2"
    qcow2.create(str(path), MIB).close()
    raw = bytearray(path.read_bytes())
    offset = layout.field_offset("crypt_method")
    raw[offset : offset + 4] = layout.CRYPT_LUKS.to_bytes(4, "big")  # and no 0x0537be77
    path.write_bytes(raw)
    with pytest.raises(InvalidImageError, match="Missing CRYPTO header for crypt method 2"):
        qcow2.open(str(path), key_secret=SECRET)


def test_legacy_aes_images_read_like_qemu_and_refuse_writes(tmp_path: Path) -> None:
    """crypt_method 1 (AES-128-CBC, guest-sector IVs): read-only, compared to qemu-img."""
    path = tmp_path / "aes.qcow2"
    qemu_img(
        "create", "-q", "-f", "qcow2", *_OBJECT, "-o", "encrypt.format=aes,encrypt.key-secret=sec0",
        str(path), str(MIB),
    )  # fmt: skip
    q_io(path, "write -P 0x5a 1000 70000", "write -c -P 0x33 512k 64k", "write -z 768k 64k")
    expected = q_raw(path)
    assert expected[1000:1004] == b"ZZZZ"
    with qcow2.open(str(path), key_secret=SECRET) as image:
        assert image.read(0, MIB) == expected
        assert image.read(1001, 3) == expected[1001:1004]
    with pytest.raises(UnsupportedFeatureError, match="can only be opened read-only"):
        qcow2.open(str(path), writable=True, key_secret=SECRET)
    with qcow2.open(str(path)) as image, pytest.raises(errors.EncryptionKeyError):
        image.read(0, 512)


def test_create_refuses_unknown_format_and_hash(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFeatureError, match=r"encrypt\.format 'aes'"):
        qcow2.create(str(tmp_path / "a"), MIB, encrypt_key_secret=SECRET, encrypt_format="aes")
    with pytest.raises(UnsupportedFeatureError, match="md5"):
        qcow2.create(str(tmp_path / "b"), MIB, encrypt_key_secret=SECRET, encrypt_hash="md5")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("cluster_size", "extended_l2"),
    [(512, False), (4096, False), (16384, True)],
    ids=["512", "4k", "16k-extl2"],
)
def test_random_operations_match_a_model_in_qemu(
    tmp_path: Path, cluster_size: int, extended_l2: bool
) -> None:
    """Seeded random writes, zeroes, discards and snapshots; qemu-img reads the model."""
    rng = random.Random(cluster_size)
    size = MIB
    path = tmp_path / "ours.qcow2"
    model = bytearray(size)
    snapshots: dict[str, bytes] = {}
    with _create_ours(path, size, cluster_size=cluster_size, extended_l2=extended_l2) as image:
        for step in range(40):
            offset = rng.randrange(size)
            length = min(rng.randrange(1, 3 * cluster_size + 700), size - offset)
            op = rng.random()
            if op < 0.6:
                data = rng.randbytes(length)
                image.write(offset, data)
                model[offset : offset + length] = data
            elif op < 0.75:
                image.write_zeroes(offset, length, unmap=rng.random() < 0.5)
                model[offset : offset + length] = bytes(length)
            elif op < 0.9:
                before = image.read(0, size)
                image.discard(offset, length)
                after = image.read(0, size)
                # discard may leave partial clusters alone: what changed reads as zeros
                for pos in range(size):
                    if before[pos] != after[pos]:
                        assert after[pos] == 0
                model[:] = after
            else:
                name = f"s{step}"
                image.create_snapshot(name)
                snapshots[name] = bytes(model)
        assert image.read(0, size) == model
    assert q_raw(path) == model
    for name, content in snapshots.items():
        assert q_raw(path, snapshot=name) == content
    result = q_check(path)
    assert result["exit-code"] == 0 and result["check-errors"] == 0


def _xts_per_sector(key: bytes, offset: int, data: bytes, encrypt: bool) -> bytes:
    """Reference: one ``modes.XTS`` context per 512-byte sector, IV = sector number."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    out = bytearray()
    for pos in range(0, len(data), 512):
        tweak = ((offset + pos) // 512).to_bytes(16, "little")
        cipher = Cipher(algorithms.AES(key), modes.XTS(tweak))
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        out += ctx.update(data[pos : pos + 512])
    return bytes(out)


@pytest.mark.parametrize("key_bytes", [32, 64])
def test_batched_xts_matches_per_sector_xts(key_bytes: int) -> None:
    rng = random.Random(key_bytes)
    key = rng.randbytes(key_bytes)
    cipher = crypto.SectorCipher(key)
    for sectors in (1, 3, 4, 5, 63, 64, 65, 200):
        for offset in (0, 512 * rng.randrange(1 << 20), (1 << 63) - 512 * sectors):
            data = rng.randbytes(512 * sectors)
            assert cipher.encrypt(offset, data) == _xts_per_sector(key, offset, data, True)
            assert cipher.decrypt(offset, data) == _xts_per_sector(key, offset, data, False)
    with pytest.raises(ValueError):
        cipher.encrypt(100, bytes(512))


def test_data_never_lands_on_the_luks_area_of_a_corrupt_image(tmp_path: Path) -> None:
    """With the LUKS area's refcounts zeroed (a corrupt image), a write that would
    allocate over it is refused and the key slots survive."""
    path = tmp_path / "ours.qcow2"
    _create_ours(path).close()
    area_before = _luks_area(path)
    with qcow2.open(str(path)) as image:
        offset, length = image.header.crypto_header or (0, 0)
        refblock = image.refcounts.block_offsets
    assert offset and len(refblock) == 1
    (block,) = refblock
    raw = bytearray(path.read_bytes())
    cs = 65536
    for cluster in range(offset // cs, layout.align_up(offset + length, cs) // cs):
        raw[block + 2 * cluster : block + 2 * cluster + 2] = bytes(2)
    path.write_bytes(raw)
    image = qcow2.open(str(path), writable=True, key_secret=SECRET)
    try:
        with pytest.raises(CorruptImageError, match="overlaps with crypto header"):
            image.write(0, b"x" * 65536)
    finally:
        image.close()
    assert _luks_area(path) == area_before


def test_encrypt_data_is_what_a_host_cluster_must_hold(tmp_path: Path) -> None:
    """``Image.encrypt_data`` (for modules staging data clusters themselves): bytes written
    at a host cluster read back in qemu as the plaintext; identity on plain images."""
    path = tmp_path / "ours.qcow2"
    new = random.Random(3).randbytes(65536)
    with _create_ours(path) as image:
        image.write(MIB, b"old" * 1000)
        host = image.clusters.lookup(MIB)[1]
        image.file.pwrite(host, image.encrypt_data(host, new))
    assert q_raw(path)[MIB : MIB + 65536] == new
    with qcow2.create(str(tmp_path / "plain.qcow2"), MIB) as plain:
        assert plain.encrypt_data(65536, new) == new


def _iters(path: Path) -> tuple[int, int]:
    info = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    encrypt = info["format-specific"]["data"]["encrypt"]
    return encrypt["master-key-iters"], encrypt["slots"][0]["iters"]


def test_iter_time_zero_gives_minimum_iterations(tmp_path: Path) -> None:
    """encrypt.iter-time=0: the minimum iteration counts, as qemu-img create gives."""
    theirs = tmp_path / "theirs.qcow2"
    for _attempt in range(5):  # qemu's benchmark may fail on a busy host
        proc = qemu_img(
            "create", "-q", "-f", "qcow2", *_OBJECT, "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=0", str(theirs), "1M",
            ok=(0, 1),
        )  # fmt: skip
        if proc.returncode == 0:
            break
    path = tmp_path / "ours.qcow2"
    qcow2.create(str(path), MIB, encrypt_key_secret=SECRET, encrypt_iter_time=0).close()
    assert _iters(path) == _iters(theirs)
    assert q_raw(path) == bytes(MIB)  # qemu unlocks it
    with pytest.raises(UnsupportedFeatureError, match="negative"):
        qcow2.create(str(tmp_path / "n"), MIB, encrypt_key_secret=SECRET, encrypt_iter_time=-1)
    assert not (tmp_path / "n").exists()


def test_unlocks_with_any_active_key_slot(qemu_image: Path) -> None:
    """A second passphrase added by ``qemu-img amend`` in key slot 3 opens the image too."""
    q_io(qemu_image, "write -P 0x5a 0 64k")
    qemu_img(
        "amend", *_OBJECT, "--object", "secret,id=sec1,data=OTHER", "-o",
        "encrypt.new-secret=sec1,encrypt.state=active,encrypt.keyslot=3,encrypt.iter-time=10",
        "--image-opts", _image_opts(qemu_image),
    )  # fmt: skip
    expected = q_raw(qemu_image)
    for secret in (SECRET, b"OTHER"):
        with qcow2.open(str(qemu_image), key_secret=secret) as image:
            assert image.read(0, SIZE) == expected
    with pytest.raises(errors.EncryptionKeyError):
        qcow2.open(str(qemu_image), key_secret=b"OTHER2")
