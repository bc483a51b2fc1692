"""A windowed causal convolutional classifier (dilated TCN) as a step model.

Keyword spotters convolve over log-mel frames with the bands as channels (TC-ResNet,
Choi et al. 2019); a *causal* stack of dilated convolutions (kernel 3, dilations 1, 2,
4, ...) sees a fixed window of past frames, about 1.3 s at 10 ms frames with six
blocks. That window is the point for a stream that is never reset: the output depends
on the last ``receptive_field`` frames and nothing older, so a clip trained from a
fresh start and the same audio heard after an hour of speech give the same answer. A
recurrent core, or the running mean of :mod:`models.fcn`, carries everything it has
heard, and a live stream's state then differs from any state training produced.

Each convolution carries its last ``(k-1) * d`` inputs as state
``conv{i}[batch, C_in, (k-1)*d]`` (zeros: the training mean, after normalisation), so
the graph is ``concat(buffer, x) -> Conv(dilation=d)`` without padding and one call
over T steps equals T calls of one step. Blocks whose input and output widths match are
residual. No batch statistics: nothing differs between training and the step model.

The contract's ``cell``/``layers``/``hidden`` describe a recurrent core this network
does not have; the exporter writes ``gru`` x1 with ``hidden`` = the last block's width
and the real shape under ``extra`` (``arch: tcn``, filters, kernels, dilations), which
``seqstream info`` prints.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.nets import NetConfig, SeqNet, State
from pipeline.contract import BATCH, StateSpec


def receptive_field(kernels: tuple[int, ...], dilations: tuple[int, ...]) -> int:
    """Frames one output depends on."""
    return 1 + sum((k - 1) * d for k, d in zip(kernels, dilations, strict=True))


class TCNNet(SeqNet):
    """Normalisation -> causal dilated conv blocks (ReLU, residual) -> softmax, per step.

    ``config.dropout`` applies after every block (training only): the keyword data's
    voices are few, and without it the stack learns them rather than the words.
    """

    def __init__(self, config: NetConfig) -> None:
        super().__init__(config)
        if config.task != "classify":
            raise ValueError("the TCN network classifies")
        self.convs = nn.ModuleList()
        c_in = config.n_features
        for c_out, k, d in zip(config.filters, config.kernels, config.dilations, strict=True):
            self.convs.append(nn.Conv1d(c_in, c_out, k, dilation=d))
            c_in = c_out
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(c_in, config.n_classes)

    def _layout(self) -> list[tuple[int, int, int, int]]:
        """(c_in, c_out, kernel, dilation) of each convolution."""
        cfg = self.config
        widths = (cfg.n_features, *cfg.filters)
        return [
            (widths[i], c_out, k, d)
            for i, (c_out, k, d) in enumerate(
                zip(cfg.filters, cfg.kernels, cfg.dilations, strict=True)
            )
        ]

    def state_specs(self) -> tuple[StateSpec, ...]:
        return tuple(
            StateSpec(f"conv{i}", f"conv{i}_out", (BATCH, c_in, (k - 1) * d))
            for i, (c_in, _, k, d) in enumerate(self._layout())
            if k > 1
        )

    def train_outputs(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """Logits ``[B, T, classes]`` and the new state."""
        bufs = list(state)
        h = self.normalise(x).transpose(1, 2)  # [B, C, T]
        new_bufs: list[Tensor] = []
        for (c_in, c_out, k, d), conv in zip(self._layout(), self.convs, strict=True):
            if k > 1:
                full = torch.cat([bufs.pop(0), h], dim=2)
                new_bufs.append(full[:, :, -(k - 1) * d :])
            else:
                full = h
            y = self.drop(torch.relu(conv(full)))
            h = y + h if c_in == c_out else y
        logits = self.head(self.drop(h.transpose(1, 2)))
        return logits, tuple(new_bufs)

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        logits, new_state = self.train_outputs(x, state)
        return torch.softmax(logits, dim=-1), new_state

    def outputs(self, x: Tensor, state: State) -> tuple[tuple[Tensor, ...], State]:
        probs, new_state = self(x, state)
        return (probs,), new_state
