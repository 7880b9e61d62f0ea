"""QEMU over QMP: orchestrated VM snapshots with the vTPM image, and the passive watcher.

The timing defaults live here so that the command's parser shows them without importing
qemu.qmp and asyncio.
"""

from __future__ import annotations

#: Seconds to wait for a QMP answer (connect, greeting, one command).
DEFAULT_TIMEOUT = 10.0
#: Seconds to wait for a snapshot job (large guests need longer to write their RAM).
DEFAULT_JOB_TIMEOUT = 600.0
#: Seconds between the watcher's polls of the disks' snapshot lists.
DEFAULT_POLL_INTERVAL = 1.0
#: Seconds a vTPM-only tag is left alone before the watcher counts it as an orphan.
DEFAULT_GRACE = 5.0
#: Seconds the watcher keeps trying to reconnect after the monitor went away.
DEFAULT_RECONNECT_TIMEOUT = 10.0
