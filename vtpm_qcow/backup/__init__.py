"""Backups of vTPM images (archive) and plain swtpm state in and out (plainstate)."""

from __future__ import annotations

#: Backup formats (:mod:`vtpm_qcow.backup.archive`); here so that the command's parser
#: lists them without importing the backup code.
FORMATS = ("qcow2", "raw", "dir")
