"""One rich console for the CLI: full-width tables even when stdout is a pipe or a file."""

from __future__ import annotations

import sys

from rich.console import Console


def console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 160, soft_wrap=False)
