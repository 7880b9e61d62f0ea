"""The host side of an image: the file (``fileio``), QEMU's OFD locks (``lock``) and the
metadata table cache (``cache``).  Nothing here knows the qcow2 format."""
