"""``seqstream eval MODEL.onnx --data PATH``: step-by-step metrics as JSON, without torch.

Thin: parses arguments, reads the data with :mod:`pipeline.offline.datasets`, and prints what
:func:`pipeline.offline.evaluation.evaluate` returns. For a CSV the model's own feature names
pick the columns unless ``--feature-columns`` says otherwise, so a time or label
column next to them needs no flag.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.commands.data_args import add_data_arguments, data_options
from pipeline.commands.info import COLUMNS_KEY
from pipeline.commands.parsing import add_model_argument, subcommand


def register(subparsers: Any) -> None:
    p = subcommand(
        subparsers,
        "eval",
        run,
        help="score an ONNX step model on data, step by step",
        description="Feed every case one step per call with carried state (as the daemon "
        "does) and print JSON metrics: accuracy and confusion matrix for classifiers; MAE, "
        "RMSE and MASE against the seasonal-naive forecast (MASE < 1 beats it) for "
        "forecasters, on the held-out tail of each series; ROC AUC, best and "
        "point-adjusted F1 for anomaly models (with --label-column), beside the "
        "z-score of first differences.",
    )
    add_model_argument(p)
    p.add_argument("--data", type=Path, required=True, help="data to score (.ts or .csv)")
    p.add_argument(
        "--tail",
        type=float,
        metavar="FRACTION",
        help="forecasting and anomaly models: fraction of each series, at its end, to "
        "score; 1 = the whole series (default: on the very file the model was trained "
        "on, same SHA-256, the held-out tail it was trained without; on any other file "
        "the whole series)",
    )
    p.add_argument(
        "--baseline-model",
        type=Path,
        metavar="ONE_STEP.onnx",
        help="forecasting: also score this one-step forecaster fed its own forecasts "
        "over the model's horizon, on the same points",
    )
    p.add_argument(
        "--reference",
        type=Path,
        metavar="MODEL.onnx",
        help="also score this model (e.g. the float model of an int8 one) and report "
        "the change of the headline metrics",
    )
    p.add_argument(
        "--providers",
        default="cpu",
        help="comma-separated onnxruntime providers, first available wins (cuda,cpu)",
    )
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    add_data_arguments(p)


def run(args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError
    from pipeline.model import StepModel
    from pipeline.offline import datasets
    from pipeline.offline.evaluation import evaluate

    if args.threads < 1:
        raise ConfigError("--threads must be >= 1")
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    model = StepModel.load(args.model, providers=providers, threads=args.threads)
    options = data_options(args)
    if args.data.suffix.lower() == ".csv" and not options["feature_columns"]:
        # the columns training read (names may have had a unit split off), else the names
        columns = model.spec.extra.get(COLUMNS_KEY)
        options["feature_columns"] = list(columns or model.spec.features)
    data = datasets.load(args.data, **options)
    baseline = reference = None
    if args.baseline_model is not None:
        baseline = StepModel.load(args.baseline_model, providers=providers, threads=args.threads)
    if args.reference is not None:
        reference = StepModel.load(args.reference, providers=providers, threads=args.threads)
    report = evaluate(model, data, tail=args.tail, baseline=baseline, reference=reference)
    json.dump(report, sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")
    return 0
