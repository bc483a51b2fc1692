"""Export a network (:mod:`models.nets`) as an ONNX step model under the contract.

The legacy TorchScript exporter (``dynamo=False``) is used on purpose: it emits the
native ONNX ``LSTM``/``GRU``/``RNN`` operators with dynamic batch and time, a graph
about half the size of the dynamo exporter's and about 1.7x faster per step (measured
for a 2-layer LSTM on onnxruntime CPU), with no time dimension frozen in an output.

The state tensors, whatever they hold (``h``/``c``, an anomaly model's window ``win``,
a seq2seq model's attention memory ``mem``), are graph inputs and outputs named by the
network's :meth:`~models.nets.SeqNet.state_specs`; the runtime carries them all alike.

:func:`quantize_int8` turns an exported model into an int8 one with onnxruntime's
dynamic quantisation (weights int8, activations quantised per call).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from models import checkpoint
from models.nets import NetConfig, SeqNet, build
from pipeline.contract import METADATA_KEY, TASK_OUTPUTS, ModelSpec, Normalisation
from pipeline.errors import ModelError

OPSET = 17
QUANTIZE_MODES: tuple[str, ...] = ("int8",)
# Operators onnxruntime's dynamic quantisation rewrites here: the recurrent LSTM
# (DynamicQuantizeLSTM) and the dense layers; GRU/RNN have no int8 kernel and stay float.
QUANTIZED_OPS: tuple[str, ...] = ("LSTM", "MatMul", "Gemm")


class _StepGraph(nn.Module):
    """Flattens ``(x, state) -> (outputs, new_state)`` to positional tensors for tracing."""

    def __init__(self, net: SeqNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        outs, new_state = self.net.outputs(x, tuple(state))
        return (*outs, *new_state)


def spec_for(net: SeqNet, meta: dict[str, Any], opset: int = OPSET) -> ModelSpec:
    cfg = net.config
    meta = dict(meta)
    if cfg.task in ("anomaly", "seq2seq"):
        meta["window"] = cfg.window
    if cfg.arch != "rnn":
        arch: dict[str, Any] = {
            "arch": cfg.arch,
            "filters": list(cfg.filters),
            "kernels": list(cfg.kernels),
        }
        if cfg.dilations:
            arch["dilations"] = list(cfg.dilations)
        if cfg.members > 1:
            arch["members"] = cfg.members
        meta["extra"] = {**meta.get("extra", {}), **arch}
    return ModelSpec(
        task=cfg.task,
        cell=cfg.cell,
        layers=cfg.layers,
        hidden=cfg.hidden,
        normalisation=Normalisation(
            mean=tuple(float(v) for v in net.mean.tolist()),
            std=tuple(float(v) for v in net.std.tolist()),
        ),
        state=net.state_specs(),
        outputs=TASK_OUTPUTS[cfg.task],
        opset=opset,
        **meta,
    )


def export_net(net: SeqNet, meta: dict[str, Any], out: Path, opset: int = OPSET) -> ModelSpec:
    """Trace ``net`` into ``out`` (written atomically) and attach the contract metadata."""
    spec = spec_for(net, meta, opset)
    net = net.eval()
    # Trace with more steps than any window so no size coincides with a fixed one.
    x = torch.zeros(2, 3, net.config.n_features)
    state = net.initial_state(2)
    in_names = [spec.input, *(s.name for s in spec.state)]
    out_names = [*spec.outputs, *(s.output for s in spec.state)]
    dynamic: dict[str, dict[int, str]] = {spec.input: {0: "batch", 1: "time"}}
    for s in spec.state:
        dynamic[s.name] = {s.batch_axis: "batch"}
        dynamic[s.output] = {s.batch_axis: "batch"}
    for name in spec.outputs:
        dynamic[name] = {0: "batch", 1: "time"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with warnings.catch_warnings():
        # The exporter warns that LSTM batch_first export depends on the batch size; the
        # dynamic axes above make that moot and the warning only confuses users.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _StepGraph(net),
            (x, *state),
            str(tmp),
            input_names=in_names,
            output_names=out_names,
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )
    _finish(onnx.load(str(tmp)), spec, tmp, out)
    return spec


def _finish(proto: onnx.ModelProto, spec: ModelSpec, tmp: Path, out: Path) -> None:
    """Attach the metadata, check the graph, and move ``tmp`` over ``out`` atomically."""
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = spec.to_json()
    proto.producer_name = "seqstream"
    proto.model_version = 1
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        tmp.unlink(missing_ok=True)
        raise ModelError(f"{out}: exported graph fails onnx.checker: {exc}") from None
    with open(tmp, "wb") as fh:
        fh.write(proto.SerializeToString())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)


def quantize_int8(model: Path, out: Path) -> ModelSpec:
    """Dynamic int8 quantisation of an exported step model into ``out``.

    Weights of LSTM, MatMul and Gemm become int8; activations are quantised at run
    time from each call's own range, so a quantised model's outputs depend slightly on
    how many steps and streams one call holds (``verify`` reports by how much). The
    metadata is the float model's plus ``extra.quantization``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from pipeline.model import StepModel

    spec = StepModel.load(model).spec
    if "quantization" in spec.extra:
        raise ModelError(f"{model}: already quantised ({spec.extra['quantization']['mode']})")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as d:
        raw = Path(d) / "q.onnx"
        quantize_dynamic(
            model,
            raw,
            op_types_to_quantize=list(QUANTIZED_OPS),
            weight_type=QuantType.QInt8,
            per_channel=True,  # one scale per gate row: half the LSTM's error of one per tensor
        )
        proto = onnx.load(str(raw))
        quantized = sorted({n.op_type for n in proto.graph.node if "Quant" in n.op_type})
        extra = {
            **spec.extra,
            "quantization": {
                "mode": "int8",
                "method": "onnxruntime dynamic, per channel",
                "ops": quantized,
                "float_model_bytes": model.stat().st_size,
            },
        }
        q_spec = replace(spec, extra=extra)
        _finish(proto, q_spec, out.with_name(out.name + ".tmp"), out)
    return q_spec


