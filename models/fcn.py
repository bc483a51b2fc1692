"""A causal fully convolutional classifier (FCN, optionally beside a GRU) as a step model.

FCN (Wang et al. 2017: three conv blocks, kernels 8/5/3, batch norm, ReLU, global
average pooling) and LSTM-FCN are among the strongest deep classifiers on long
univariate series, where a plain recurrent stack struggles to carry gradients over
hundreds of steps. Both become streaming step models with two changes:

* each convolution is **causal**: it sees its last ``k-1`` inputs, carried as a state
  tensor ``conv{i}[batch, C_in, k-1]`` (zeros = the training mean for the first block),
  so the graph is ``concat(buffer, x) -> Conv`` without padding and the new buffer is
  the last ``k-1`` columns;
* global average pooling is a **running mean** of the last block's outputs since the
  stream's start, carried as ``mean[batch, C]`` beside the step count ``count[batch, 1]``;
  within a call it is a cumulative sum over time, so one call over T steps equals T
  calls of one step.

The head is linear + softmax at every step over the running mean (and, with ``layers``
>= 1 ... here always one layer, the GRU branch's output). A classification case is
delimited by a stream reset, so the mean covers exactly the case so far; a stream that
is never reset keeps averaging over everything it has seen, each new step weighing
``1/n``: the prediction settles instead of following the signal. That is what a
case-level classifier means; the carried state is a mean (not a sum), so nothing grows
without bound, and ``count`` in float32 counts exactly up to 2**24 steps (about 19 days
at 10 Hz), after which new steps stop moving the mean at all. Streams that must follow
a changing signal need resets at case boundaries (or a windowed model), and the model
docs say so.

Batch norm is trained with masks (padded steps of shorter cases never enter the batch
statistics, which matters for unequal-length data) and becomes a per-channel affine
map in evaluation, which the exporter folds into the preceding convolution.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from models.nets import NetConfig, RecurrentCore, SeqNet, State
from pipeline.contract import BATCH, StateSpec, recurrent_state


class MaskedBatchNorm(nn.BatchNorm1d):
    """Batch norm over ``[B, C, T]`` whose training statistics skip padded steps."""

    def masked(self, x: Tensor, mask: Tensor | None) -> Tensor:
        if not self.training or mask is None:
            return super().forward(x)
        m = mask[:, None, :].to(x.dtype)  # [B, 1, T]
        n = m.sum().clamp(min=1.0)
        mean = (x * m).sum(dim=(0, 2)) / n
        var = ((x - mean[None, :, None]).pow(2) * m).sum(dim=(0, 2)) / n
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        with torch.no_grad():
            mom = self.momentum if self.momentum is not None else 0.1
            self.running_mean.mul_(1 - mom).add_(mom * mean)
            self.running_var.mul_(1 - mom).add_(mom * var * n / (n - 1).clamp(min=1.0))
            self.num_batches_tracked.add_(1)
        z = (x - mean[None, :, None]) / torch.sqrt(var[None, :, None] + self.eps)
        return z * self.weight[None, :, None] + self.bias[None, :, None]


class FCNNet(SeqNet):
    """Normalisation -> causal conv blocks -> running mean (+ GRU) -> softmax, per step.

    ``config.filters``/``config.kernels`` size the blocks; ``config.hidden`` the GRU
    branch over the normalised input (``cell``), ``config.layers`` its depth.
    """

    def __init__(self, config: NetConfig) -> None:
        super().__init__(config)
        if config.task != "classify":
            raise ValueError("the FCN network classifies")
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        c_in = config.n_features
        for c_out, k in zip(config.filters, config.kernels, strict=True):
            self.convs.append(nn.Conv1d(c_in, c_out, k, bias=False))
            self.norms.append(MaskedBatchNorm(c_out))
            c_in = c_out
        self.core = RecurrentCore(config.cell, config.n_features, config.hidden, config.layers)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(c_in + config.hidden, config.n_classes)

    def state_specs(self) -> tuple[StateSpec, ...]:
        cfg = self.config
        specs = list(recurrent_state(cfg.cell, cfg.layers, cfg.hidden))
        c_in = cfg.n_features
        for i, (c_out, k) in enumerate(zip(cfg.filters, cfg.kernels, strict=True)):
            if k > 1:
                specs.append(StateSpec(f"conv{i}", f"conv{i}_out", (BATCH, c_in, k - 1)))
            c_in = c_out
        specs.append(StateSpec("mean", "mean_out", (BATCH, c_in)))
        specs.append(StateSpec("count", "count_out", (BATCH, 1)))
        return tuple(specs)

    def train_outputs(
        self, x: Tensor, state: State, mask: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """Logits ``[B, T, classes]`` and the new state; ``mask[B, T]`` (training only)
        marks real steps for the batch statistics."""
        n_rec = 2 if self.config.cell == "lstm" else 1
        rec, rest = state[:n_rec], list(state[n_rec:])
        z = self.normalise(x)
        y, new_rec = self.core(z, tuple(rec))
        h = z.transpose(1, 2)  # [B, C, T]
        new_bufs: list[Tensor] = []
        for k, conv, norm in zip(self.config.kernels, self.convs, self.norms, strict=True):
            if k > 1:
                full = torch.cat([rest.pop(0), h], dim=2)
                new_bufs.append(full[:, :, -(k - 1) :])
            else:
                full = h
            h = torch.relu(norm.masked(conv(full), mask))  # type: ignore[operator]
        mean, count = rest
        steps = torch.ones_like(h[:, :1, :]).cumsum(dim=2)  # [B, 1, T]: 1, 2, ..., T
        total = count[:, :, None] + steps
        running = (mean[:, :, None] * count[:, :, None] + h.cumsum(dim=2)) / total
        feats = torch.cat([running.transpose(1, 2), self.drop(y)], dim=2)
        logits = self.head(feats)
        new_state = (*new_rec, *new_bufs, running[:, :, -1], total[:, :, -1])
        return logits, new_state

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        logits, new_state = self.train_outputs(x, state)
        return torch.softmax(logits, dim=-1), new_state

    def outputs(self, x: Tensor, state: State) -> tuple[tuple[Tensor, ...], State]:
        probs, new_state = self(x, state)
        return (probs,), new_state


class FCNEnsemble(SeqNet):
    """``config.members`` FCN networks side by side in one step model, probabilities averaged.

    Why: on data sets of a few dozen cases (ArrowHead: 36) one network fits its training
    cases perfectly and its test accuracy depends on the seed (0.79-0.83 over seeds
    0-2); the mean of separately seeded members is the usual cure for both. Each member
    keeps its own state tensors, named ``m{i}_<name>``, so the runtime carries them like
    any others; the engine's cost grows with the number of members.
    """

    def __init__(self, config: NetConfig) -> None:
        super().__init__(config)
        one = dataclasses.replace(config, members=1)
        nets = [FCNNet(one) for _ in range(config.members)]
        self._sizes = [len(m.state_specs()) for m in nets]
        self.members = nn.ModuleList(nets)

    def member_nets(self) -> list[FCNNet]:
        return [m for m in self.members if isinstance(m, FCNNet)]

    def state_specs(self) -> tuple[StateSpec, ...]:
        return tuple(
            dataclasses.replace(s, name=f"m{i}_{s.name}", output=f"m{i}_{s.output}")
            for i, m in enumerate(self.member_nets())
            for s in m.state_specs()
        )

    def train_outputs(
        self, x: Tensor, state: State, mask: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """Log of the members' mean probabilities (a softmax of it gives the mean back)."""
        logps: list[Tensor] = []
        new_state: list[Tensor] = []
        at = 0
        for member, n in zip(self.member_nets(), self._sizes, strict=True):
            logits, st = member.train_outputs(x, state[at : at + n], mask)
            logps.append(torch.log_softmax(logits, dim=-1))
            new_state.extend(st)
            at += n
        mean = torch.logsumexp(torch.stack(logps), dim=0) - math.log(len(logps))
        return mean, tuple(new_state)

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        logits, new_state = self.train_outputs(x, state)
        return torch.softmax(logits, dim=-1), new_state

    def outputs(self, x: Tensor, state: State) -> tuple[tuple[Tensor, ...], State]:
        probs, new_state = self(x, state)
        return (probs,), new_state
