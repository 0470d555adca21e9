"""`tofa`: the command line. Thin: every command calls tofa_core or a flow and prints what it got.

One module per group of commands; importing one registers its commands on `app`.
"""

from __future__ import annotations

import importlib
import sys

from flows.cli.common import app, targets_table

# The order `tofa --help` lists them in: the pipeline first, its stages, then the tools.
for _group in ("run", "data", "training", "targets", "baseline", "stack", "space"):
    importlib.import_module(f"flows.cli.{_group}")

__all__ = ["app", "main", "targets_table"]


def main() -> None:  # pragma: no cover - `python -m flows.cli`
    sys.exit(app())
