"""A pure-Python qcow2 reader/writer with internal snapshots, interchangeable with qemu-img."""

from __future__ import annotations

from .errors import (
    BackingChainError,
    CorruptImageError,
    ImageLockedError,
    InvalidImageError,
    Qcow2Error,
    Qcow2IOError,
    ReadOnlyError,
    SnapshotError,
    SnapshotNotFoundError,
    UnsupportedFeatureError,
)
from .image import Image, OutOfRangeError, create, open

__all__ = [  # noqa: RUF022 - ordered by importance, as qemu.qmp does
    # Most to least important
    "open",
    "create",
    "Image",
    # Exceptions, most generic to most explicit
    "Qcow2Error",
    "InvalidImageError",
    "CorruptImageError",
    "UnsupportedFeatureError",
    "ImageLockedError",
    "ReadOnlyError",
    "SnapshotError",
    "SnapshotNotFoundError",
    "BackingChainError",
    "Qcow2IOError",
    "OutOfRangeError",
]
