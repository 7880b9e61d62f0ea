"""libvirt-managed VMs: the domain as the snapshot watcher's VM side, and its hook.

* :mod:`.domain`: what a domain's XML says (disks, TPM, the vtpm-qcow opt-in in its
  ``<metadata>``) and :class:`~.domain.LibvirtVm`, the domain seen through libvirt's own API
  (lifecycle events, state, the disks' snapshot tables) as the watcher's VM side: no QMP
  monitor of our own, so the domain is never tainted.
"""

#: Namespace of the vtpm-qcow element in a domain's ``<metadata>``.
METADATA_URI = "https://github.com/vtpm-qcow/vtpm-qcow/libvirt/1"
#: Its element prefix in the domain XML.
METADATA_PREFIX = "vtpm-qcow"
#: libvirt's URI when none is given (the system daemon, as virsh uses as root).
DEFAULT_URI = "qemu:///system"
