"""What qemu-img does on top of an image: ``info``, ``map`` and their QEMU JSON output."""
