"""``qemu-img check``'s report around the driver's check (:mod:`qcow2.check`).

The check itself is the driver's: QEMU's check lives in its qcow2 driver, and ``Image``
repairs a dirty image with it when opening it writable.  This module holds what qemu-img
prints of a :class:`~qcow2.check.CheckResult` (its JSON is ``CheckResult.to_json``).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..check import CheckResult


def format_check_human(r: CheckResult) -> str:
    """``qemu-img check``'s human report of ``r`` (what follows the findings)."""
    out = []
    if r.repaired:
        out.append(
            "The following inconsistencies were found and repaired:\n\n"
            f"    {r.leaks_fixed} leaked clusters\n"
            f"    {r.corruptions_fixed} corruptions\n\n"
            "Double checking the fixed image now...\n"
        )
    if not (r.corruptions or r.leaks or r.check_errors):
        out.append("No errors were found on the image.\n")
    else:
        if r.corruptions:
            out.append(
                f"\n{r.corruptions} errors were found on the image.\n"
                "Data may be corrupted, or further writes to the image may corrupt it.\n"
            )
        if r.leaks:
            out.append(
                f"\n{r.leaks} leaked clusters were found on the image.\n"
                "This means waste of disk space, but no harm to data.\n"
            )
        if r.check_errors:
            out.append(f"\n{r.check_errors} internal errors have occurred during the check.\n")
    if r.total_clusters and r.allocated_clusters:
        out.append(
            f"{r.allocated_clusters}/{r.total_clusters} = "
            f"{r.allocated_clusters * 100.0 / r.total_clusters:0.2f}% allocated, "
            f"{r.fragmented_clusters * 100.0 / r.allocated_clusters:0.2f}% fragmented, "
            f"{r.compressed_clusters * 100.0 / r.allocated_clusters:0.2f}% compressed clusters\n"
        )
    if r.image_end_offset:
        out.append(f"Image end offset: {r.image_end_offset}\n")
    return "".join(out)
