"""What the ``vtpm-qcow`` subcommands print for scripts."""

from __future__ import annotations

from typing import Any


def print_json(value: Any) -> None:
    """``value`` as indented JSON on stdout (``--json``); json is imported only then."""
    import json

    print(json.dumps(value, indent=2))
