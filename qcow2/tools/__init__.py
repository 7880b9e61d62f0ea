"""What qemu-img does on top of an open image: ``info``, ``map``, ``check``'s report,
``amend``, ``convert``/``compare``, and QEMU's JSON (``qemujson``).  Tools import the
driver and the layers below it, never the command (``qcow2.cli``)."""
