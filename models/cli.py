"""``seqstream train | export | verify``: the commands that need the ``[train]`` extra.

Parsers are built without importing torch; each ``func`` imports the training stack
when it runs, and says which extra to install when it is missing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipeline.commands.data_args import add_data_arguments, data_options
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
        description="Train a classifier or forecaster; writes checkpoint, config.json, "
        "metrics.json and curve.png into --out.",
    )
    p.add_argument("--task", required=True, choices=["classify", "forecast"])
    p.add_argument("--data", required=True, help="training data (.ts or .csv)")
    p.add_argument("--test", help="test data scored after training (classification)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--cell", default="lstm", choices=["lstm", "gru", "rnn"])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=200, help="maximum epochs (early stopping)")
    p.add_argument("--patience", type=int, default=40, help="epochs without improvement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--name", help="model name in metadata (default: data-cell-task)")
    f = p.add_argument_group("forecasting")
    f.add_argument("--target", dest="targets", nargs="+", default=(), help="target columns")
    f.add_argument("--horizon", type=int, default=1, help="steps ahead forecast at each step")
    f.add_argument("--season", type=int, default=1, help="season length for seasonal-naive/MASE")
    f.add_argument("--window", type=int, default=96, help="training window length")
    f.add_argument("--test-fraction", type=float, default=0.2, help="held-out tail")
    add_data_arguments(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("export", help="export a trained model as an ONNX step model")
    p.add_argument("checkpoint", type=Path, help="directory written by 'seqstream train'")
    p.add_argument("--out", type=Path, required=True, help="MODEL.onnx to write")
    p.add_argument("--opset", type=int, default=17)
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
    add_data_arguments(p)
    p.set_defaults(func=_verify)


def _train(args: argparse.Namespace) -> int:
    _need_torch()
    from models.train import TrainConfig, train

    cfg = TrainConfig(
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
        targets=tuple(args.targets),
        horizon=args.horizon,
        season=args.season,
        window=args.window,
        test_fraction=args.test_fraction,
        data_options=data_options(args),
    )
    metrics = train(cfg)
    print(json.dumps(metrics, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    _need_torch()
    from models.export import export_checkpoint

    spec = export_checkpoint(args.checkpoint, args.out, opset=args.opset)
    print(
        json.dumps(
            {
                "model": str(args.out),
                "name": spec.name,
                "task": spec.task,
                "cell": spec.cell,
                "opset": spec.opset,
            }
        )
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    _need_torch()
    import numpy as np

    from models.verify import verify
    from pipeline import datasets

    x = None
    if args.data:
        data = datasets.load(args.data, **data_options(args))
        cases = data.cases[:8]
        steps = min(min(len(c) for c in cases), 500)
        x = np.stack([c[:steps] for c in cases]).astype(np.float32)
    report = verify(args.model, args.checkpoint, x=x, seed=args.seed)
    print(json.dumps(report.to_dict()))
    return 0 if report.ok else VERIFY_FAILED
