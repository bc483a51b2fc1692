"""Every network's stateful interface: stepping with carried state == one call."""

from __future__ import annotations

import pytest
import torch

from models.nets import RAW_CAP, AnomalyNet, NetConfig, Seq2SeqNet, StepNet, build, sliding
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
        "anomaly": ["h", "c", "pred", "win"],
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
    score, (_, _, pred, win) = ae(x, ae.initial_state(4))
    assert score.shape == (4, 7) and bool((score >= 0).all())
    assert pred.shape == (4, 1, 6) and win.shape == (4, 6, 1)


def test_sliding_windows_carry_the_last_rows() -> None:
    memory = torch.arange(3.0).reshape(1, 3, 1)
    new = torch.arange(3.0, 8.0).reshape(1, 5, 1)
    windows, carried = sliding(memory, new)
    assert windows.shape == (1, 5, 3, 1)
    assert windows[0, :, :, 0].tolist() == [[1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6], [5, 6, 7]]
    assert carried[0, :, 0].tolist() == [5, 6, 7]


def test_anomaly_score_is_each_steps_surprise_averaged_over_the_window() -> None:
    """Step t's raw score: its squared error against the prediction made at step t-1 (the
    first step: against the zero state, i.e. the training mean with variance 1), in
    predicted variances, capped; the score is the mean of the last W raw scores."""
    net = build(_config("gru", "anomaly", 1), seed=2).eval()
    assert isinstance(net, AnomalyNet)
    x = torch.randn(1, 9, 3) * 3
    x[0, 7] = 1e4  # a wild step: its raw score is capped
    with torch.no_grad():
        score, (_, pred, win) = net(x, net.initial_state(1))
        z = net.normalise(x)
        after, _ = net.predict(z, net.core.initial_state(1))  # after[t] predicts z[t + 1]
        before = torch.cat([torch.zeros(1, 1, 6), after[:, :-1]], dim=1)
        raw = ((z - before[..., :3]).pow(2) / before[..., 3:].exp()).mean(-1)[0]
        raw = raw.clamp(max=RAW_CAP)
        padded = torch.cat([torch.zeros(5), raw])
        expected = torch.stack([padded[t : t + 6].mean() for t in range(9)])
    assert float(raw[7]) == RAW_CAP
    torch.testing.assert_close(score[0], expected)
    torch.testing.assert_close(pred, after[:, -1:])
    torch.testing.assert_close(win[0, :, 0], raw[-6:])


def test_anomaly_score_at_a_step_describes_that_step() -> None:
    """Changing input t changes the score from step t on, never before: a score shifted
    by a step (judging t by t+1's input) would be caught here."""
    net = build(_config("lstm", "anomaly", 2), seed=3).eval()
    x = torch.randn(1, 12, 3)
    moved = x.clone()
    moved[0, 5] += 4.0
    with torch.no_grad():
        a, _ = net(x, net.initial_state(1))
        b, _ = net(moved, net.initial_state(1))
    assert torch.equal(a[0, :5], b[0, :5])
    assert float(b[0, 5]) != float(a[0, 5])


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
    with pytest.raises(ValueError, match="window"):
        NetConfig(task="seq2seq", cell="gru", n_features=2, targets=(0,), horizon=3)
