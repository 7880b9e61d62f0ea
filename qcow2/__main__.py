"""``python -m qcow2``: the qemu-img compatible command (see :mod:`qcow2.cli.main`)."""

import sys

from .cli.main import main

sys.exit(main())
