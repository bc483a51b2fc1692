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
from models.export import export_net, export_random, quantize_int8
from models.nets import NetConfig, build
from models.verify import QUANTIZED_TOLERANCE, verify
from pipeline.contract import BATCH, METADATA_KEY, ModelSpec
from pipeline.errors import ContractError, ModelError
from pipeline.model import StepModel

CELLS = ["lstm", "gru", "rnn"]
TASKS = ["classify", "forecast", "anomaly", "seq2seq"]
NATIVE = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
# Native recurrent operators per layer: the encoder's.
# A seq2seq decoder steps through its fixed horizon inside the graph, as plain ops.
NATIVE_PER_LAYER = {"classify": 1, "forecast": 1, "anomaly": 1, "seq2seq": 1}
STATE_NAMES = {
    "classify": ["h", "c"],
    "forecast": ["h", "c"],
    "anomaly": ["h", "c", "pred", "win"],
    "seq2seq": ["h", "c", "mem"],
}


def _state_names(task: str, cell: str) -> list[str]:
    return [n for n in STATE_NAMES[task] if cell == "lstm" or n != "c"]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("task", TASKS)
def test_export_is_a_native_dynamic_step_model(tmp_path: Path, cell: str, task: str) -> None:
    path = tmp_path / "m.onnx"
    spec = export_random(path, cell=cell, task=task, layers=2, hidden=8, horizon=3, window=5)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count(NATIVE[cell]) == 2 * NATIVE_PER_LAYER[task]  # no unrolled time loop
    assert not {"Loop", "Scan"} & set(ops)
    assert proto.opset_import[0].version >= 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert ModelSpec.from_json(meta[METADATA_KEY]) == spec

    model = StepModel.load(path)
    names = [i.name for i in model.session.get_inputs()]
    assert names == ["x", *_state_names(task, cell)]
    for batch, steps in [(1, 1), (3, 7), (9, 2)]:
        x = np.random.default_rng(batch).standard_normal((batch, steps, 6)).astype(np.float32)
        out, state = model.run(x, model.initial_state(batch))
        for name, row in spec.output_shapes.items():
            assert out[name].shape == (batch, steps, *row)
        for s in spec.state:
            assert state[s.name].shape == tuple(batch if d == BATCH else d for d in s.shape)


def _small_net(task: str, cell: str, seed: int = 3) -> tuple[object, dict[str, object]]:
    config = NetConfig(
        task=task,
        cell=cell,
        n_features=4,
        hidden=12,
        layers=2,
        n_classes=3 if task == "classify" else 0,
        targets=(1,) if task in ("forecast", "seq2seq") else (),
        horizon=4,
        mean=(0.0, 5.0, -1.0, 2.0),
        std=(1.0, 3.0, 0.2, 7.0),
        window=8 if task in ("anomaly", "seq2seq") else 0,
    )
    net = build(config, seed=seed)
    meta: dict[str, object] = {
        "name": "t",
        "version": "1",
        "features": ("a", "b", "c", "d"),
        "labels": ("x", "y", "z") if task == "classify" else (),
        "targets": ("b",) if task in ("forecast", "seq2seq") else (),
        "horizon": 4 if task in ("forecast", "seq2seq") else 0,
    }
    if task == "anomaly":
        meta["threshold"] = 1.5
    return net, meta


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("task", TASKS)
def test_verify_stepwise_onnx_equals_full_sequence_pytorch(
    tmp_path: Path, cell: str, task: str
) -> None:
    net, meta = _small_net(task, cell)
    checkpoint.save(tmp_path / "run", net, meta)  # type: ignore[arg-type]
    export_net(net, meta, tmp_path / "m.onnx")  # type: ignore[arg-type]
    report = verify(tmp_path / "m.onnx", tmp_path / "run")
    assert report.ok, report.to_dict()
    assert report.onnx_vs_torch is not None and report.onnx_vs_torch < 1e-4
    assert report.stepwise_vs_full < 1e-4
    assert not report.quantized and "vs_float" not in report.to_dict()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("task", TASKS)
def test_int8_model_is_reported_against_the_float_model(
    tmp_path: Path, cell: str, task: str
) -> None:
    net, meta = _small_net(task, cell, seed=5)
    checkpoint.save(tmp_path / "run", net, meta)  # type: ignore[arg-type]
    export_net(net, meta, tmp_path / "float.onnx")  # type: ignore[arg-type]
    spec = quantize_int8(tmp_path / "float.onnx", tmp_path / "int8.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert "DynamicQuantizeLinear" in ops or "DynamicQuantizeLSTM" in ops
    if cell == "lstm":  # onnxruntime has an int8 LSTM kernel; GRU/RNN stay float
        assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops
        assert "DynamicQuantizeLSTM" in spec.extra["quantization"]["ops"]
    model = StepModel.load(tmp_path / "int8.onnx")  # the contract holds
    assert model.spec.state == StepModel.load(tmp_path / "float.onnx").spec.state
    report = verify(tmp_path / "int8.onnx", tmp_path / "run", reference=tmp_path / "float.onnx")
    doc = report.to_dict()
    assert doc["quantized"] and doc["tolerance"] == QUANTIZED_TOLERANCE
    assert report.vs_float is not None and 0 < report.vs_float < QUANTIZED_TOLERANCE, doc
    assert report.onnx_vs_torch is not None and report.onnx_vs_torch < QUANTIZED_TOLERANCE
    assert report.ok, doc
    with pytest.raises(ModelError, match="already quantised"):
        quantize_int8(tmp_path / "int8.onnx", tmp_path / "again.onnx")


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
