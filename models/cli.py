"""``seqstream train | export | verify``: the commands that need the ``[train]`` extra.

Parsers are built without importing torch; each ``func`` imports the training stack
when it runs, and says which extra to install when it is missing. Options left out
take the task's defaults (:data:`models.train.TASK_DEFAULTS`, else
:class:`models.train.TrainConfig`'s), so ``--help`` shows no numbers that one task
would silently override.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipeline.commands.data_args import add_data_arguments, data_options
from pipeline.contract import CELLS, TASKS
from pipeline.errors import DependencyError

VERIFY_FAILED = 1


def _need_torch() -> None:
    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise DependencyError(
            f"this command needs the training extra ({exc.name} is missing): "
            "pip install 'seqstream[train]'"
        ) from None


def register(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a stateful sequence model",
        description="Train a classifier, forecaster, seq2seq forecaster or anomaly "
        "detector; writes checkpoint, config.json, metrics.json and curve.png into --out. "
        "Options left out take the task's defaults (written to config.json).",
    )
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--data", required=True, help="training data (.ts or .csv)")
    p.add_argument("--test", help="test data scored after training (classification)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--cell", choices=list(CELLS), help="recurrent cell (default lstm)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--epochs", type=int, help="maximum epochs (early stopping)")
    p.add_argument("--patience", type=int, help="epochs without improvement")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--name", help="model name in metadata (default: data-cell-task)")
    p.add_argument(
        "--feature-names",
        nargs="+",
        metavar="NAME[UNIT]",
        help="feature names in column order, each optionally with its unit in brackets "
        "(ax[m/s^2]); default: the CSV header (units in brackets there too) or dim_0..",
    )
    p.add_argument(
        "--sample-rate",
        type=float,
        metavar="HZ",
        help="steps per second, recorded for sensor authors (default: from the time "
        "column's median spacing, or the audio's rate)",
    )
    c = p.add_argument_group("classification")
    c.add_argument(
        "--arch",
        choices=["auto", "fcn", "rnn", "tcn"],
        help="auto (default unless --cell/--hidden/--layers is given): the best of a few "
        "causal-conv candidates on the validation split, refit on all training cases; "
        "fcn: the first candidate; rnn: the recurrent stack of --cell/--hidden/--layers; "
        "tcn: a windowed stack of dilated causal convolutions (1.3 s of 10 ms frames), "
        "for streams that are never reset, such as keyword spotting",
    )
    c.add_argument(
        "--budget",
        type=float,
        help="CPU seconds the classifier search may take at most (default 300); a "
        "ceiling: the steps trained never depend on the machine's speed",
    )
    c.add_argument(
        "--steps",
        type=int,
        help="fcn/auto: optimiser steps of the final fit (default 1200; screening a quarter)",
    )
    c.add_argument(
        "--members",
        type=int,
        help="fcn/auto: fit the chosen architecture this many times with different "
        "seeds and export them as one step model averaging their probabilities "
        "(default 1; the engine's cost per step grows with it)",
    )
    f = p.add_argument_group("forecasting (forecast, seq2seq) and anomaly")
    f.add_argument("--target", dest="targets", nargs="+", help="target columns")
    f.add_argument("--horizon", type=int, help="steps ahead forecast at each step")
    f.add_argument("--season", type=int, help="season length for seasonal-naive/MASE")
    f.add_argument("--window", type=int, help="training window length (forecast, seq2seq, anomaly)")
    f.add_argument("--test-fraction", type=float, help="held-out tail")
    f.add_argument(
        "--context",
        type=int,
        help="steps the model looks back over at every step: the steps an anomaly "
        "model's score is averaged over (default: one period of the training data), "
        "the memory a seq2seq model attends to",
    )
    f.add_argument(
        "--threshold-quantile",
        type=float,
        help="anomaly: the threshold is this quantile of the training part's scores",
    )
    add_data_arguments(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("export", help="export a trained model as an ONNX step model")
    p.add_argument("checkpoint", type=Path, help="directory written by 'seqstream train'")
    p.add_argument("--out", type=Path, required=True, help="MODEL.onnx to write")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument(
        "--quantize",
        choices=["int8"],
        help="write an int8 model (onnxruntime dynamic quantisation, LSTM included)",
    )
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "verify",
        help="prove stepwise ONNX == full sequence (== PyTorch)",
        description="Prints JSON with the max absolute differences; exit 1 above the tolerance.",
    )
    p.add_argument("model", type=Path, help="MODEL.onnx")
    p.add_argument("--checkpoint", type=Path, help="training directory, to compare with PyTorch")
    p.add_argument("--data", type=Path, help="real inputs (.ts/.csv); default random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--reference",
        type=Path,
        metavar="FLOAT.onnx",
        help="for an int8 model: the float model it came from, to report the difference",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        help="largest difference that passes (default 1e-4; int8 models 0.05 relative)",
    )
    add_data_arguments(p)
    p.set_defaults(func=_verify)


def _train(args: argparse.Namespace) -> int:
    _need_torch()
    from models.train import TrainConfig, train

    cfg = TrainConfig.for_task(
        task=args.task,
        data=args.data,
        test=args.test,
        out=args.out,
        cell=args.cell,
        hidden=args.hidden,
        layers=args.layers,
        epochs=args.epochs,
        patience=args.patience,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        val_fraction=args.val_fraction,
        name=args.name,
        arch=args.arch,
        budget=args.budget,
        steps=args.steps,
        members=args.members,
        targets=tuple(args.targets) if args.targets else None,
        horizon=args.horizon,
        season=args.season,
        window=args.window,
        test_fraction=args.test_fraction,
        context=args.context,
        threshold_quantile=args.threshold_quantile,
        feature_names=tuple(args.feature_names) if args.feature_names else None,
        sample_rate_hz=args.sample_rate,
        data_options=data_options(args),
    )
    metrics = train(cfg)
    print(json.dumps(metrics, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    _need_torch()
    from models.export import export_checkpoint, quantize_int8

    if args.quantize:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            float_model = Path(d) / "float.onnx"
            export_checkpoint(args.checkpoint, float_model, opset=args.opset)
            spec = quantize_int8(float_model, args.out)
    else:
        spec = export_checkpoint(args.checkpoint, args.out, opset=args.opset)
    print(
        json.dumps(
            {
                "model": str(args.out),
                "name": spec.name,
                "task": spec.task,
                "cell": spec.cell,
                "opset": spec.opset,
                "quantization": spec.extra.get("quantization", {}).get("mode"),
            }
        )
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    _need_torch()
    import numpy as np

    from models.verify import verify
    from pipeline.offline import datasets

    x = None
    if args.data:
        data = datasets.load(args.data, **data_options(args))
        cases = data.cases[:8]
        steps = min(min(len(c) for c in cases), 500)
        x = np.stack([c[:steps] for c in cases]).astype(np.float32)
    report = verify(
        args.model,
        args.checkpoint,
        x=x,
        seed=args.seed,
        reference=args.reference,
        tolerance=args.tolerance,
    )
    print(json.dumps(report.to_dict()))
    return 0 if report.ok else VERIFY_FAILED
