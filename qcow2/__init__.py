"""A pure-Python qcow2 reader/writer with internal snapshots, interchangeable with qemu-img.

Layers, bottom up (``tests/qcow2/test_layers.py`` keeps them): ``errors``; ``io/`` (host
file, locks, table cache); ``format/`` (on-disk structures); the driver (``image``, the one
reader and writer, and the modules it ties together); ``tools/`` (qemu-img's subcommands on
top of an image); ``cli/`` (the ``qcow2`` command).  See docs/ARCHITECTURE.md.

The public names are loaded on first use (module ``__getattr__``), so that ``import qcow2``
and the ``qcow2`` command stay cheap: a subcommand imports only the modules it needs.

Modules on the read path of ``qcow2 info|check|snapshot -l|map`` import no ``typing``,
``dataclasses``, ``enum``, ``re``, ``collections``, ``contextlib`` or ``shutil`` (each costs
milliseconds of start-up; ``tests/qcow2/test_import_diet.py`` checks it).  One convention
in every module: imports needed only by annotations sit under ``if TYPE_CHECKING:`` with a
module constant ``TYPE_CHECKING = False`` (type checkers and linters treat that name as
``typing.TYPE_CHECKING``); record classes are plain classes with ``__slots__``.
"""

from __future__ import annotations

from .errors import (
    BackingChainError,
    BackingOpenError,
    CorruptImageError,
    EncryptionKeyError,
    ImageLockedError,
    InvalidImageError,
    NoVmStateError,
    OpenOptionError,
    OutOfRangeError,
    Qcow2Error,
    Qcow2IOError,
    ReadOnlyError,
    SnapshotError,
    SnapshotNotFoundError,
    UnsupportedFeatureError,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .image import Image, create, open

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
    "NoVmStateError",
    "BackingChainError",
    "BackingOpenError",
    "EncryptionKeyError",
    "Qcow2IOError",
    "OutOfRangeError",
    "OpenOptionError",
]

#: Public names defined outside :mod:`qcow2.errors`, and the submodule defining each.
_LAZY = {"open": "image", "create": "image", "Image": "image"}


def __getattr__(name: str) -> object:
    """Import the submodule behind a public name on first access (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # __import__ rather than importlib.import_module: importing importlib costs start-up.
    value = getattr(__import__(f"{__name__}.{module}", fromlist=[name]), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
