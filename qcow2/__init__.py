"""A pure-Python qcow2 reader/writer with internal snapshots, interchangeable with qemu-img.

The public names are loaded on first use (module ``__getattr__``), so that ``import qcow2``
and the ``qcow2`` command stay cheap: a subcommand imports only the modules it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
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

#: Public names defined outside :mod:`qcow2.errors`, and the submodule defining each.
_LAZY = {"open": "image", "create": "image", "Image": "image", "OutOfRangeError": "image"}


def __getattr__(name: str) -> object:
    """Import the submodule behind a public name on first access (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
