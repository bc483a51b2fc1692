"""Every network's stateful interface: stepping with carried state == one call."""

from __future__ import annotations

import pytest
import torch

from models.nets import AnomalyNet, NetConfig, Seq2SeqNet, StepNet, build, sliding
from pipeline.contract import BATCH

CELLS = ["lstm", "gru", "rnn"]
TASKS = ["classify", "forecast", "anomaly", "seq2seq"]


def _config(cell: str, task: str, layers: int) -> NetConfig:
    return NetConfig(
        task=task,
        cell=cell,
        n_features=3,
        hidden=8,
        layers=layers,
        n_classes=4 if task == "classify" else 0,
        targets=(0, 2) if task in ("forecast", "seq2seq") else (),
        horizon=5,
        mean=(1.0, -2.0, 0.5),
        std=(2.0, 0.5, 1.0),
        window=6 if task in ("anomaly", "seq2seq") else 0,
        pool=2 if task == "anomaly" else 1,
    )


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("layers", [1, 3])
def test_stepping_with_carried_state_equals_one_call(cell: str, task: str, layers: int) -> None:
    net = build(_config(cell, task, layers), seed=1).eval()
    x = torch.randn(2, 12, 3) * 2
    with torch.no_grad():
        (full,), full_state = net.outputs(x, net.initial_state(2))
        state = net.initial_state(2)
        steps = []
        for t in range(12):
            (out,), state = net.outputs(x[:, t : t + 1], state)
            steps.append(out)
    specs = net.state_specs()
    assert len(state) == len(specs)
    for s, tensor in zip(specs, state, strict=True):
        assert tuple(tensor.shape) == tuple(2 if d == BATCH else d for d in s.shape), s.name
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    for a, b in zip(state, full_state, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_state_names_per_task() -> None:
    names = {
        task: [s.name for s in build(_config("lstm", task, 2)).state_specs()] for task in TASKS
    }
    assert names == {
        "classify": ["h", "c"],
        "forecast": ["h", "c"],
        "anomaly": ["win"],
        "seq2seq": ["h", "c", "mem"],
    }
    assert [s.name for s in build(_config("gru", "seq2seq", 1)).state_specs()] == ["h", "mem"]


def test_output_shapes_per_task() -> None:
    x = torch.randn(4, 7, 3)
    clf = build(_config("lstm", "classify", 2)).eval()
    probs, _ = clf(x, clf.initial_state(4))
    assert probs.shape == (4, 7, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 7))
    fc = build(_config("gru", "forecast", 2)).eval()
    y, _ = fc(x, fc.initial_state(4))
    assert y.shape == (4, 7, 5, 2)
    s2s = build(_config("rnn", "seq2seq", 1)).eval()
    y, _ = s2s(x, s2s.initial_state(4))
    assert y.shape == (4, 7, 5, 2)
    ae = build(_config("lstm", "anomaly", 1)).eval()
    score, (win,) = ae(x, ae.initial_state(4))
    assert score.shape == (4, 7) and bool((score >= 0).all())
    assert win.shape == (4, 6, 3)


def test_sliding_windows_carry_the_last_rows() -> None:
    memory = torch.arange(3.0).reshape(1, 3, 1)
    new = torch.arange(3.0, 8.0).reshape(1, 5, 1)
    windows, carried = sliding(memory, new)
    assert windows.shape == (1, 5, 3, 1)
    assert windows[0, :, :, 0].tolist() == [[1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6], [5, 6, 7]]
    assert carried[0, :, 0].tolist() == [5, 6, 7]


def test_anomaly_window_holds_normalised_inputs_and_scores_the_pooled_window() -> None:
    net = build(_config("gru", "anomaly", 1), seed=2).eval()
    assert isinstance(net, AnomalyNet)
    x = torch.randn(1, 9, 3) * 3
    with torch.no_grad():
        score, (win,) = net(x, net.initial_state(1))
        torch.testing.assert_close(win[0], net.normalise(x[0, -6:]))
        pooled = net.normalise(x[0, -6:]).reshape(3, 2, 3).mean(1)
        expected = (net.reconstruct(pooled[None]) - pooled).pow(2).mean()
    torch.testing.assert_close(score[0, -1], expected)


def test_seq2seq_is_level_invariant() -> None:
    """Differences in, changes out: from the same state with its memory's inputs shifted,
    a shifted series gives the same forecast, shifted."""
    net = build(_config("lstm", "seq2seq", 2), seed=4).eval()
    assert isinstance(net, Seq2SeqNet)
    x = torch.randn(2, 20, 3)
    shift = torch.tensor([5.0, -3.0, 2.0])
    with torch.no_grad():
        _, state = net(x[:, :8], net.initial_state(2))
        *rec, mem = state
        moved = mem.clone()
        moved[:, :, net.config.hidden :] += shift / net.std
        a, _ = net(x[:, 8:], state)
        b, _ = net(x[:, 8:] + shift, (*rec, moved))
    torch.testing.assert_close(b - a, shift[[0, 2]].expand_as(a), rtol=0, atol=1e-4)


def test_untrained_forecaster_predicts_no_change_in_raw_units() -> None:
    """The residual head starts near 'no change': zero head weights give exactly x_t."""
    net = build(_config("lstm", "forecast", 1)).eval()
    assert isinstance(net, StepNet)
    torch.nn.init.zeros_(net.head.weight)
    torch.nn.init.zeros_(net.head.bias)
    x = torch.randn(1, 6, 3) * 3 + 1
    y, _ = net(x, net.initial_state(1))
    expected = x[:, :, [0, 2]].unsqueeze(2).expand(1, 6, 5, 2)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_config_rejects_impossible_architectures() -> None:
    with pytest.raises(ValueError, match="cell"):
        NetConfig(task="classify", cell="transformer", n_features=2, n_classes=2)
    with pytest.raises(ValueError, match="two classes"):
        NetConfig(task="classify", cell="lstm", n_features=2, n_classes=1)
    with pytest.raises(ValueError, match="target"):
        NetConfig(task="forecast", cell="lstm", n_features=2)
    with pytest.raises(ValueError, match="window"):
        NetConfig(task="anomaly", cell="lstm", n_features=2)
    with pytest.raises(ValueError, match="pool"):
        NetConfig(task="anomaly", cell="lstm", n_features=2, window=6, pool=4)
    with pytest.raises(ValueError, match="window"):
        NetConfig(task="seq2seq", cell="gru", n_features=2, targets=(0,), horizon=3)
