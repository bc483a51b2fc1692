"""Stateful sequence networks: one recurrent core, one head per task.

Every network maps raw inputs ``x[B, T, F]`` and a state tuple to an output at every
step plus the new state, so the same module trains on whole sequences and exports as
a step model (:mod:`models.export`). Normalisation is a buffer inside the module, so
the exported graph takes raw values and training/serving cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.contract import CELLS, TASKS

State = tuple[Tensor, ...]

_RNNS: dict[str, Callable[..., nn.Module]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


@dataclass(frozen=True)
class NetConfig:
    """Architecture of a :class:`StepNet`; saved in checkpoints to rebuild it."""

    task: str
    cell: str
    n_features: int
    hidden: int = 64
    layers: int = 2
    n_classes: int = 0
    targets: tuple[int, ...] = ()  # feature indices forecast by a forecaster
    horizon: int = 1
    dropout: float = 0.0
    mean: tuple[float, ...] = field(default_factory=tuple)
    std: tuple[float, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.task == "classify" and self.n_classes < 2:
            raise ValueError("a classifier needs at least two classes")
        if self.task == "forecast" and (not self.targets or self.horizon < 1):
            raise ValueError("a forecaster needs target channels and a horizon >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> NetConfig:
        doc = dict(doc)
        for key in ("targets", "mean", "std"):
            doc[key] = tuple(doc.get(key, ()))
        return cls(**doc)


class RecurrentCore(nn.Module):
    """Stacked LSTM/GRU/RNN with an explicit state: ``(x, state) -> (y, new_state)``."""

    def __init__(
        self, cell: str, n_in: int, hidden: int, layers: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.cell = cell
        self.layers = layers
        self.hidden = hidden
        self.rnn = _RNNS[cell](
            n_in, hidden, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0
        )

    def initial_state(self, batch: int, device: torch.device | None = None) -> State:
        zeros = torch.zeros(self.layers, batch, self.hidden, device=device)
        return (zeros, zeros.clone()) if self.cell == "lstm" else (zeros,)

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        if self.cell == "lstm":
            y, (h, c) = self.rnn(x, (state[0], state[1]))
            return y, (h, c)
        y, h = self.rnn(x, state[0])
        return y, (h,)


class StepNet(nn.Module):
    """Normalisation -> recurrent core -> task head, producing an output at every step.

    ``forward`` returns what the exported graph returns (class probabilities, or the
    forecast in raw units); ``train_outputs`` returns what the loss needs (logits, or
    the forecast in normalised units).
    """

    mean: Tensor
    std: Tensor
    target_idx: Tensor

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        n = config.n_features
        mean = torch.tensor(config.mean or [0.0] * n, dtype=torch.float32)
        std = torch.tensor(config.std or [1.0] * n, dtype=torch.float32)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.core = RecurrentCore(config.cell, n, config.hidden, config.layers, config.dropout)
        if config.task == "classify":
            self.head = nn.Linear(config.hidden, config.n_classes)
        else:
            k = len(config.targets)
            self.head = nn.Linear(config.hidden, config.horizon * k)
            self.register_buffer("target_idx", torch.tensor(config.targets, dtype=torch.long))

    def initial_state(self, batch: int) -> State:
        return self.core.initial_state(batch, device=self.mean.device)

    def normalise(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def train_outputs(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        z = self.normalise(x)
        y, new_state = self.core(z, state)
        out = self.head(y)
        if self.config.task == "forecast":
            b, t, _ = out.shape
            k = len(self.config.targets)
            # Residual on the current value: the network learns the change, which keeps an
            # untrained or undertrained forecaster at the naive "no change" forecast.
            last = z.index_select(2, self.target_idx).unsqueeze(2)
            out = out.reshape(b, t, self.config.horizon, k) + last
        return out, new_state

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        out, new_state = self.train_outputs(x, state)
        if self.config.task == "classify":
            return torch.softmax(out, dim=-1), new_state
        mean = self.mean.index_select(0, self.target_idx)
        std = self.std.index_select(0, self.target_idx)
        return out * std + mean, new_state


def build(config: NetConfig, seed: int | None = None) -> StepNet:
    if seed is not None:
        torch.manual_seed(seed)
    return StepNet(config)


def normalisation(cases: Sequence[Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-feature mean and std over all steps of ``cases`` (numpy ``[T, F]`` arrays).

    Constant features get std 1 so the graph never divides by zero.
    """
    import numpy as np

    flat = np.concatenate([np.asarray(c, dtype=np.float64) for c in cases], axis=0)
    mean = flat.mean(axis=0)
    std = flat.std(axis=0)
    std[~(std > 1e-8)] = 1.0
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
