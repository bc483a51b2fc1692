"""The causal FCN classifier and the default search (models/fcn.py, models/search.py).

Parity (stepwise ONNX == one ONNX call == full-sequence PyTorch) for the new state
tensors, masked batch norm, determinism, what the search writes, and a real accuracy
floor on real data (ArrowHead, 36 training cases of 251 steps) with a reduced number
of steps: the shipped recipe at a quarter of its steps (figures of the full default
are in docs/models/README.md, from benchmarks/model_quality.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models import checkpoint
from models.export import export_net
from models.fcn import FCNEnsemble, FCNNet
from models.nets import NetConfig, build
from models.train import TrainConfig, train
from models.verify import verify
from pipeline.commands.info import architecture
from pipeline.errors import ConfigError
from pipeline.model import StepModel
from pipeline.offline import datasets
from pipeline.offline.evaluation import run_stepwise


def _net(cell: str, seed: int = 0) -> FCNNet:
    cfg = NetConfig(
        task="classify",
        cell=cell,
        n_features=2,
        hidden=8,
        layers=1,
        n_classes=3,
        mean=(0.5, -1.0),
        std=(2.0, 0.5),
        arch="fcn",
        filters=(8, 16, 8),
        kernels=(8, 5, 3),
    )
    net = build(cfg, seed=seed)
    assert isinstance(net, FCNNet)
    gen = torch.Generator().manual_seed(seed)
    for norm in net.norms:  # batch statistics that are not the identity
        assert isinstance(norm, torch.nn.BatchNorm1d)
        assert norm.running_mean is not None and norm.running_var is not None
        norm.running_mean.copy_(torch.rand(norm.num_features, generator=gen) - 0.5)
        norm.running_var.copy_(torch.rand(norm.num_features, generator=gen) + 0.5)
    return net.eval()


META = {"name": "fcn", "version": "0", "features": ("a", "b"), "labels": ("x", "y", "z")}


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_fcn_exports_a_step_model_whose_steps_equal_pytorch(cell: str, tmp_path: Path) -> None:
    net = _net(cell)
    checkpoint.save(tmp_path, net, META)
    spec = export_net(net, META, tmp_path / "m.onnx")
    names = [s.name for s in spec.state]
    recurrent = ["h", "c"] if cell == "lstm" else ["h"]
    assert names == [*recurrent, "conv0", "conv1", "conv2", "mean", "count"]
    shapes = {s.name: s.shape for s in spec.state}
    assert shapes["conv0"] == ("batch", 2, 7) and shapes["conv1"] == ("batch", 8, 4)
    assert shapes["mean"] == ("batch", 8) and shapes["count"] == ("batch", 1)
    assert spec.extra["arch"] == "fcn" and spec.extra["kernels"] == [8, 5, 3]
    report = verify(tmp_path / "m.onnx", tmp_path, seed=3)
    assert report.ok, report.to_dict()
    assert report.stepwise_vs_full < 1e-4 and report.onnx_vs_torch is not None
    assert report.onnx_vs_torch < 1e-4
    # Batch norm is folded into the convolutions: no normalisation op left per step.
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "BatchNormalization" not in ops and "CumSum" in ops
    # seqstream info names the whole network, not only its recurrent branch.
    from pipeline.commands.info import describe

    assert describe(spec)["cell"] == (
        f"causal conv 8/16/8 (kernels 8/5/3), running mean, beside {cell} x1, hidden 8"
    )


def test_running_mean_is_the_mean_since_the_start_in_chunks_of_any_size(tmp_path: Path) -> None:
    net = _net("gru")
    export_net(net, META, tmp_path / "m.onnx")
    model = StepModel.load(tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    cases = [rng.normal(size=(37, 2)).astype(np.float32) for _ in range(3)]
    one = run_stepwise(model, cases, chunk=1)
    for chunk in (5, 64):
        other = run_stepwise(model, cases, chunk=chunk)
        for a, b in zip(one, other, strict=True):
            np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-5)
    # the carried count is the number of steps seen
    _, state = model.run(cases[0][None], model.initial_state(1))
    assert float(state["count"][0, 0]) == 37.0


def test_an_ensemble_is_one_step_model_averaging_its_members(
    basicmotions: tuple[Path, Path], tmp_path: Path
) -> None:
    """--members 2: two seeds of the chosen architecture, each with its own state tensors
    (m0_*, m1_*), one ONNX step model whose probabilities are the members' mean; the
    runtime carries them like any others and verify proves stepwise == full sequence."""
    train_ts, _ = basicmotions
    cfg = TrainConfig(
        task="classify", data=str(train_ts), out=str(tmp_path / "e"), arch="fcn",
        steps=2, seed=2, members=2,
    )  # fmt: skip
    metrics = train(cfg)
    assert metrics["search"]["members"] == 2
    net, _ = checkpoint.load(tmp_path / "e")
    assert isinstance(net, FCNEnsemble) and len(net.member_nets()) == 2
    # member 0 is the single model of the same seed; member 1 differs
    single = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "s"), "members": 1})
    train(single)
    one, _ = checkpoint.load(tmp_path / "s")
    for key, value in one.state_dict().items():
        assert torch.equal(net.member_nets()[0].state_dict()[key], value), key
    assert not torch.equal(net.member_nets()[1].convs[0].weight, one.convs[0].weight)
    model_path = tmp_path / "e.onnx"
    spec = export_net(
        net, META | {"features": ("a",) * 6, "labels": ("1", "2", "3", "4")}, model_path
    )
    names = [s.name for s in spec.state]
    assert names[:6] == ["m0_h", "m0_conv0", "m0_conv1", "m0_conv2", "m0_mean", "m0_count"]
    assert names[6:] == [n.replace("m0_", "m1_") for n in names[:6]]
    assert spec.extra["members"] == 2
    assert architecture(spec).startswith("2 x (causal conv ")  # info sizes the whole ensemble
    report = verify(model_path, tmp_path / "e", seed=3)
    assert report.ok, report.to_dict()
    assert report.stepwise_vs_full < 1e-4
    # the probabilities are the mean of the members'
    x = torch.randn(2, 9, 6)
    net.eval()
    probs, _ = net(x, net.initial_state(2))
    each = [m(x, m.initial_state(2))[0] for m in net.member_nets()]
    torch.testing.assert_close(probs, (each[0] + each[1]) / 2, atol=1e-6, rtol=1e-5)


def test_padded_steps_never_enter_the_batch_statistics() -> None:
    net = _net("gru").train()
    case = torch.randn(1, 20, 2)
    clean = torch.cat([case, case])
    padded = torch.cat([case, torch.full((1, 15, 2), 50.0)], dim=1).repeat(2, 1, 1)
    mask = torch.arange(35)[None, :] < torch.tensor([20, 20])[:, None]
    a, _ = net.train_outputs(clean, net.initial_state(2), torch.ones(2, 20, dtype=torch.bool))
    b, _ = net.train_outputs(padded, net.initial_state(2), mask)
    torch.testing.assert_close(a, b[:, :20])
    unmasked, _ = net.train_outputs(padded, net.initial_state(2), None)
    assert not torch.allclose(a, unmasked[:, :20], atol=1e-3)  # the mask is what matters


def test_classify_defaults_search_unless_the_recurrent_stack_is_named() -> None:
    base = {"task": "classify", "data": "d.ts", "out": "o"}
    assert TrainConfig.for_task(**base).arch == "auto"
    assert TrainConfig.for_task(**base, cell="gru").arch == "rnn"
    assert TrainConfig.for_task(**base, hidden=32, arch="fcn").arch == "fcn"
    assert TrainConfig(**base).arch == "rnn"  # an explicit config keeps the old stack
    assert TrainConfig.for_task(task="forecast", data="d", out="o").arch == "rnn"
    with pytest.raises(ConfigError, match="--arch"):
        TrainConfig(task="forecast", data="d", out="o", arch="fcn")
    with pytest.raises(ConfigError, match="--budget"):
        TrainConfig(**base, budget=0)


def test_search_is_deterministic_and_reports_every_candidate(
    basicmotions: tuple[Path, Path], tmp_path: Path
) -> None:
    train_ts, _ = basicmotions
    docs, states = [], []
    for i in range(2):
        cfg = TrainConfig(
            task="classify", data=str(train_ts), out=str(tmp_path / str(i)), arch="auto",
            steps=8, seed=5,
        )  # fmt: skip
        docs.append(train(cfg))
        net, _ = checkpoint.load(tmp_path / str(i))
        states.append(net.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
    search = json.loads((tmp_path / "0" / "metrics.json").read_text())["search"]
    assert [c["name"] for c in search["candidates"]] == ["fcn48", "fcn32"]
    assert all(0 <= c["val_accuracy"] <= 1 and c["steps"] == 2 for c in search["candidates"])
    assert search["chosen"] in ("fcn48", "fcn32") and search["val_cases"] == 8
    assert search["final_fit_on_all_training_cases"] and not search["stopped_by_budget"]
    for a, b in zip(docs[0]["search"]["candidates"], docs[1]["search"]["candidates"], strict=True):
        assert (a["val_accuracy"], a["val_loss"]) == (b["val_accuracy"], b["val_loss"])


def test_search_that_runs_out_of_budget_says_so(
    basicmotions: tuple[Path, Path], tmp_path: Path
) -> None:
    train_ts, _ = basicmotions
    cfg = TrainConfig(
        task="classify", data=str(train_ts), out=str(tmp_path), arch="auto", budget=0.5
    )
    metrics = train(cfg)
    assert metrics["search"]["stopped_by_budget"] is True
    net, _ = checkpoint.load(tmp_path)  # a model is still written
    assert isinstance(net, FCNNet)


def test_fcn_beats_a_floor_on_arrowhead_streamed_through_onnx(
    shared_data: Path, tmp_path: Path
) -> None:
    """A quarter of the default steps (300), one candidate: streamed test accuracy on
    175 unseen cases well above chance (1/3); the full default is in the docs table.
    The budget is lifted: a busy CI machine must not cut the fixed steps short."""
    d = shared_data / "arrowhead"
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable, "-m", "pipeline.cli", "train", "--task", "classify", "--arch",
            "fcn", "--steps", "300", "--data", str(d / "ArrowHead_TRAIN.ts"), "--out", str(out),
            "--seed", "0", "--budget", "100000",
        ],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(proc.stdout)["search"]["chosen"] == "fcn48"
    model = tmp_path / "m.onnx"
    subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "export", str(out), "--out", str(model)],
        check=True, capture_output=True,
    )  # fmt: skip
    test = datasets.load(d / "ArrowHead_TEST.ts")
    from pipeline.offline.evaluation import evaluate

    report = evaluate(StepModel.load(model), test)
    assert report["n_cases"] == 175
    # measured 0.640 (seed 0; train 0.861); the full default's 1200 steps: see the docs
    assert report["accuracy"] >= 0.55, report["accuracy"]
