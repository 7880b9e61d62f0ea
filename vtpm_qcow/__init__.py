"""vtpm-qcow: a virtual TPM's state kept in a qcow2 image, following the VM's snapshots."""
