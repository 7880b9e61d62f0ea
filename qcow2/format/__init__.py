"""The qcow2 on-disk format, declared once: structures, flags, masks and their codecs.

``layout`` (every structure, flag and mask), ``header`` (cluster 0: parse, validate,
serialize), ``snapshot_table`` (the internal snapshot table) and ``refcount`` (refcount
entries and the refcount table).  Nothing here knows about guest I/O or qemu-img.
"""
