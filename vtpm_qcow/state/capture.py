"""A consistent capture of a store's TPM state: the current layout and its snapshots' layouts.

:func:`capture_store` reads everything in one call; run by the mount daemon between two FUSE
requests (the control socket's ``capture`` op) it sees one committed generation, never a
state half way through an update: the store only holds committed states, and no commit,
snapshot change or FUSE write runs while it reads (:mod:`vtpm_qcow.export.fuse`).  :func:`to_wire` /
:func:`from_wire` carry a capture over the control socket as JSON.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import StateFormatError, StoreError
from . import linear
from .store import MAX_LAYOUT, Store, combined_digest, digest


@dataclass(frozen=True)
class SnapshotCapture:
    """One snapshot's TPM state: its tag, qcow2 id and date, and its linear layout."""

    tag: str
    id: str
    date: str
    vm_state_size: int
    layout: bytes


@dataclass(frozen=True)
class StateCapture:
    """A store's state at one instant: linear layout (``b""`` if unformatted) and snapshots.

    ``generation`` is the store's generation counter when read through a daemon (None for a
    direct read).
    """

    source: str
    linear_size: int
    layout: bytes
    snapshots: tuple[SnapshotCapture, ...]
    generation: int | None = None


def layout_of(read: Callable[[int, int], bytes], size: int, source: str) -> bytes:
    """The linear file read through ``read(offset, length)`` up to the end of its sections.

    ``b""`` if the file is not formatted; a layout past :data:`MAX_LAYOUT` is refused.
    """
    head = bytes(read(0, min(linear.HEADER_SIZE, size)))
    if not linear.is_formatted(head):
        return b""
    header = linear.parse_header(head, size=size, source=source)
    if header.end > MAX_LAYOUT:
        raise StateFormatError(f"state sections end at {header.end}, beyond any TPM", path=source)
    return head + bytes(read(linear.HEADER_SIZE, header.end - linear.HEADER_SIZE))


def capture_store(store: Store, *, tag: str | None = None, snapshots: bool = True) -> StateCapture:
    """Read ``store``'s current state (or snapshot ``tag``'s as the current one) and snapshots.

    With ``tag``, the capture holds that snapshot's state and no snapshots.
    """
    size = store.linear_size
    image = store.image
    if tag is not None:
        if tag not in store.snapshot_tags():
            raise StoreError(f"no snapshot '{tag}'", path=store.path)
        view = image.snapshot(tag, name_only=True)
        layout = layout_of(view.read, min(int(view.virtual_size), size), f"{store.path}@{tag}")
        return StateCapture(store.path, size, layout, (), store.generation)
    snaps = []
    if snapshots:
        for info in store.snapshots():
            view = image.snapshot(info.tag, name_only=True)
            source = f"{store.path}@{info.tag}"
            snap_layout = layout_of(view.read, min(int(view.virtual_size), size), source)
            snaps.append(
                SnapshotCapture(
                    info.tag, info.id, info.date.isoformat(), info.vm_state_size, snap_layout
                )
            )
    layout = layout_of(store.read_linear, size, store.path)
    return StateCapture(store.path, size, layout, tuple(snaps), store.generation)


def section_digests(layout: bytes, source: str) -> dict[str, dict[str, Any]]:
    """``{section: {"size": n, "digest": xxh3_128}}`` of a linear layout's sections."""
    out: dict[str, dict[str, Any]] = {}
    if not layout:
        return out
    for name in linear.SECTION_NAMES:
        blob = linear.read_section(layout, name, source=source)
        if blob is not None:
            out[name] = {"size": len(blob), "digest": digest(blob)}
    return out


def state_digest_of(sections: dict[str, dict[str, Any]]) -> str:
    """The store's ``state_digest`` for sections as :func:`section_digests` gives them."""
    return combined_digest({name: str(s["digest"]) for name, s in sections.items()})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise StoreError(f"capture reply: {what} is not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise StoreError(f"capture reply: {what} is not valid base64") from err


def to_wire(capture: StateCapture) -> dict[str, Any]:
    """A capture as JSON fields (layouts base64)."""
    return {
        "source": capture.source,
        "linear_size": capture.linear_size,
        "generation": capture.generation,
        "layout": _b64(capture.layout),
        "snapshots": [
            {
                "tag": s.tag,
                "id": s.id,
                "date": s.date,
                "vm_state_size": s.vm_state_size,
                "layout": _b64(s.layout),
            }
            for s in capture.snapshots
        ],
    }


def from_wire(reply: dict[str, Any]) -> StateCapture:
    """The capture a ``capture`` reply carries (StoreError if it is malformed)."""
    try:
        snaps = tuple(
            SnapshotCapture(
                str(s["tag"]),
                str(s["id"]),
                str(s["date"]),
                int(s["vm_state_size"]),
                _unb64(s["layout"], f"snapshot {s['tag']!r} layout"),
            )
            for s in reply["snapshots"]
        )
        generation = reply.get("generation")
        return StateCapture(
            str(reply["source"]),
            int(reply["linear_size"]),
            _unb64(reply["layout"], "layout"),
            snaps,
            int(generation) if generation is not None else None,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise StoreError(f"capture reply: missing or malformed field {err}") from err


__all__ = [
    "SnapshotCapture",
    "StateCapture",
    "capture_store",
    "from_wire",
    "layout_of",
    "section_digests",
    "state_digest_of",
    "to_wire",
]
