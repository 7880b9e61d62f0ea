"""Shared test configuration.

Tests use the real components (qemu-img, qemu-io, swtpm, FUSE, QEMU).  A missing component
fails the test; it may only skip when VTPM_QCOW_ALLOW_SKIP=1 is set (CI never sets it).
Use :func:`tests.helpers.need` to get a tool's path.
"""
