"""swtpm's linear state layout and the transactional store that keeps it in a qcow2 image."""
