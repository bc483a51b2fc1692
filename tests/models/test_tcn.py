"""The windowed causal conv classifier (models/tcn.py), the keyword model's network.

Parity (stepwise ONNX == one ONNX call == full-sequence PyTorch) over the dilated
buffers, and the property it exists for: an output depends on the last
``receptive_field`` frames only, so a never-reset stream answers as a fresh one does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models import checkpoint
from models.export import export_net
from models.nets import NetConfig, build
from models.tcn import TCNNet, receptive_field
from models.verify import verify
from pipeline.commands.info import architecture
from pipeline.model import StepModel

META = {"name": "tcn", "version": "0", "features": ("a", "b", "c"), "labels": ("x", "y")}
LAYOUT = {"filters": (8, 8, 8), "kernels": (3, 3, 3), "dilations": (1, 2, 4)}


def _net(seed: int = 0) -> TCNNet:
    cfg = NetConfig(
        task="classify",
        cell="gru",
        n_features=3,
        hidden=8,
        layers=1,
        n_classes=2,
        mean=(0.5, -1.0, 0.0),
        std=(2.0, 0.5, 1.0),
        arch="tcn",
        **LAYOUT,
    )
    net = build(cfg, seed=seed)
    assert isinstance(net, TCNNet)
    return net.eval()


def test_tcn_exports_a_step_model_whose_steps_equal_pytorch(tmp_path: Path) -> None:
    net = _net()
    checkpoint.save(tmp_path, net, META)
    spec = export_net(net, META, tmp_path / "m.onnx")
    shapes = {s.name: s.shape for s in spec.state}
    # each convolution keeps its last (k-1)*d inputs: the dilated window
    assert shapes == {"conv0": ("batch", 3, 2), "conv1": ("batch", 8, 4), "conv2": ("batch", 8, 8)}
    assert spec.extra["arch"] == "tcn" and spec.extra["dilations"] == [1, 2, 4]
    assert architecture(spec).startswith("causal conv 8/8/8 (kernels 3/3/3, dilations 1/2/4)")
    report = verify(tmp_path / "m.onnx", tmp_path, seed=3)
    assert report.ok, report.to_dict()
    assert report.stepwise_vs_full < 1e-4 and report.onnx_vs_torch is not None
    assert report.onnx_vs_torch < 1e-4


def test_an_output_depends_on_the_receptive_field_alone(tmp_path: Path) -> None:
    """Whatever came before the last window, the step model answers the same."""
    net = _net()
    export_net(net, META, tmp_path / "m.onnx")
    model = StepModel.load(tmp_path / "m.onnx")
    window = receptive_field(LAYOUT["kernels"], LAYOUT["dilations"])
    assert window == 15
    rng = np.random.default_rng(0)
    tail = rng.normal(size=(1, window, 3)).astype(np.float32)
    answers = []
    for history in (0, 7, 500):  # a fresh stream, and streams that heard other things
        x = np.concatenate([rng.normal(size=(1, history, 3)).astype(np.float32) * 5, tail], 1)
        if history == 0:  # a fresh stream's buffers hold the training mean
            x = np.concatenate([np.tile(net.mean.numpy(), (1, 20, 1)), tail], 1)
        outputs, _ = model.run(x, model.initial_state(1))
        (probs,) = outputs.values()
        answers.append(probs[0, -1])
    np.testing.assert_allclose(answers[1], answers[0], atol=1e-5)
    np.testing.assert_allclose(answers[2], answers[0], atol=1e-5)
    with torch.no_grad():
        full, _ = net(torch.from_numpy(tail), net.initial_state(1))
    np.testing.assert_allclose(full[0, -1].numpy(), answers[0], atol=1e-5)
