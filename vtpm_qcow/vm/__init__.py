"""QEMU over QMP: orchestrated VM snapshots with the vTPM image, and the passive watcher."""
