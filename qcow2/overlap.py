"""QEMU's metadata overlap checks: which structures a write is checked against.

The ``overlap-check`` open option of QEMU's qcow2 driver (``block/qcow2.c``,
``qcow2_update_options_prepare``): a template (``none``, ``constant``, ``cached`` the
default, ``all``) whose per-structure flags each ``overlap-check.<name>`` boolean option
may override.  ``cached`` checks everything that needs no disk read, so it does not see
inactive L2 tables (the L2 tables only snapshots use); ``all`` reads the snapshots' L1
tables to check those too.  :meth:`qcow2.image.Image._overlap_check` does the check.
"""

from __future__ import annotations

from .errors import OpenOptionError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

# QEMU's QCow2MetadataOverlap bits, in QEMU's bit order.
MAIN_HEADER = 1 << 0
ACTIVE_L1 = 1 << 1
ACTIVE_L2 = 1 << 2
REFCOUNT_TABLE = 1 << 3
REFCOUNT_BLOCK = 1 << 4
SNAPSHOT_TABLE = 1 << 5
INACTIVE_L1 = 1 << 6
INACTIVE_L2 = 1 << 7
BITMAP_DIRECTORY = 1 << 8

#: the names QEMU's "Preventing invalid write on metadata (overlaps with %s)" uses
NAMES = {
    MAIN_HEADER: "qcow2_header",
    ACTIVE_L1: "active L1 table",
    ACTIVE_L2: "active L2 table",
    REFCOUNT_TABLE: "refcount table",
    REFCOUNT_BLOCK: "refcount block",
    SNAPSHOT_TABLE: "snapshot table",
    INACTIVE_L1: "inactive L1 table",
    INACTIVE_L2: "inactive L2 table",
    BITMAP_DIRECTORY: "bitmap directory",
}

#: the boolean options that override one flag of the template
OPTION_FLAGS = {
    "overlap-check.main-header": MAIN_HEADER,
    "overlap-check.active-l1": ACTIVE_L1,
    "overlap-check.active-l2": ACTIVE_L2,
    "overlap-check.refcount-table": REFCOUNT_TABLE,
    "overlap-check.refcount-block": REFCOUNT_BLOCK,
    "overlap-check.snapshot-table": SNAPSHOT_TABLE,
    "overlap-check.inactive-l1": INACTIVE_L1,
    "overlap-check.inactive-l2": INACTIVE_L2,
    "overlap-check.bitmap-directory": BITMAP_DIRECTORY,
}

CONSTANT = MAIN_HEADER | ACTIVE_L1 | REFCOUNT_TABLE | SNAPSHOT_TABLE | BITMAP_DIRECTORY
CACHED = CONSTANT | ACTIVE_L2 | REFCOUNT_BLOCK | INACTIVE_L1
ALL = CACHED | INACTIVE_L2
TEMPLATES = {"none": 0, "constant": CONSTANT, "cached": CACHED, "all": ALL}
DEFAULT = CACHED


#: every open option this module reads
OPTIONS = frozenset({"overlap-check", "overlap-check.template", *OPTION_FLAGS})


def _bool(name: str, value: str) -> bool:
    """QEMU's ``qapi_bool_parse``."""
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise OpenOptionError(f"Parameter '{name}' expects 'on' or 'off'")


def parse_options(options: Mapping[str, str]) -> int:
    """The overlap-check flags QEMU derives from the open options ``options``
    (``overlap-check.template`` is the template's other spelling); raises
    :class:`~qcow2.errors.OpenOptionError` with QEMU's message for a bad value or an option
    the qcow2 driver does not have."""
    for key in options:
        if key not in OPTIONS:
            raise OpenOptionError(f"Block format 'qcow2' does not support the option '{key}'")
    main = options.get("overlap-check")
    template = options.get("overlap-check.template")
    if main is not None and template is not None and main != template:
        raise OpenOptionError(
            f"Conflicting values for qcow2 options 'overlap-check' ('{main}') and "
            f"'overlap-check.template' ('{template}')"
        )
    name = main if main is not None else template if template is not None else "cached"
    if name not in TEMPLATES:
        raise OpenOptionError(
            f"Unsupported value '{name}' for qcow2 option 'overlap-check'. Allowed are any "
            "of the following: none, constant, cached, all"
        )
    flags = TEMPLATES[name]
    for option, flag in OPTION_FLAGS.items():
        value = options.get(option)
        if value is not None:
            flags = flags | flag if _bool(option, value) else flags & ~flag
    return flags
