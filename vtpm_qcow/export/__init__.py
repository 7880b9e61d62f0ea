"""The FUSE views of a store and the mount daemon that serves them (with its control socket)."""
