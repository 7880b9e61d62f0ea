"""A pure-Python qcow2 reader/writer with internal snapshots, interchangeable with qemu-img."""
