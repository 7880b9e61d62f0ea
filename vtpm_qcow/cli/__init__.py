"""The ``vtpm-qcow`` command: main (the parser and most subcommands), mount, vm."""
