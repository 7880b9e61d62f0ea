"""The ``qcow2`` command (qemu-img compatible): ``main`` (the subcommands), ``parse``
(getopt_long-style parsing, generated --help) and ``options`` (``--object secret`` and
``--image-opts``).  Runtime modules never import this package."""
