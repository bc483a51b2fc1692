"""Export produces a contract-conforming step model: native RNN ops, dynamic batch and
time, metadata the runtime accepts, and numerics equal to PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from models import checkpoint
from models.export import export_net, export_random
from models.nets import NetConfig, build
from models.verify import verify
from pipeline.contract import METADATA_KEY, ModelSpec
from pipeline.errors import ContractError, ModelError
from pipeline.model import StepModel

CELLS = ["lstm", "gru", "rnn"]
NATIVE = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("task", ["classify", "forecast"])
def test_export_is_a_native_dynamic_step_model(tmp_path: Path, cell: str, task: str) -> None:
    path = tmp_path / "m.onnx"
    spec = export_random(path, cell=cell, task=task, layers=2, hidden=8, horizon=3)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count(NATIVE[cell]) == 2  # one native operator per layer, no unrolled loop
    assert not {"Loop", "Scan"} & set(ops)
    assert proto.opset_import[0].version >= 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert ModelSpec.from_json(meta[METADATA_KEY]) == spec

    model = StepModel.load(path)
    names = [i.name for i in model.session.get_inputs()]
    assert names == ["x", "h", "c"] if cell == "lstm" else names == ["x", "h"]
    for batch, steps in [(1, 1), (3, 7), (9, 2)]:
        x = np.random.default_rng(batch).standard_normal((batch, steps, 6)).astype(np.float32)
        out, state = model.run(x, model.initial_state(batch))
        first = out[spec.outputs[0]]
        assert first.shape[:2] == (batch, steps)
        assert all(v.shape == (2, batch, 8) for v in state.values())


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("task", ["classify", "forecast"])
def test_verify_stepwise_onnx_equals_full_sequence_pytorch(
    tmp_path: Path, cell: str, task: str
) -> None:
    config = NetConfig(
        task=task,
        cell=cell,
        n_features=4,
        hidden=12,
        layers=2,
        n_classes=3 if task == "classify" else 0,
        targets=(1,) if task == "forecast" else (),
        horizon=4,
        mean=(0.0, 5.0, -1.0, 2.0),
        std=(1.0, 3.0, 0.2, 7.0),
    )
    net = build(config, seed=3)
    meta = {
        "name": "t",
        "version": "1",
        "features": ("a", "b", "c", "d"),
        "labels": ("x", "y", "z") if task == "classify" else (),
        "targets": ("b",) if task == "forecast" else (),
        "horizon": 4 if task == "forecast" else 0,
    }
    checkpoint.save(tmp_path / "run", net, meta)
    export_net(net, meta, tmp_path / "m.onnx")
    report = verify(tmp_path / "m.onnx", tmp_path / "run")
    assert report.ok, report.to_dict()
    assert report.onnx_vs_torch is not None and report.onnx_vs_torch < 1e-4
    assert report.stepwise_vs_full < 1e-4


def test_truncated_model_is_one_clear_error(tmp_path: Path) -> None:
    good = tmp_path / "good.onnx"
    export_random(good)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelError, match="bad.onnx: not a loadable ONNX model"):
        StepModel.load(bad)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "verify", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "bad.onnx" in proc.stderr and "Traceback" not in proc.stderr


def test_model_without_contract_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    export_random(path)
    proto = onnx.load(str(path))
    doc = json.loads(proto.metadata_props[0].value)
    doc["task"] = "dance"
    proto.metadata_props[0].value = json.dumps(doc)
    onnx.save(proto, str(path))
    with pytest.raises(ContractError, match="'task' is 'dance'"):
        StepModel.load(path)
    del proto.metadata_props[:]
    onnx.save(proto, str(path))
    with pytest.raises(ContractError, match="no 'seqstream' metadata"):
        StepModel.load(path)
