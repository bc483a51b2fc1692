"""The data-file options shared by every command that reads ``.ts``/``.csv`` data.

One definition, so ``train``, ``verify``, ``eval`` and ``replay`` read a file the same way.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.offline.datasets import MISSING_POLICIES


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data layout (CSV columns; missing values)")
    g.add_argument("--label-column", help="CSV column holding the class label")
    g.add_argument("--time-column", help="CSV column holding timestamps (not a feature)")
    g.add_argument("--case-column", help="CSV column grouping rows into cases (default: one)")
    g.add_argument(
        "--feature-columns", nargs="+", metavar="COL", help="CSV feature columns, in order"
    )
    g.add_argument(
        "--missing",
        default="error",
        choices=MISSING_POLICIES,
        help="missing values: refuse them (default), or hold the channel's last reading",
    )


def data_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for :func:`pipeline.offline.datasets.load` from parsed arguments."""
    return {
        "label_column": args.label_column,
        "time_column": args.time_column,
        "case_column": args.case_column,
        "feature_columns": list(args.feature_columns) if args.feature_columns else None,
        "missing": args.missing,
    }
