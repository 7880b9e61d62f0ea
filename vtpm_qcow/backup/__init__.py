"""Backups of vTPM images (archive) and plain swtpm state in and out (plainstate)."""