def export_checkpoint(directory: Path, out: Path, opset: int = OPSET) -> ModelSpec:
    net, meta = checkpoint.load(directory)
    return export_net(net, meta, out, opset)


def export_random(
    out: Path,
    *,
    cell: str = "lstm",
    task: str = "classify",
    n_features: int = 6,
    hidden: int = 16,
    layers: int = 2,
    n_classes: int = 4,
    horizon: int = 1,
    window: int = 8,
    seed: int = 0,
) -> ModelSpec:
    """An untrained model under the contract, for tests and benchmarks of the runtime."""
    forecasts = task in ("forecast", "seq2seq")
    targets = (0,) if forecasts else ()
    config = NetConfig(
        task=task,
        cell=cell,
        n_features=n_features,
        hidden=hidden,
        layers=layers,
        n_classes=n_classes if task == "classify" else 0,
        targets=targets,
        horizon=horizon,
        mean=tuple(0.1 * i for i in range(n_features)),
        std=tuple(1.0 + 0.1 * i for i in range(n_features)),
        window=window if task in ("anomaly", "seq2seq") else 0,
    )
    net = build(config, seed=seed)
    features = tuple(f"f{i}" for i in range(n_features))
    meta: dict[str, Any] = {
        "name": f"random-{cell}-{task}",
        "version": f"seed{seed}",
        "features": features,
        "labels": tuple(f"class{i}" for i in range(n_classes)) if task == "classify" else (),
        "targets": tuple(features[i] for i in targets),
        "horizon": horizon if forecasts else 0,
    }
    if task == "anomaly":
        meta["threshold"] = 1.0  # inputs drawn around the normalisation score about 1
    return export_net(net, meta, out)
