"""Finding an earlier TPM state swtpm loads, for images whose current state it refuses.

Where earlier states live (issue 9: the file view once committed half-done stores):

* **Freed generations.**  Every commit (:meth:`qcow2.Image.commit_atomically`) writes a new
  active L2 table and new data clusters, switches the header, and frees the previous
  generation's L1/L2 tables and replaced data clusters (refcount 0).  They stay on disk
  until a later commit allocates them again; metadata transactions allocate the lowest
  free clusters first, so usually only the generation just before the current one is
  still whole.  :func:`freed_generations` reads every unused cluster (refcount 0, or
  leaked) that parses as an L2 table, takes it as the first L2 table (the linear file's
  start: swtpm's state lives in its first few dozen KiB), rebuilds the linear layout
  through it and keeps those whose layout passes :func:`vtpm_qcow.state.probe.layout_problem`.
* **Snapshots**, newest first (:func:`snapshot_states`).

Ranking of freed generations (a heuristic, see :func:`freed_generations`): most data
clusters shared with the current active L2 table first.  The generation just before the
current one differs from it only in the clusters the last commit replaced; older ones
differ in more.  Its limits: the bytes of a freed cluster may have been reused and freed
again since (a data cluster that is neither free nor mapped at the same guest offset by
the image disqualifies a candidate, but a reused-then-freed one cannot be told apart);
two orphan tables sharing as many clusters are ordered by host offset, highest first,
which says nothing about age.  A candidate is only restored after a real swtpm loaded it.

:func:`find_loadable` tries the candidates in order with a dry load; :func:`restore`
keeps the current (broken) state as a snapshot and makes the winner current.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from qcow2.format import layout as qlayout
from qcow2.scan import guest_mappings, parse_l2_table, read_host, unused_clusters

from ..errors import StateFormatError, StoreError
from . import linear
from .probe import ProbeResult, layout_problem, probe_layout
from .store import MAX_LAYOUT, Store, digest

#: Prefix of the snapshot that keeps a state swtpm did not load when a repair replaces it.
UNLOADABLE_PREFIX: Final = "unloadable-"


@dataclass(frozen=True)
class Candidate:
    """An earlier TPM state: its linear layout and where it was found."""

    #: "freed" (a previous generation in unused clusters) or "snapshot".
    kind: str
    #: The linear file's bytes up to the end of its last section.
    layout: bytes
    #: freed: host offset of the orphan L2 table; snapshot: None.
    l2_offset: int | None = None
    #: freed: data clusters shared with the current active L2 table (the ranking key).
    shared: int = 0
    #: snapshot: its tag and date.
    tag: str | None = None
    date: dt.datetime | None = None

    @property
    def description(self) -> str:
        """``the previous generation found in freed cluster 0x...`` or ``snapshot 'X' (date)``."""
        if self.kind == "freed":
            return f"the previous generation found in freed cluster 0x{self.l2_offset:x}"
        when = self.date.strftime("%Y-%m-%d %H:%M:%S UTC") if self.date else "no date"
        return f"snapshot '{self.tag}' ({when})"

    @property
    def digest(self) -> str:
        """xxh3-128 of the layout (candidates with equal layouts are one state)."""
        return digest(self.layout)


@dataclass(frozen=True)
class Rejected:
    """A candidate that did not load, and why (one line)."""

    candidate: Candidate
    reason: str


def _layout_through(
    store: Store, entries: list[int], usable: Callable[[int, int], bool]
) -> bytes | str:
    """The linear layout read through the L2 ``entries`` of the first L2 table, or why not.

    ``usable(guest, host)`` says whether a host cluster may still hold that generation's
    data for guest offset ``guest``.
    """
    image = store.image
    cs = image.cluster_size
    cache: dict[int, bytes] = {}

    def cluster(index: int) -> bytes | str:
        if index in cache:
            return cache[index]
        entry = entries[index]
        if entry & qlayout.OFLAG_COMPRESSED:
            return f"guest cluster {index} is compressed"
        host = entry & qlayout.L2E_OFFSET_MASK
        if not host or entry & qlayout.OFLAG_ZERO:
            data = bytes(cs)
        elif not usable(index * cs, host):
            return f"cluster 0x{host:x} (guest 0x{index * cs:x}) has been reused since"
        else:
            data = read_host(image, host, cs)
        cache[index] = data
        return data

    first = cluster(0)
    if isinstance(first, str):
        return first
    head = first[: linear.HEADER_SIZE]
    if not linear.is_formatted(head):
        return "its first cluster holds no linear state header"
    try:
        end = linear.parse_header(head, size=store.linear_size, source="candidate").end
    except StateFormatError as err:
        return str(err)
    if end > min(MAX_LAYOUT, len(entries) * cs):
        return f"its layout ends at {end}, beyond the first L2 table's reach"
    chunks = []
    for index in range(-(-end // cs)):
        data = cluster(index)
        if isinstance(data, str):
            return data
        chunks.append(data)
    return b"".join(chunks)[:end]


def freed_generations(store: Store) -> Iterator[Candidate | Rejected]:
    """Earlier generations found in unused clusters, best first (most data clusters shared
    with the current active L2 table, then highest host offset); layouts that fail
    :func:`~vtpm_qcow.state.probe.layout_problem` come as :class:`Rejected`.

    Only uncompressed, unencrypted images with standard L2 entries are scanned.
    """
    image = store.image
    if image.encrypted:
        return
    cs = image.cluster_size
    unused = unused_clusters(image)
    free = set(unused)
    reach = min(MAX_LAYOUT, image.header.l2_entries * cs)
    mapped = guest_mappings(image, reach)
    active = guest_mappings(image, reach, snapshots=False)

    def usable(guest: int, host: int) -> bool:
        return host in free or (guest, host) in mapped

    found: list[Candidate] = []
    rejected: list[Rejected] = []
    for offset in unused:
        entries = parse_l2_table(image, read_host(image, offset, cs))
        if entries is None:
            continue
        rebuilt = _layout_through(store, entries, usable)
        pairs = {
            (index * cs, entry & qlayout.L2E_OFFSET_MASK)
            for index, entry in enumerate(entries)
            if entry & qlayout.L2E_OFFSET_MASK
        }
        candidate = Candidate("freed", b"", l2_offset=offset, shared=len(pairs & active))
        if isinstance(rebuilt, str):
            if rebuilt != "its first cluster holds no linear state header":
                rejected.append(Rejected(candidate, rebuilt))
            continue  # an old L1 table or refcount table looks like an L2 table too
        candidate = Candidate("freed", rebuilt, l2_offset=offset, shared=candidate.shared)
        problem = layout_problem(rebuilt, source=candidate.description)
        if problem is not None:
            rejected.append(Rejected(candidate, problem))
        else:
            found.append(candidate)
    found.sort(key=lambda c: (c.shared, c.l2_offset or 0), reverse=True)
    yield from found
    yield from rejected


def snapshot_layout(store: Store, tag: str) -> bytes:
    """The linear layout snapshot ``tag`` holds (``b""`` if not formatted)."""
    view = store.image.snapshot(tag, name_only=True)
    size = min(int(view.virtual_size), store.linear_size)
    head = bytes(view.read(0, min(linear.HEADER_SIZE, size)))
    if not linear.is_formatted(head):
        return b""
    header = linear.parse_header(head, size=size, source=f"{store.path}@{tag}")
    if header.end > MAX_LAYOUT:
        raise StateFormatError(f"{store.path}@{tag}: state sections end at {header.end}")
    return bytes(view.read(0, header.end))


def snapshot_states(store: Store) -> Iterator[Candidate | Rejected]:
    """The snapshots' states, newest first; those failing the structural checks (or
    unreadable) come as :class:`Rejected`."""
    snaps = sorted(store.snapshots(), key=lambda s: (s.date, int(s.id)), reverse=True)
    for snap in snaps:
        candidate = Candidate("snapshot", b"", tag=snap.tag, date=snap.date)
        try:
            state = snapshot_layout(store, snap.tag)
        except StateFormatError as err:
            yield Rejected(candidate, str(err))
            continue
        candidate = Candidate("snapshot", state, tag=snap.tag, date=snap.date)
        problem = layout_problem(state, source=candidate.description)
        yield candidate if problem is None else Rejected(candidate, problem)


def find_loadable(
    store: Store,
    *,
    timeout: float = 20.0,
    probe: Callable[..., ProbeResult] = probe_layout,
) -> tuple[Candidate | None, list[Rejected]]:
    """The first candidate a real swtpm loads, freed generations before snapshots, and
    the candidates rejected on the way (states equal to the current one are skipped)."""
    try:
        seen = {digest(store.layout())}
    except StateFormatError:
        seen = set()
    rejected: list[Rejected] = []
    for source in (freed_generations(store), snapshot_states(store)):
        for item in source:
            if isinstance(item, Rejected):
                rejected.append(item)
                continue
            if item.digest in seen:
                continue
            seen.add(item.digest)
            result = probe(item.layout, source=item.description, timeout=timeout)
            if result.loadable:
                return item, rejected
            rejected.append(Rejected(item, result.reason or "not loadable"))
    return None, rejected


def unloadable_tag(store: Store, now: dt.datetime | None = None) -> str:
    """A free snapshot tag ``unloadable-YYYYMMDDTHHMMSSZ`` (``-2``... if taken)."""
    now = dt.datetime.now(dt.UTC) if now is None else now
    base = UNLOADABLE_PREFIX + now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    taken = set(store.snapshot_tags())
    tag, n = base, 1
    while tag in taken:
        n += 1
        tag = f"{base}-{n}"
    return tag


def restore(store: Store, candidate: Candidate, *, keep_as: str | None = None) -> str:
    """Keep the current state as snapshot ``keep_as`` (default :func:`unloadable_tag`),
    then make ``candidate``'s state current; returns the snapshot's tag.

    Two atomic commits: a crash between them leaves the current state as it was, plus
    the snapshot (running the repair again finishes it).
    """
    if not store.writable:
        raise StoreError("opened read-only, cannot restore a state", path=store.path)
    tag = keep_as or unloadable_tag(store)
    store.create_snapshot(tag)
    store.replace_layout(candidate.layout, source=candidate.description)
    if store.layout() != candidate.layout:
        raise StoreError("restored state reads back differently", path=store.path)
    return tag


__all__ = [
    "UNLOADABLE_PREFIX",
    "Candidate",
    "Rejected",
    "find_loadable",
    "freed_generations",
    "restore",
    "snapshot_layout",
    "snapshot_states",
    "unloadable_tag",
]
