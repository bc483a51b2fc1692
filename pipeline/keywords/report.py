"""Keyword accuracy on held-out clips: ``confusion.json`` and ``confusion.png``.

The numbers come from :func:`pipeline.offline.evaluation.evaluate` (each clip fed step by step
with carried state, its label read at the last step), on the ONNX file alone. The plot
needs matplotlib (the ``train`` extra); it is imported only here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DependencyError
from pipeline.model import StepModel
from pipeline.offline import datasets
from pipeline.offline.evaluation import evaluate


def evaluate_report(model_path: Path, data: Path, out: Path) -> dict[str, Any]:
    """Score ``model_path`` on the WAV folders ``data``; write the JSON and PNG into ``out``."""
    model = StepModel.load(model_path)
    report = evaluate(model, datasets.load(data))
    out.mkdir(parents=True, exist_ok=True)
    (out / "confusion.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_confusion(report, out / "confusion.png")
    return report


def plot_confusion(report: dict[str, Any], path: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DependencyError(
            "the confusion plot needs matplotlib: pip install 'seqstream[train]'"
        ) from None
    labels: list[str] = list(report["labels"])
    m = np.asarray(report["confusion_matrix"], dtype=np.int64)
    rows = m.sum(axis=1, keepdims=True).clip(min=1)
    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=110)
    image = ax.imshow(m / rows, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j]:
                colour = "white" if m[i, j] / rows[i, 0] > 0.6 else "black"
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    name = report.get("model", "model")
    ax.set_title(f"{name}: accuracy {report['accuracy']:.3f} on {report['n_cases']} held-out clips")
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
