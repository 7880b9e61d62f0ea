"""What qemu-img does on top of an image: ``info``, ``map`` and their QEMU JSON output,
``amend`` (compat level, lazy refcounts, zero-cluster expansion)."""
