"""Faults while writing: ENOSPC and EIO at every host write, flush and truncate (issue 13).

As qemu-iotest 026 arms one ``blkdebug`` rule at a time, :func:`qcow2.io.fileio.fail_host_io`
makes the n-th write (flush, truncate) of the host file fail, for every n an operation
makes: EIO once, and ENOSPC from then on (a full disk stays full, also for ``close``).
The operations: ``commit_atomically``, snapshot create and delete, resize (grow and
shrink) and ``amend -o compat=0.10``; and a commit and a resize that allocate refcount
blocks and move the refcount table.  Each time the operation fails with one typed,
one-line :class:`~qcow2.errors.Qcow2Error`; the image is then ``qemu-img check`` clean
(leaks at most), opens again (read-write, through the library), and holds the state of
before or of after the operation: content, snapshot names and snapshot contents, as
qemu-img reads them.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import qcow2
from qcow2.errors import Qcow2Error
from qcow2.format.header import read_header
from qcow2.io.fileio import HostFile, fail_host_io
from qcow2.io.lock import lock_image
from qcow2.tools.amend import amend_image
from tests.qcow2 import oracle

KiB = 1024
SIZE = 512 * KiB
CLUSTER = 4096


@dataclass(frozen=True)
class State:
    """What qemu-img reads of an image: size, active content, snapshots and theirs."""

    compat: str
    content: bytes
    snapshots: tuple[tuple[str, bytes], ...]


def state(path: Path) -> State:
    names = [s["name"] for s in oracle.snapshot_list(path)]
    return State(
        oracle.info(path)["format-specific"]["data"]["compat"],
        oracle.convert(path),
        tuple((n, oracle.convert(path, snapshot=n)) for n in names),
    )


def partly_shrunk(got: State, before: State, after: State) -> bool:
    """Whether ``got`` is what a shrink from ``before`` to ``after`` that failed half way
    may leave: as in QEMU, a shrink drops the clusters past the new end before it switches
    the size, so at the old size the part past the new end reads as before or as zeros;
    everything up to the new end (active and snapshot content) is as before."""
    keep = len(after.content)

    def kept(data: bytes, old: bytes) -> bool:
        if len(data) != len(old) or data[:keep] != old[:keep]:
            return False
        spans = [
            (max(i, keep), i + CLUSTER)
            for i in range(keep // CLUSTER * CLUSTER, len(data), CLUSTER)
        ]
        return all(data[a:b] in (old[a:b], bytes(len(data[a:b]))) for a, b in spans)

    return (
        got.compat == before.compat
        and [n for n, _ in got.snapshots] == [n for n, _ in before.snapshots]
        and kept(got.content, before.content)
        and all(kept(a[1], b[1]) for a, b in zip(got.snapshots, before.snapshots, strict=True))
    )


def _amend_v2(path: Path) -> None:
    """``qcow2 amend -o compat=0.10`` as the command runs it (qcow2/cli/main.py)."""
    f = HostFile(str(path), writable=True)
    try:
        lock_image(f.fd, str(path), writable=True)
        amend_image(f, read_header(f, writable=True), version=2)
    finally:
        f.close()


def _on_image(op: Callable[[qcow2.Image], object]) -> Callable[[Path], None]:
    def run(path: Path) -> None:
        with qcow2.open(str(path), writable=True) as image:
            op(image)

    return run


OPERATIONS: dict[str, Callable[[Path], None]] = {
    "commit": _on_image(
        lambda i: i.commit_atomically([(100, b"\xee" * 5900), (300 * KiB, b"\xef" * 9000)])
    ),
    "snapshot_create": _on_image(lambda i: i.create_snapshot("t")),
    "snapshot_delete": _on_image(lambda i: i.delete_snapshot("s")),
    "resize_grow": _on_image(lambda i: i.resize(8 * SIZE)),
    "resize_shrink": _on_image(lambda i: i.resize(SIZE // 4 + 512)),
    "amend": _amend_v2,
}


def prepared_image(path: Path) -> Path:
    """Data, a snapshot, data over it, zero clusters (amend expands them), a compressed one.

    (Not a zero cluster over one the snapshot shares: QEMU 7.2's downgrade writes zeros
    into the shared cluster and leaves it COPIED with refcount 2; ``amend`` does as QEMU.)"""
    img = oracle.create(path, SIZE, cluster_size=CLUSTER)
    oracle.qemu_io(img, "write -P 0x31 0 32k", "write -c -P 0x33 256k 4k")
    oracle.snapshot(img, "create", "s")
    oracle.qemu_io(
        img,
        "write -P 0x32 4k 4k",
        "write -P 0x35 40k 4k",
        "write -z 40k 4k",  # a zero cluster owning a host cluster: amend writes zeros there
        "write -z 48k 4k",  # a plain zero cluster: amend unallocates it
        "write -P 0x34 140k 8k",
    )
    return img


def _calls(op: Callable[[Path], None], path: Path) -> dict[str, int]:
    """How many writes, flushes and truncates ``op`` makes on ``path`` (which it changes)."""
    with (
        fail_host_io("write", 0) as writes,
        fail_host_io("flush", 0) as flushes,
        fail_host_io("truncate", 0) as truncates,
    ):
        op(path)
    return {"write": writes.seen, "flush": flushes.seen, "truncate": truncates.seen}


def near_refcount_table_end(path: Path) -> Path:
    """512-byte clusters, data up to just below 8 MiB of file: the end of what the
    one-cluster refcount table covers, so the next allocations need a new refcount block
    and a bigger refcount table."""
    img = oracle.create(path, 16 << 20, cluster_size=512)
    oracle.qemu_io(img, "write -P 0x41 0 7900k")
    return img


#: Operations that also allocate refcount blocks and grow the refcount table: a commit
#: (one metadata transaction) and a resize whose bigger L1 table crosses the table's end.
GROWING: dict[str, Callable[[Path], None]] = {
    "commit_new_reftable": _on_image(
        lambda i: i.commit_atomically([(9 << 20, b"\x42" * 300 * KiB)])
    ),
    "resize_new_reftable": _on_image(lambda i: i.resize(1 << 30)),
}


@pytest.mark.parametrize("name", [*OPERATIONS, *GROWING])
def test_fault_at_every_host_call(tmp_path: Path, name: str) -> None:
    if name in GROWING:
        op = GROWING[name]
        base = near_refcount_table_end(tmp_path / "base.qcow2").read_bytes()
    else:
        op = OPERATIONS[name]
        base = prepared_image(tmp_path / "base.qcow2").read_bytes()
    before_path = tmp_path / "before.qcow2"
    before_path.write_bytes(base)
    before = state(before_path)
    after_path = tmp_path / "after.qcow2"
    after_path.write_bytes(base)
    calls = _calls(op, after_path)
    after = state(after_path)
    assert before != after
    oracle.assert_clean(after_path)
    if name in GROWING:  # the refcount table did move
        assert after_path.read_bytes()[48:56] != base[48:56]
    assert calls["write"] > 1 and calls["flush"] > 1, calls
    img = tmp_path / "img.qcow2"
    tried = 0
    for kind, count in calls.items():
        for nth in range(1, count + 1):
            for err, once in ((errno.EIO, True), (errno.ENOSPC, False)):
                where = f"{name}: {errno.errorcode[err]} at {kind} {nth}/{count}"
                img.write_bytes(base)
                with fail_host_io(kind, nth, err, once=once) as fault:
                    try:
                        op(img)
                    except Qcow2Error as failure:
                        message, code = str(failure), failure.errno
                    else:
                        message, code = "", 0
                assert fault.fired, where
                assert message, f"{where}: the operation succeeded"
                assert "\n" not in message, f"{where}: {message!r}"
                assert code == err, f"{where}: {message} (errno {code})"
                result = oracle.check(img)
                assert result["exit-code"] in (oracle.CHECK_CLEAN, oracle.CHECK_LEAKS), (
                    f"{where}: {message}: check exit {result['exit-code']}: {result['stderr']}"
                )
                with qcow2.open(str(img), writable=True):
                    pass
                got = state(img)
                assert got in (before, after) or (
                    name == "resize_shrink" and partly_shrunk(got, before, after)
                ), f"{where}: {message}: neither before nor after"
                tried += 1
    assert tried == 2 * sum(calls.values())
