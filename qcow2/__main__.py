"""``python -m qcow2``: the qemu-img compatible command (see :mod:`qcow2.cli`)."""

import sys

from .cli import main

sys.exit(main())
