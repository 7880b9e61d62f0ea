"""Tests with a real Linux guest (Debian kernel, busybox, tpm2-tools) under QEMU/TCG."""
