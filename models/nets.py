"""Stateful sequence networks: one recurrent core, one network per task.

Every network maps raw inputs ``x[B, T, F]`` and a state tuple to the task's outputs
at every step plus the new state (:meth:`SeqNet.outputs`), so the same module trains
on whole sequences and exports as a step model (:mod:`models.export`). Normalisation
is a buffer inside the module, so the exported graph takes raw values and
training/serving cannot drift apart. Each network also names its state tensors
(:meth:`SeqNet.state_specs`): the runtime carries them generically, whatever they hold.

* :class:`StepNet` (classify, forecast): core -> linear head at every step.
* :class:`AnomalyNet` (anomaly): a carried core predicts each next input as a Gaussian;
  the score is the error in predicted standard deviations, averaged over the last W steps.
* :class:`Seq2SeqNet` (seq2seq): a carried encoder; the last W encoder outputs are the
  carried state; a decoder with additive attention over them emits H values per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.contract import BATCH, CELLS, TASKS, StateSpec, recurrent_state

State = tuple[Tensor, ...]

# Anomaly: bounds of the predicted log-variance (normalised units; a std of 0.02 to 55)
# and the cap on one step's raw score, so one wild step cannot outweigh a whole
# stretch of surprising ones in the smoothed score.
LOGVAR_MIN, LOGVAR_MAX = -8.0, 8.0
RAW_CAP = 100.0

_RNNS: dict[str, Callable[..., nn.Module]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
_CELLS: dict[str, Callable[..., nn.Module]] = {
    "lstm": nn.LSTMCell,
    "gru": nn.GRUCell,
    "rnn": nn.RNNCell,
}


@dataclass(frozen=True)
class NetConfig:
    """Architecture of a network; saved in checkpoints to rebuild it."""

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
    window: int = 0  # anomaly: steps the score is averaged over; seq2seq: steps attended to
    # classify: "rnn" (StepNet) or "fcn" (models.fcn.FCNNet: causal conv blocks of these
    # filters/kernels, running mean, beside a recurrent branch of `layers` x `hidden`)
    # or "tcn" (models.tcn.TCNNet: a windowed stack of causal convolutions with these
    # filters/kernels/dilations and no recurrent core)
    arch: str = "rnn"
    filters: tuple[int, ...] = ()
    kernels: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    # fcn: networks of this architecture side by side in one step model, each with its
    # own state and seed, their probabilities averaged (models.fcn.FCNEnsemble)
    members: int = 1

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.task == "classify" and self.n_classes < 2:
            raise ValueError("a classifier needs at least two classes")
        if self.task in ("forecast", "seq2seq") and (not self.targets or self.horizon < 1):
            raise ValueError("a forecaster needs target channels and a horizon >= 1")
        if self.task in ("anomaly", "seq2seq") and self.window < 1:
            raise ValueError(f"task {self.task} needs a window >= 1")
        if self.arch not in ("rnn", "fcn", "tcn") or (self.arch != "rnn") != bool(self.filters):
            raise ValueError(f"arch {self.arch!r}: 'fcn'/'tcn' need filters, 'rnn' none")
        if len(self.filters) != len(self.kernels) or min(self.kernels, default=1) < 1:
            raise ValueError("filters and kernels must pair up, kernels >= 1")
        if (self.arch == "tcn") != bool(self.dilations) or (
            self.dilations and (len(self.dilations) != len(self.filters) or min(self.dilations) < 1)
        ):
            raise ValueError("'tcn' needs one dilation >= 1 per filter, other archs none")
        if self.members < 1 or (self.members > 1 and self.arch != "fcn"):
            raise ValueError("members: >= 1, and more than one only with arch 'fcn'")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> NetConfig:
        doc = dict(doc)
        doc.pop("pool", None)  # written by the reconstructing anomaly model (before 2026-12)
        for key in ("targets", "mean", "std", "filters", "kernels", "dilations"):
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


class SeqNet(nn.Module):
    """What every network shares: normalisation buffers and the step-model interface."""

    mean: Tensor
    std: Tensor

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        n = config.n_features
        self.register_buffer("mean", torch.tensor(config.mean or [0.0] * n, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(config.std or [1.0] * n, dtype=torch.float32))

    def normalise(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def initial_state(self, batch: int) -> State:
        """Zeros shaped like :meth:`state_specs` (every spec's ``init`` is 0)."""
        return tuple(
            torch.zeros(
                *(batch if d == BATCH else int(d) for d in s.shape), device=self.mean.device
            )
            for s in self.state_specs()
        )

    def state_specs(self) -> tuple[StateSpec, ...]:
        raise NotImplementedError

    def outputs(self, x: Tensor, state: State) -> tuple[tuple[Tensor, ...], State]:
        """The exported graph: the task outputs (contract order) and the new state."""
        raise NotImplementedError


class StepNet(SeqNet):
    """Normalisation -> recurrent core -> task head, producing an output at every step.

    ``forward`` returns what the exported graph returns (class probabilities, or the
    forecast in raw units); ``train_outputs`` returns what the loss needs (logits, or
    the forecast in normalised units).
    """

    target_idx: Tensor

    def __init__(self, config: NetConfig) -> None:
        super().__init__(config)
        n = config.n_features
        self.core = RecurrentCore(config.cell, n, config.hidden, config.layers, config.dropout)
        if config.task == "classify":
            self.head = nn.Linear(config.hidden, config.n_classes)
        else:
            k = len(config.targets)
            self.head = nn.Linear(config.hidden, config.horizon * k)
            self.register_buffer("target_idx", torch.tensor(config.targets, dtype=torch.long))

    def state_specs(self) -> tuple[StateSpec, ...]:
        return recurrent_state(self.config.cell, self.config.layers, self.config.hidden)

    def initial_state(self, batch: int) -> State:
        return self.core.initial_state(batch, device=self.mean.device)

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

    def outputs(self, x: Tensor, state: State) -> tuple[tuple[Tensor, ...], State]:
        out, new_state = self(x, state)
        return (out,), new_state


def sliding(memory: Tensor, new: Tensor) -> tuple[Tensor, Tensor]:
    """Windows over a carried memory: ``memory[B, W, D]`` then ``new[B, T, D]``.

    Returns ``windows[B, T, W, D]`` (row t: the W rows ending with ``new[:, t]``) and the
    memory to carry on (the last W rows). A gather with a ``Range`` index in ONNX, so
    one call over T steps equals T calls of one step.
    """
    w = memory.shape[1]
    t = new.shape[1]
    full = torch.cat([memory, new], dim=1)
    idx = torch.arange(t).unsqueeze(1) + torch.arange(1, w + 1).unsqueeze(0)
    windows = full.index_select(1, idx.reshape(-1))
    return windows.reshape(full.shape[0], t, w, full.shape[2]), full[:, -w:]


class AnomalyNet(SeqNet):
    """Predicts each next input as a Gaussian; the score is the surprise, smoothed.

    A carried recurrent core reads the normalised inputs and at every step predicts the
    next input's mean and log-variance. When step t arrives, its raw score is the
    squared error of the prediction made at t-1 in units of the predicted variance
    (mean over features, capped at :data:`RAW_CAP`), so the steps a normal series makes
    hard to predict (an ECG's QRS upstroke) count little and a beat where the rhythm
    says "flat" counts a lot. ``score`` is the mean raw score of the last W steps (W =
    ``window``, by default one period of the training data): a labelled anomaly is a
    stretch of rows, and one cycle's mean lets a normal cycle's peaks average out.

    State: the core's ``h`` (``c``), ``pred [B, 1, 2F]`` (the last prediction: mean and
    log-variance) and ``win [B, W, 1]`` (the last W raw scores, 0 before a stream has
    W steps); all zeros initially, so a stream's first step is judged against the
    training mean. The threshold lives in the metadata, not the graph.
    """

    def __init__(self, config: NetConfig) -> None:
        super().__init__(config)
        n, h = config.n_features, config.hidden
        self.core = RecurrentCore(config.cell, n, h, config.layers, config.dropout)
        self.head = nn.Linear(h, 2 * n)

    def state_specs(self) -> tuple[StateSpec, ...]:
        cfg = self.config
        return (
            *recurrent_state(cfg.cell, cfg.layers, cfg.hidden),
            StateSpec("pred", "pred_out", (BATCH, 1, 2 * cfg.n_features)),
            StateSpec("win", "win_out", (BATCH, cfg.window, 1)),
        )

    def predict(self, z: Tensor, state: State) -> tuple[Tensor, State]:
        """Next-step predictions ``[B, T, 2F]`` (mean, clamped log-variance) of normalised
        inputs ``z``, from the core's state (``state`` without ``pred``/``win``)."""
        y, new_state = self.core(z, state)
        out = self.head(y)
        n = self.config.n_features
        return torch.cat([out[..., :n], out[..., n:].clamp(LOGVAR_MIN, LOGVAR_MAX)], -1), new_state

    def raw_scores(self, z: Tensor, previous: Tensor) -> Tensor:
        """``[B, T, 1]``: each step's squared error against the prediction made the step
        before (``previous[B, T, 2F]``), in predicted standard deviations, capped."""
        n = self.config.n_features
        err = (z - previous[..., :n]).pow(2) * torch.exp(-previous[..., n:])
        return err.mean(dim=-1, keepdim=True).clamp(max=RAW_CAP)

    def outputs(self, x: Tensor, state: State) -> tuple[tuple[Tensor, ...], State]:
        *rec, pred, win = state
        z = self.normalise(x)
        now, new_rec = self.predict(z, tuple(rec))
        raw = self.raw_scores(z, torch.cat([pred, now[:, :-1]], dim=1))
        windows, new_win = sliding(win, raw)
        score = windows.mean(dim=(2, 3))
        return (score,), (*new_rec, now[:, -1:], new_win)

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        (score,), new_state = self.outputs(x, state)
        return score, new_state


class Seq2SeqNet(SeqNet):
    """Encoder carried step by step; a decoder with additive attention emits H values.

    The encoder reads first differences of the normalised inputs (the previous input
    comes from the memory), so nothing depends on the series' level. The memory
    ``mem[B, W, hidden + F]`` holds the last W encoder outputs beside the inputs they
    saw. At every step the decoder starts from the encoder output; decoder step k
    scores each memory row with Bahdanau's ``v . tanh(U m_j + q_k)`` (the query from
    the decoder state, both sides plus learned embeddings of the row's age and of k)
    plus a learned bias per (k, age) (a relative-position bias: with it the attention
    finds "a season ago" in a third of the steps), and the forecast is the current
    value plus the attention-weighted change of the targets from the attended rows to
    now: a learned mix of "now", "a season ago" and what lies between, which cannot
    extrapolate the training data's level or shape.
    """

    target_idx: Tensor
    target_cols: Tensor

    def __init__(self, config: NetConfig) -> None:
        super().__init__(config)
        n, h, w = config.n_features, config.hidden, config.window
        k = len(config.targets)
        self.width = h + n
        self.encoder = RecurrentCore(config.cell, n, h, config.layers, config.dropout)
        self.key = nn.Linear(self.width, h, bias=False)
        self.query = nn.Linear(h, h)
        self.energy = nn.Linear(h, 1, bias=False)
        self.age = nn.Parameter(torch.zeros(w, h))
        self.step = nn.Parameter(torch.zeros(config.horizon, h))
        self.position = nn.Parameter(torch.zeros(config.horizon, w))
        self.decoder = _CELLS[config.cell](k + self.width, h)
        self.register_buffer("target_idx", torch.tensor(config.targets, dtype=torch.long))
        self.register_buffer("target_cols", torch.tensor([h + i for i in config.targets]))

    def state_specs(self) -> tuple[StateSpec, ...]:
        cfg = self.config
        mem = StateSpec("mem", "mem_out", (BATCH, cfg.window, self.width))
        return (*recurrent_state(cfg.cell, cfg.layers, cfg.hidden), mem)

    def train_outputs(
        self, x: Tensor, state: State, positions: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """Forecasts in normalised units ``[B, T, H, J]``, or ``[B, P, H, J]`` at
        ``positions[B, P]`` only (training decodes a sample of steps)."""
        cfg = self.config
        b, t = x.shape[0], x.shape[1]
        z = self.normalise(x)
        *rec, mem = state
        previous = torch.cat([mem[:, -1:, cfg.hidden :], z[:, :-1]], dim=1)
        y, new_rec = self.encoder(z - previous, tuple(rec))
        windows, new_mem = sliding(mem, torch.cat([y, z], dim=2))
        now, top = z, y
        if positions is not None:
            rows = torch.arange(b).unsqueeze(1)
            windows, now, top = windows[rows, positions], z[rows, positions], y[rows, positions]
        n = windows.shape[0] * windows.shape[1]
        # Each memory row relative to now: encoder output, and input minus current input.
        windows = windows.reshape(n, cfg.window, self.width)
        now = now.reshape(n, 1, cfg.n_features)
        zeros = torch.zeros_like(windows[:, :, : cfg.hidden])
        values = windows - torch.cat([zeros, now.expand(-1, cfg.window, -1)], dim=2)
        keys = self.key(values) + self.age
        h = top.reshape(n, cfg.hidden)
        c = torch.zeros_like(h)
        prev = torch.zeros_like(values[:, 0, : len(cfg.targets)])
        steps = []
        for k in range(cfg.horizon):
            query = self.query(h) + self.step[k]
            energy = self.energy(torch.tanh(keys + query.unsqueeze(1))).squeeze(2)
            energy = energy + self.position[k]
            weights = torch.softmax(energy, dim=1)
            context = torch.bmm(weights.unsqueeze(1), values).squeeze(1)
            if cfg.cell == "lstm":
                h, c = self.decoder(torch.cat([prev, context], dim=1), (h, c))
            else:
                h = self.decoder(torch.cat([prev, context], dim=1), h)
            prev = context.index_select(1, self.target_cols)
            steps.append(prev)
        change = torch.stack(steps, dim=1)  # [n, H, J]
        out = change + now.reshape(n, 1, cfg.n_features).index_select(2, self.target_idx)
        p = t if positions is None else positions.shape[1]
        return out.reshape(b, p, cfg.horizon, len(cfg.targets)), (*new_rec, new_mem)

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        out, new_state = self.train_outputs(x, state)
        mean = self.mean.index_select(0, self.target_idx)
        std = self.std.index_select(0, self.target_idx)
        return out * std + mean, new_state

    def outputs(self, x: Tensor, state: State) -> tuple[tuple[Tensor, ...], State]:
        out, new_state = self(x, state)
        return (out,), new_state


_NETS: dict[str, Callable[[NetConfig], SeqNet]] = {
    "classify": StepNet,
    "forecast": StepNet,
    "anomaly": AnomalyNet,
    "seq2seq": Seq2SeqNet,
}


def build(config: NetConfig, seed: int | None = None) -> SeqNet:
    if seed is not None:
        torch.manual_seed(seed)
    if config.arch == "fcn":
        from models.fcn import FCNEnsemble, FCNNet  # imports this module

        return FCNEnsemble(config) if config.members > 1 else FCNNet(config)
    if config.arch == "tcn":
        from models.tcn import TCNNet  # imports this module

        return TCNNet(config)
    return _NETS[config.task](config)


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
