"""The recurrent core's stateful interface: stepping with carried state == one call."""

from __future__ import annotations

import pytest
import torch

from models.nets import NetConfig, build

CELLS = ["lstm", "gru", "rnn"]


def _config(cell: str, task: str, layers: int) -> NetConfig:
    return NetConfig(
        task=task,
        cell=cell,
        n_features=3,
        hidden=8,
        layers=layers,
        n_classes=4 if task == "classify" else 0,
        targets=(0, 2) if task == "forecast" else (),
        horizon=5,
        mean=(1.0, -2.0, 0.5),
        std=(2.0, 0.5, 1.0),
    )


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("task", ["classify", "forecast"])
@pytest.mark.parametrize("layers", [1, 3])
def test_stepping_with_carried_state_equals_one_call(cell: str, task: str, layers: int) -> None:
    net = build(_config(cell, task, layers), seed=1).eval()
    x = torch.randn(2, 12, 3)
    with torch.no_grad():
        full, full_state = net(x, net.initial_state(2))
        state = net.initial_state(2)
        steps = []
        for t in range(12):
            out, state = net(x[:, t : t + 1], state)
            steps.append(out)
    assert len(state) == (2 if cell == "lstm" else 1)
    assert all(s.shape == (layers, 2, 8) for s in state)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    for a, b in zip(state, full_state, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_output_shapes_per_task() -> None:
    x = torch.randn(4, 7, 3)
    clf = build(_config("lstm", "classify", 2)).eval()
    probs, _ = clf(x, clf.initial_state(4))
    assert probs.shape == (4, 7, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 7))
    fc = build(_config("gru", "forecast", 2)).eval()
    y, _ = fc(x, fc.initial_state(4))
    assert y.shape == (4, 7, 5, 2)


def test_untrained_forecaster_predicts_no_change_in_raw_units() -> None:
    """The residual head starts near 'no change': zero head weights give exactly x_t."""
    net = build(_config("lstm", "forecast", 1)).eval()
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
