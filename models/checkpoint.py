"""A trained model on disk: ``DIR/checkpoint.pt`` holds the weights, the architecture
and the metadata that export turns into the ONNX contract.

``meta`` keys are :class:`pipeline.contract.ModelSpec` fields that training knows and
the architecture does not (name, version, features, labels, targets, horizon, season,
sample_rate_hz, data_sha256, metrics, extra).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from models.nets import NetConfig, SeqNet, build
from pipeline.errors import ModelError

FILENAME = "checkpoint.pt"


def save(directory: Path, net: SeqNet, meta: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILENAME
    tmp = path.with_suffix(".tmp")
    torch.save({"net": net.config.to_dict(), "state_dict": net.state_dict(), "meta": meta}, tmp)
    os.replace(tmp, path)
    return path


def load(directory: Path) -> tuple[SeqNet, dict[str, Any]]:
    path = directory / FILENAME if directory.is_dir() else directory
    if not path.is_file():
        raise ModelError(f"{path}: no checkpoint (train with 'seqstream train --out DIR')")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
        net = build(NetConfig.from_dict(doc["net"]))
        net.load_state_dict(doc["state_dict"])
        meta = dict(doc["meta"])
    except Exception as exc:  # pickle, zip and key errors all mean the same thing here
        raise ModelError(f"{path}: unreadable checkpoint ({exc})") from None
    net.eval()
    return net, meta
