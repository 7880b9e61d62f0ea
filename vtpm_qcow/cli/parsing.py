"""The ``vtpm-qcow`` command's argparse classes: one-line errors, examples kept as written.

A module of their own so that :mod:`vtpm_qcow.cli.main` imports argparse only when it
builds a parser (``info`` and ``snapshot -l`` usually run without one).
"""

from __future__ import annotations

import argparse

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn


class HelpFormatter(argparse.HelpFormatter):
    """Wraps prose paragraphs; keeps paragraphs with indented lines (examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith(" ") for line in lines):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(super()._fill_text(paragraph, width, indent))
        return "\n\n".join(paragraphs)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``vtpm-qcow create: error: ... (see --help)``."""

    #: Exit status of a usage error (``check`` uses 2 for "state not loadable").
    usage_status = 2

    def error(self, message: str) -> NoReturn:
        status = getattr(self, "usage_status", 2)
        self.exit(status, f"{self.prog}: error: {message} (see --help)\n")


__all__ = ["HelpFormatter", "Parser"]
