"""Training: data in, a checkpoint directory out.

``train(config)`` reads the data with :mod:`pipeline.offline.datasets` (the same readers the
runtime's ``eval`` and ``replay`` use), computes normalisation on the training split
only, fits with early stopping on a validation split, and writes ``config.json``,
``checkpoint.pt``, ``metrics.json`` and ``curve.png`` into ``config.out``.

Streaming shapes the losses: a classifier is scored at every step (mostly at the last),
so its running prediction is useful before a sequence ends; a forecaster is trained on
windows with carried context and scored only after a short warm-up; a seq2seq model
likewise, decoding a sample of positions per window once its attention memory is full;
an anomaly model predicts each next step as a Gaussian (negative log-likelihood on
chunks of the training part free of labelled anomalies, after a warm-up), its score
averaged over one period of the training data (:func:`dominant_period`) unless
``--context`` says otherwise. An anomaly model's threshold is a high quantile of its
scores on the training part.

Defaults differ by task (:data:`TASK_DEFAULTS`, applied by :meth:`TrainConfig.for_task`):
a classifier is chosen by :mod:`models.search` (causal FCN candidates, ``arch="auto"``)
unless the recurrent stack is named; the forecaster reaches MASE ~0.5 on water flow; the
anomaly ones beat the difference baseline on two ECG sets (``docs/models/README.md``)
and the seq2seq ones are sized for hourly data with a daily season; both train in
about a minute on 2 cores.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models import checkpoint, naming
from models.export import spec_for
from models.nets import (
    AnomalyNet,
    NetConfig,
    Seq2SeqNet,
    SeqNet,
    StepNet,
    build,
    normalisation,
)
from models.progress import progress
from models.search import step_loss
from models.tcn import TCNNet
from pipeline.contract import TASKS
from pipeline.errors import ConfigError, DataError
from pipeline.offline import datasets, evaluation, scoring

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; written to ``config.json`` as resolved."""

    task: str
    data: str
    out: str
    test: str | None = None
    cell: str = "lstm"
    hidden: int = 64
    layers: int = 2
    epochs: int = 200
    seed: int = 0
    batch_size: int = 16
    lr: float = 3e-3
    patience: int = 40
    val_fraction: float = 0.2
    dropout: float = 0.0
    name: str | None = None
    # forecasting
    targets: tuple[str, ...] = ()
    horizon: int = 1
    season: int = 1
    window: int = 96
    warmup: int = 8
    test_fraction: float = 0.2
    # anomaly (steps the score is averaged over; 0 = one period of the training data)
    # and seq2seq (attention memory): the model's window
    context: int = 0
    # classify: "rnn" (the recurrent stack above), "fcn" or "auto" (models.search: the
    # best of a few causal-conv candidates within `budget` CPU seconds, a ceiling)
    arch: str = "rnn"
    budget: float = 300.0
    steps: int = 0  # fcn/auto: optimiser steps of the final fit (0: models.search's)
    # tcn: a windowed causal conv stack (models.tcn); empty = TCN_LAYOUT, kernels all 3
    filters: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    members: int = 1  # fcn/auto: the chosen architecture fit this many times, one model
    threshold_quantile: float = 0.99  # anomaly: of the training part's scores
    # metadata for sensor authors (models.naming): names[unit] and the rate, else the data's
    feature_names: tuple[str, ...] = ()
    sample_rate_hz: float | None = None
    # how to read the data files (see pipeline.commands.data_args)
    data_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_task(cls, **given: Any) -> TrainConfig:
        """A config from the options given (``None`` = not given) over the task's defaults."""
        chosen = {k: v for k, v in given.items() if v is not None}
        if chosen.get("task") == "classify" and "arch" not in chosen:
            # naming the recurrent stack asks for it; otherwise the search decides
            named = any(k in chosen for k in ("cell", "hidden", "layers"))
            chosen["arch"] = "rnn" if named else "auto"
        return cls(**{**TASK_DEFAULTS.get(chosen.get("task", ""), {}), **chosen})

    def __post_init__(self) -> None:
        sized = self.task in ("anomaly", "seq2seq")
        checks = [
            (self.task in TASKS, "task", f"must be one of {', '.join(TASKS)}"),
            (self.cell in ("lstm", "gru", "rnn"), "cell", "must be lstm, gru or rnn"),
            (self.hidden >= 1, "hidden", "must be >= 1"),
            (self.layers >= 1, "layers", "must be >= 1"),
            (self.epochs >= 1, "epochs", "must be >= 1"),
            (self.batch_size >= 1, "batch-size", "must be >= 1"),
            (self.lr > 0, "lr", "must be > 0"),
            (0 <= self.val_fraction < 1, "val-fraction", "must be in [0, 1)"),
            (0 < self.test_fraction < 1, "test-fraction", "must be in (0, 1)"),
            (self.horizon >= 1, "horizon", "must be >= 1"),
            (self.season >= 1, "season", "must be >= 1"),
            (self.window >= 2, "window", "must be >= 2"),
            (0 <= self.dropout < 1, "dropout", "must be in [0, 1)"),
            (
                not sized or self.context >= 1 or (self.task == "anomaly" and self.context == 0),
                "context",
                "must be >= 1 (anomaly: or 0, one period of the training data)",
            ),
            (self.warmup >= 0 and self.warmup < self.window, "warmup", "must be in [0, --window)"),
            (self.arch in ("rnn", "fcn", "auto", "tcn"), "arch", "must be rnn, fcn, auto or tcn"),
            (self.arch == "rnn" or self.task == "classify", "arch", "fcn/auto/tcn classify only"),
            (len(self.filters) == len(self.dilations), "filters", "one dilation per filter"),
            (self.budget > 0, "budget", "must be > 0 seconds"),
            (self.steps >= 0, "steps", "must be >= 0"),
            (self.members >= 1, "members", "must be >= 1"),
            (self.members == 1 or self.arch != "rnn", "members", "fcn/auto only"),
            (0 < self.threshold_quantile <= 1, "threshold-quantile", "must be in (0, 1]"),
            (
                self.task != "seq2seq" or self.window > self.context,
                "window",
                "must be longer than --context (the memory must fill before the loss counts)",
            ),
        ]
        for ok, key, problem in checks:
            if not ok:
                raise ConfigError(f"--{key}: {problem}")


TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "anomaly": {
        "hidden": 32,
        "layers": 1,
        "epochs": 30,
        "patience": 10,
        "batch_size": 64,
        "window": 256,
        "warmup": 32,
    },
    "seq2seq": {
        "hidden": 16,
        "layers": 1,
        "epochs": 40,
        "patience": 30,
        "lr": 1e-2,
        "context": 48,
        "window": 144,
    },
}
# tcn: (filters, dilations) of the causal conv stack, kernels 3: a 40 -> 64 input
# convolution, then six residual blocks; 129 frames (1.3 s at a 10 ms hop) per output.
TCN_LAYOUT: tuple[tuple[int, ...], tuple[int, ...]] = ((64,) * 7, (1, 1, 2, 4, 8, 16, 32))
# seq2seq: decoder positions sampled per training window (all of them cost T x H steps)
_POSITIONS = 16
# anomaly: batches of random chunks per epoch
_ANOMALY_BATCHES = 8


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0


def _pad(cases: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    """Right-pad to the longest case; padding after a case's end cannot reach its outputs."""
    lengths = torch.tensor([len(c) for c in cases])
    x = torch.zeros(len(cases), int(lengths.max()), cases[0].shape[1])
    for i, c in enumerate(cases):
        x[i, : len(c)] = torch.from_numpy(np.asarray(c, dtype=np.float32))
    return x, lengths


def _classify_loss(net: StepNet | TCNNet, x: Tensor, lengths: Tensor, y: Tensor) -> Tensor:
    logits, _ = net.train_outputs(x, net.initial_state(x.shape[0]))
    return step_loss(logits, lengths, y)


def _split_cases(
    n: int, labels: Sequence[str], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Stratified split of case indices into (train, validation)."""
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    for label in sorted(set(labels)):
        idx = [i for i in range(n) if labels[i] == label]
        rng.shuffle(idx)
        k = round(len(idx) * fraction) if len(idx) > 1 else 0
        val.extend(idx[:k])
        train.extend(idx[k:])
    return sorted(train), sorted(val)


def _fit(
    net: SeqNet,
    cfg: TrainConfig,
    train_step: Any,
    val_loss: Any,
    n_batches: int,
) -> History:
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=0.5, patience=max(2, cfg.patience // 3)
    )
    hist = History()
    best = math.inf
    best_state = {k: v.clone() for k, v in net.state_dict().items()}
    kind = cfg.cell if cfg.arch == "rnn" else cfg.arch
    bar = progress(range(cfg.epochs), desc=f"train {kind}")  # plain lines off a terminal
    for epoch in bar:
        net.train()
        total = 0.0
        for b in range(n_batches):
            opt.zero_grad()
            loss = train_step(b, epoch)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            total += float(loss.detach())
        net.eval()
        with torch.no_grad():
            v = float(val_loss())
        hist.train_loss.append(total / max(n_batches, 1))
        hist.val_loss.append(v)
        sched.step(v)
        if v < best - 1e-6:
            best = v
            hist.best_epoch = epoch
            best_state = {k: t.clone() for k, t in net.state_dict().items()}
        bar.set_postfix(loss=f"{hist.train_loss[-1]:.4f}", val=f"{v:.4f}", best=hist.best_epoch + 1)
        if epoch - hist.best_epoch >= cfg.patience:
            break
    bar.close()
    net.load_state_dict(best_state)
    net.eval()
    return hist


def _train_classifier(
    cfg: TrainConfig, data: datasets.Dataset
) -> tuple[SeqNet, History, dict[str, Any]]:
    if data.labels is None:
        raise DataError(f"{data.path}: classification needs class labels (for CSV: --label-column)")
    classes = list(data.classes) or sorted(set(data.labels))
    y_all = [classes.index(label) for label in data.labels]
    if cfg.arch in ("fcn", "auto"):
        from models import search

        fcn, losses, extra = search.train_classifier(cfg, data.cases, y_all, len(classes))
        return fcn, History(train_loss=losses, val_loss=losses), extra
    tr, va = _split_cases(len(data.cases), data.labels, cfg.val_fraction, cfg.seed)
    if not va:
        va = tr  # too few cases to hold any out: validate on training data (said in metrics)
    mean, std = normalisation([data.cases[i] for i in tr])
    shape: dict[str, Any] = {"cell": cfg.cell, "hidden": cfg.hidden, "layers": cfg.layers}
    if cfg.arch == "tcn":
        filters, dilations = (cfg.filters, cfg.dilations) if cfg.filters else TCN_LAYOUT
        # no recurrent core: the contract's cell fields name a stand-in (models.tcn)
        shape = {
            "arch": "tcn",
            "cell": "gru",
            "hidden": filters[-1],
            "layers": 1,
            "filters": filters,
            "kernels": (3,) * len(filters),
            "dilations": dilations,
        }
    net = build(
        NetConfig(
            task="classify",
            n_features=len(data.features),
            n_classes=len(classes),
            dropout=cfg.dropout,
            mean=mean,
            std=std,
            **shape,
        ),
        seed=cfg.seed,
    )
    assert isinstance(net, StepNet | TCNNet)
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    n_batches = math.ceil(len(tr) / cfg.batch_size)
    xv, lv = _pad([data.cases[i] for i in va])
    yv = torch.tensor([y_all[i] for i in va])

    def train_step(b: int, epoch: int) -> Tensor:
        nonlocal order
        if b == 0:
            order = [tr[i] for i in torch.randperm(len(tr), generator=gen).tolist()]
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        x, lengths = _pad([data.cases[i] for i in idx])
        # Small amplitude jitter: 40-case data sets overfit fast without it.
        x = x * (1 + 0.05 * torch.randn(x.shape[0], 1, x.shape[2], generator=gen))
        return _classify_loss(net, x, lengths, torch.tensor([y_all[i] for i in idx]))

    def val_loss() -> Tensor:
        return _classify_loss(net, xv, lv, yv)

    hist = _fit(net, cfg, train_step, val_loss, n_batches)
    extra = {"val_cases": len(va) if va is not tr else 0}
    return net, hist, extra


def predict_labels(net: SeqNet, cases: Sequence[np.ndarray]) -> list[int]:
    """Label at each case's last step, from one full-sequence call per case."""
    with torch.no_grad():
        x, lengths = _pad(cases)
        probs, _ = net(x, net.initial_state(x.shape[0]))
        return [int(i) for i in probs[torch.arange(x.shape[0]), lengths - 1].argmax(-1)]


@dataclass(frozen=True)
class _Series:
    """What forecaster and seq2seq training share: target columns, each case's split,
    the normalisation (training rows only), the cases and their horizon targets as
    tensors (raw units), and the targets' mean and std."""

    tidx: list[int]
    bounds: list[tuple[int, int]]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    cases: list[Tensor]
    ys: list[Tensor]
    t_mean: Tensor
    t_std: Tensor


def _series(cfg: TrainConfig, data: datasets.Dataset, least: int) -> _Series:
    """Targets checked and split: each case is [train | val | test tail], the tail never
    seen in training; a validation part starting before ``least`` is refused."""
    features = list(data.features)
    targets = list(cfg.targets) or features
    unknown = [t for t in targets if t not in features]
    if unknown:
        raise ConfigError(f"--target: {unknown} not among the data's columns {features}")
    tidx = [features.index(t) for t in targets]
    bounds = _split(data, cfg, least)
    mean, std = normalisation([c[:vs] for c, (vs, _) in zip(data.cases, bounds, strict=True)])
    return _Series(
        tidx=tidx,
        bounds=bounds,
        mean=mean,
        std=std,
        cases=[torch.from_numpy(np.asarray(c, dtype=np.float32)) for c in data.cases],
        ys=[
            torch.from_numpy(scoring.horizon_targets(c[:, tidx], cfg.horizon).astype(np.float32))
            for c in data.cases
        ],
        t_mean=torch.tensor([mean[i] for i in tidx]),
        t_std=torch.tensor([std[i] for i in tidx]),
    )


def _forecast_net_config(cfg: TrainConfig, task: str, n_features: int, s: _Series) -> NetConfig:
    """The net of a forecaster (``task`` forecast) or seq2seq model (window: the context)."""
    return NetConfig(
        task=task,
        cell=cfg.cell,
        n_features=n_features,
        hidden=cfg.hidden,
        layers=cfg.layers,
        targets=tuple(s.tidx),
        horizon=cfg.horizon,
        dropout=cfg.dropout,
        mean=s.mean,
        std=s.std,
        window=cfg.context if task == "seq2seq" else 0,
    )


def _train_forecaster(
    cfg: TrainConfig, data: datasets.Dataset
) -> tuple[StepNet, History, dict[str, Any]]:
    series = _series(cfg, data, least=cfg.window // 2)
    net = build(_forecast_net_config(cfg, "forecast", data.n_features, series), seed=cfg.seed)
    assert isinstance(net, StepNet)
    tidx, bounds, cases, ys = series.tidx, series.bounds, series.cases, series.ys
    t_mean, t_std = series.t_mean, series.t_std
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = [
        (ci, s) for ci, (vs, _) in enumerate(bounds) for s in range(0, max(1, vs - cfg.window))
    ]
    per_epoch = max(1, min(len(starts) // cfg.window * 4, 64)) * cfg.batch_size
    n_batches = math.ceil(per_epoch / cfg.batch_size)

    def masked_mae(pred: Tensor, y: Tensor) -> Tensor:
        # Absolute, not squared, error: squared error let the training part's outages pull
        # forecasts down, and whether a run ended biased (water flow, seed 0: MASE 1.98 on
        # one torch thread, 0.49 on two) hung on last-bit float differences.
        yn = (y - t_mean) / t_std
        ok = ~torch.isnan(yn)
        return (pred - torch.nan_to_num(yn)).abs()[ok].mean()

    def train_step(b: int, epoch: int) -> Tensor:
        pick = torch.randint(len(starts), (cfg.batch_size,), generator=gen).tolist()
        xs, ys_ = [], []
        for p in pick:
            ci, s = starts[p]
            vs = bounds[ci][0]
            e = min(s + cfg.window, vs)
            y = ys[ci][s:e].clone()
            # targets that fall into validation are hidden from training
            over = torch.arange(s, e)[:, None] + 1 + torch.arange(cfg.horizon)[None, :] >= vs
            y[over] = float("nan")
            xs.append(cases[ci][s:e])
            ys_.append(y)
        t = min(len(x) for x in xs)
        x = torch.stack([v[:t] for v in xs])
        y = torch.stack([v[:t] for v in ys_])
        pred, _ = net.train_outputs(x, net.initial_state(x.shape[0]))
        return masked_mae(pred[:, cfg.warmup :], y[:, cfg.warmup :])

    def val_loss() -> Tensor:
        losses = []
        for ci, (vs, ts) in enumerate(bounds):
            pred, _ = net.train_outputs(cases[ci][None, :ts], net.initial_state(1))
            y = ys[ci][:ts].clone()
            lo = torch.arange(ts)[:, None] + 1 + torch.arange(cfg.horizon)[None, :]
            y[(lo < vs) | (lo >= ts)] = float("nan")
            losses.append(masked_mae(pred[0], y))
        return torch.stack(losses).mean()

    hist = _fit(net, cfg, train_step, val_loss, n_batches)
    return net, hist, {"bounds": bounds, "target_idx": tidx}


def _split(data: datasets.Dataset, cfg: TrainConfig, least: int) -> list[tuple[int, int]]:
    """``(val_start, test_start)`` per case: [train | validation | held-out tail]."""
    bounds = []
    for c in data.cases:
        n = len(c)
        test_start = datasets.split_tail(n, cfg.test_fraction)
        val_start = test_start - round(test_start * cfg.val_fraction)
        if val_start < least:
            raise DataError(f"{data.path}: series of {n} steps is too short to split for training")
        bounds.append((val_start, test_start))
    return bounds


def _row_anomalies(data: datasets.Dataset) -> list[np.ndarray]:
    """Per case, True on rows labelled anomalous (all False without a label column)."""
    if data.row_labels is None:
        return [np.zeros(len(c), dtype=bool) for c in data.cases]
    try:
        return [scoring.binary_labels(r) for r in data.row_labels]
    except ValueError as exc:
        raise DataError(f"{data.path}: {exc}") from None


def dominant_period(cases: Sequence[np.ndarray], most: int = 1024) -> int | None:
    """The lag of the highest autocorrelation after its first zero crossing, up to
    ``most``: one cycle of a periodic series (an ECG's beat), ``None`` if it has none.

    Autocorrelations are averaged over features and cases (weighted by length).
    """
    curves: list[tuple[np.ndarray, int]] = []
    for c in cases:
        x = np.asarray(c, dtype=np.float64)
        x = x - x.mean(axis=0)
        n = len(x)
        energy = (x * x).sum(axis=0)
        if n < 4 or not (energy > 0).any():
            continue
        spectrum = np.fft.rfft(x[:, energy > 0], 2 * n, axis=0)
        ac = np.fft.irfft(spectrum * np.conj(spectrum), 2 * n, axis=0)[: min(n // 2, most + 1)]
        curves.append(((ac / energy[energy > 0]).mean(axis=1), n))
    if not curves:
        return None
    m = min(len(a) for a, _ in curves)
    total = np.sum([a[:m] * n for a, n in curves], axis=0)
    below = np.flatnonzero(total < 0)
    if not len(below):
        return None
    return int(below[0] + np.argmax(total[below[0] :]))


def _anomaly_window(cfg: TrainConfig, cases: Sequence[np.ndarray]) -> int:
    """``--context`` if given, else one period of the training part, else 32 steps."""
    if cfg.context:
        return cfg.context
    period = dominant_period(cases)
    return min(max(period or 32, 8), 1024)


def _train_anomaly(
    cfg: TrainConfig, data: datasets.Dataset
) -> tuple[AnomalyNet, History, dict[str, Any]]:
    length, warm = cfg.window, cfg.warmup
    bounds = _split(data, cfg, least=length + 1)
    bad = _row_anomalies(data)
    mean, std = normalisation(
        [c[:vs][~b[:vs]] for c, b, (vs, _) in zip(data.cases, bad, bounds, strict=True)]
    )
    window = _anomaly_window(cfg, [c[:vs] for c, (vs, _) in zip(data.cases, bounds, strict=True)])
    config = NetConfig(
        task="anomaly",
        cell=cfg.cell,
        n_features=len(data.features),
        hidden=cfg.hidden,
        layers=cfg.layers,
        dropout=cfg.dropout,
        mean=mean,
        std=std,
        window=window,
    )
    net = build(config, seed=cfg.seed)
    assert isinstance(net, AnomalyNet)
    z = [net.normalise(torch.from_numpy(np.asarray(c, dtype=np.float32))) for c in data.cases]
    n = config.n_features

    def nll(pred: Tensor, target: Tensor, keep: Tensor) -> Tensor:
        """Gaussian negative log-likelihood (constant dropped) of ``target`` rows in ``keep``."""
        mu, logvar = pred[..., :n], pred[..., n:]
        every = 0.5 * ((target - mu).pow(2) * torch.exp(-logvar) + logvar).mean(dim=-1)
        return every[keep].mean()

    # Training chunks: `length` + 1 rows (inputs, then the next row as target) of the
    # training part with no labelled anomaly, each from a zero state; the first `warm`
    # predictions are not scored (the state has seen too little).
    starts = []
    for ci, (vs, _) in enumerate(bounds):
        hits = np.concatenate([[0], np.cumsum(bad[ci])])
        s = np.arange(0, vs - length)
        starts += [(ci, int(a)) for a in s[hits[s + length + 1] - hits[s] == 0]]
    if not starts:
        raise DataError(f"{data.path}: no window of the training part is free of anomalies")
    gen = torch.Generator().manual_seed(cfg.seed)
    n_batches = _ANOMALY_BATCHES

    def train_step(b: int, epoch: int) -> Tensor:
        pick = torch.randint(len(starts), (cfg.batch_size,), generator=gen).tolist()
        chunk = torch.stack([z[ci][a : a + length + 1] for ci, a in (starts[p] for p in pick)])
        pred, _ = net.predict(chunk[:, :-1], net.core.initial_state(len(pick)))
        keep = torch.zeros(pred.shape[:2], dtype=torch.bool)
        keep[:, warm:] = True
        return nll(pred, chunk[:, 1:], keep)

    val_keep = []
    for ci, (vs, ts) in enumerate(bounds):
        keep = torch.zeros(ts - 1, dtype=torch.bool)
        keep[max(vs - 1, warm) :] = True  # predictions of rows vs .. ts-1
        keep &= torch.from_numpy(~bad[ci][1:ts])
        val_keep.append(keep[None])

    def val_loss() -> Tensor:
        losses = []
        for ci, (_, ts) in enumerate(bounds):
            pred, _ = net.predict(z[ci][None, : ts - 1], net.core.initial_state(1))
            losses.append(nll(pred, z[ci][None, 1:ts], val_keep[ci]))
        return torch.stack(losses).mean()

    hist = _fit(net, cfg, train_step, val_loss, n_batches)
    scores = anomaly_scores(net, data.cases)
    calib = np.concatenate(
        [s[:ts][~b[:ts]] for s, b, (_, ts) in zip(scores, bad, bounds, strict=True)]
    )
    threshold = float(np.quantile(calib, cfg.threshold_quantile))
    extra = {
        "threshold": threshold,
        "scores": scores,
        "calibration_rows": int(calib.size),
        "window": window,
    }
    return net, hist, extra


def anomaly_scores(
    net: AnomalyNet, cases: Sequence[np.ndarray], chunk: int = 2048
) -> list[np.ndarray]:
    """Each case's score at every step from one streamed PyTorch pass (chunks of steps)."""
    out = []
    with torch.no_grad():
        for c in cases:
            x = torch.from_numpy(np.asarray(c, dtype=np.float32))[None]
            state = net.initial_state(1)
            parts = []
            for a in range(0, x.shape[1], chunk):
                score, state = net(x[:, a : a + chunk], state)
                parts.append(score[0].numpy())
            out.append(np.concatenate(parts).astype(np.float64))
    return out


def _train_seq2seq(
    cfg: TrainConfig, data: datasets.Dataset
) -> tuple[Seq2SeqNet, History, dict[str, Any]]:
    series = _series(cfg, data, least=cfg.window)
    net = build(_forecast_net_config(cfg, "seq2seq", data.n_features, series), seed=cfg.seed)
    assert isinstance(net, Seq2SeqNet)
    tidx, bounds, cases, ys = series.tidx, series.bounds, series.cases, series.ys
    t_mean, t_std = series.t_mean, series.t_std
    ys = [(y - t_mean) / t_std for y in ys]
    gen = torch.Generator().manual_seed(cfg.seed)
    length, warm = cfg.window, cfg.context
    starts = [(ci, s) for ci, (vs, _) in enumerate(bounds) for s in range(0, vs - length + 1)]
    n_batches = max(1, min(len(starts) // length * 4, 64))
    ahead = torch.arange(length)[:, None] + 1 + torch.arange(cfg.horizon)[None, :]

    def masked_mae(pred: Tensor, y: Tensor) -> Tensor:
        # Absolute error: what MASE scores, and robust to outages in the training data
        # (squared error let a few outage windows drag every forecast down).
        ok = ~torch.isnan(y)
        return (pred - torch.nan_to_num(y)).abs()[ok].mean()

    def train_step(b: int, epoch: int) -> Tensor:
        pick = torch.randint(len(starts), (cfg.batch_size,), generator=gen).tolist()
        xs, ts = [], []
        for p in pick:
            ci, s = starts[p]
            y = ys[ci][s : s + length].clone()
            y[ahead + s >= bounds[ci][0]] = float("nan")  # targets in validation stay hidden
            xs.append(cases[ci][s : s + length])
            ts.append(y)
        x, y = torch.stack(xs), torch.stack(ts)
        rows = torch.arange(len(pick))[:, None]
        at = torch.randint(warm, length, (len(pick), _POSITIONS), generator=gen)
        pred, _ = net.train_outputs(x, net.initial_state(len(pick)), at)
        return masked_mae(pred, y[rows, at])

    def val_loss() -> Tensor:
        losses = []
        for ci, (vs, ts) in enumerate(bounds):
            # decode only the origins whose targets reach into validation
            at = torch.arange(max(0, vs - cfg.horizon), ts - 1)
            pred, _ = net.train_outputs(cases[ci][None, :ts], net.initial_state(1), at[None])
            y = ys[ci][at].clone()
            lo = at[:, None] + 1 + torch.arange(cfg.horizon)[None, :]
            y[(lo < vs) | (lo >= ts)] = float("nan")
            losses.append(masked_mae(pred[0], y))
        return torch.stack(losses).mean()

    hist = _fit(net, cfg, train_step, val_loss, n_batches)
    return net, hist, {"bounds": bounds, "target_idx": tidx}


def _forecast_test_metrics(
    net: StepNet | Seq2SeqNet,
    data: datasets.Dataset,
    bounds: Sequence[tuple[int, int]],
    tidx: Sequence[int],
    cfg: TrainConfig,
) -> dict[str, Any]:
    preds, truth, naive = [], [], []
    with torch.no_grad():
        for c, (_, ts) in zip(data.cases, bounds, strict=True):
            c = np.asarray(c, dtype=np.float32)
            out, _ = net(torch.from_numpy(c)[None], net.initial_state(1))
            preds.append(out[0].numpy())
            truth.append(scoring.horizon_targets(c[:, tidx], cfg.horizon, start=ts))
            naive.append(scoring.seasonal_naive(c[:, tidx], cfg.season, cfg.horizon))
    p, y, n = (np.concatenate(a) for a in (preds, truth, naive))
    return scoring.forecast_report(p, y, n, targets=[data.features[i] for i in tidx])


def _plot(hist: History, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    epochs = range(1, len(hist.train_loss) + 1)
    ax.plot(epochs, hist.train_loss, label="train")
    ax.plot(epochs, hist.val_loss, label="validation")
    ax.axvline(hist.best_epoch + 1, color="grey", linestyle="--", label="best")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training; returns the metrics written to ``metrics.json``."""
    started = time.monotonic()
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    data, named = naming.name_features(
        datasets.load(Path(cfg.data), **cfg.data_options), cfg.feature_names
    )
    rate = naming.sample_rate(data, cfg.sample_rate_hz)
    kind = cfg.cell if cfg.arch == "rnn" else ("tcn" if cfg.arch == "tcn" else "fcn")
    name = cfg.name or f"{Path(cfg.data).stem.lower()}-{kind}-{cfg.task}"
    metrics: dict[str, Any] = {}
    meta: dict[str, Any] = {
        "name": name,
        "version": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        "features": tuple(data.features),
        "data_sha256": data.sha256,
        "season": cfg.season,
    }
    meta.update(data.spec_fields())  # an audio front end travels into the model
    meta["sample_rate_hz"] = rate
    net: SeqNet
    if cfg.task == "classify":
        net, hist, extra = _train_classifier(cfg, data)
        classes = list(data.classes) or sorted(set(data.labels or ()))
        meta["labels"] = tuple(classes)
        train_pred = predict_labels(net, data.cases)
        metrics["train"] = {
            "accuracy": scoring.accuracy(data.label_indices(classes), np.array(train_pred))
        }
        if cfg.test:
            test, _ = naming.name_features(
                datasets.load(Path(cfg.test), **cfg.data_options), cfg.feature_names
            )
            if tuple(test.features) != tuple(data.features) or test.frontend != data.frontend:
                raise DataError(f"{cfg.test}: features {test.features} differ from training's")
            pred = np.array(predict_labels(net, test.cases))
            metrics["test"] = {
                "accuracy": scoring.accuracy(test.label_indices(classes), pred),
                "n_cases": len(test.cases),
            }
        metrics.update(extra)
    elif cfg.task == "anomaly":
        threads = torch.get_num_threads()
        # One thread: a 32-unit core's ops are too small to split, and on a busy 2-core
        # box two threads made this training 10x slower (59 s vs 4.6 s for 3 epochs).
        torch.set_num_threads(1)
        try:
            net, hist, extra = _train_anomaly(cfg, data)
        finally:
            torch.set_num_threads(threads)
        meta["threshold"] = extra["threshold"]
        meta["extra"] = {
            "test_fraction": cfg.test_fraction,
            "threshold_quantile": cfg.threshold_quantile,
        }
        metrics["train"] = {
            "window": extra["window"],
            "threshold": extra["threshold"],
            "threshold_quantile": cfg.threshold_quantile,
            "calibration_rows": extra["calibration_rows"],
        }
        spec = spec_for(net, meta)
        report = evaluation.anomaly_evaluation(spec, data, extra["scores"], tail=cfg.test_fraction)
        metrics["test"] = {k: v for k, v in report.items() if k not in ("window", "threshold")}
    else:
        trainer = _train_seq2seq if cfg.task == "seq2seq" else _train_forecaster
        net, hist, extra = trainer(cfg, data)
        meta["targets"] = tuple(data.features[i] for i in extra["target_idx"])
        meta["horizon"] = cfg.horizon
        meta["extra"] = {"test_fraction": cfg.test_fraction}
        metrics["test"] = _forecast_test_metrics(
            net, data, extra["bounds"], extra["target_idx"], cfg
        )
    if "search" not in metrics:  # the search reports its own (models.search)
        metrics["epochs_run"] = len(hist.train_loss)
        metrics["best_epoch"] = hist.best_epoch + 1
        metrics["best_val_loss"] = min(hist.val_loss)
    metrics["seconds"] = round(time.monotonic() - started, 2)
    meta["extra"] = {**meta.get("extra", {}), **named}  # units; CSV columns if renamed
    meta["metrics"] = {k: v for k, v in metrics.items() if k in ("test", "train")}
    out.mkdir(parents=True, exist_ok=True)
    resolved = asdict(cfg)
    (out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    checkpoint.save(out, net, meta)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _plot(hist, out / "curve.png", name)
    return metrics
