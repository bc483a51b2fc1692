"""The default classifier: a few candidate architectures compared on a validation split.

``seqstream train --task classify`` without ``--cell/--hidden/--layers/--arch`` runs
:func:`train_classifier`: every candidate of :data:`CANDIDATES` is screened, trained for
a fixed quarter of the final optimiser steps on a stratified part of the training cases
and scored (accuracy at each case's last step, then loss) on the rest; the best one is
then trained from scratch on all training cases for the full steps (tiny data sets
such as ArrowHead's 36 cases cannot spare a fifth of them for good). The budget
(``--budget``, CPU seconds of the training process, one torch thread) is a ceiling,
never a knob: the number of steps does not depend on the machine's speed, so a seed
gives the same model on a fast and a slow machine. When the budget cannot hold the
best candidate's final fit, the best one that fits is fit instead (or, if none, the
screened model is kept), and ``metrics.json`` says ``stopped_by_budget``.

The recipe, the same for every candidate: per-channel normalisation in the graph,
AdamW with a one-cycle learning-rate schedule, gradient clipping, a loss at every step
weighted toward a case's end plus the loss at its last step (right early, stays right),
and augmentation by random amplitude scale, offset, jitter and time warp.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models.fcn import FCNEnsemble, FCNNet
from models.nets import NetConfig, build, normalisation
from models.progress import progress

log = logging.getLogger(__name__)

# The budget counts this process's CPU seconds, not wall time: on a shared machine the
# load of other processes must not cut a search short (one torch thread: on an idle
# machine the two are equal).
clock = time.process_time


@dataclass(frozen=True)
class Candidate:
    """One architecture the search may choose."""

    name: str
    filters: tuple[int, ...]
    kernels: tuple[int, ...]
    cell: str = "gru"
    hidden: int = 16
    layers: int = 1
    dropout: float = 0.2


# Sized so that the engine's per-step cost at 1,000 streams stays within 3x a 2-layer
# LSTM h64 (measured: fcn32 1.6x, fcn64 2.9x, too close to the line to be a default).
CANDIDATES: tuple[Candidate, ...] = (
    Candidate("fcn48", (48, 96, 48), (8, 5, 3)),
    Candidate("fcn32", (32, 64, 32), (8, 5, 3)),
)
# Screening fits each candidate for this fraction of the final steps on the training
# part; the winner is then fit from scratch on every training case.
SCREEN_FRACTION = 0.25
# Member i of an ensemble (``--members``) trains with seed ``seed + MEMBER_SEED * i``:
# member 0 is the single model of the same seed.
MEMBER_SEED = 1000


@dataclass(frozen=True)
class Recipe:
    steps: int = 1200  # optimiser steps of the final fit, whatever the machine's speed
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-2
    clip: float = 1.0
    scale: float = 0.1  # std of the random amplitude factor (per case and channel)
    offset: float = 0.1  # std of the random offset, in normalised units
    jitter: float = 0.02  # std of the per-step noise, in normalised units
    warp: float = 0.15  # cases resampled to (1 + U(-warp, warp)) x their length


def pad(cases: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    """Right-pad to the longest case: ``x[B, T, F]`` and ``lengths[B]``."""
    lengths = torch.tensor([len(c) for c in cases])
    x = torch.zeros(len(cases), int(lengths.max()), cases[0].shape[1])
    for i, c in enumerate(cases):
        x[i, : len(c)] = torch.from_numpy(np.asarray(c, dtype=np.float32))
    return x, lengths


def step_loss(logits: Tensor, lengths: Tensor, y: Tensor) -> Tensor:
    """Half the loss at each case's last step, half at every step weighted by t/T."""
    b, t, c = logits.shape
    last = logits[torch.arange(b), lengths - 1]
    mask = torch.arange(t)[None, :] < lengths[:, None]
    every = nn.functional.cross_entropy(
        logits.reshape(b * t, c), y.repeat_interleave(t), reduction="none"
    ).reshape(b, t)
    weight = mask * (torch.arange(1, t + 1)[None, :] / lengths[:, None]).clamp(max=1.0)
    stepwise = (every * weight).sum() / weight.sum()
    return 0.5 * nn.functional.cross_entropy(last, y) + 0.5 * stepwise


def _logits(net: FCNNet | FCNEnsemble, x: Tensor, lengths: Tensor) -> Tensor:
    mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]
    logits, _ = net.train_outputs(x, net.initial_state(x.shape[0]), mask)
    return logits


def evaluate(
    net: FCNNet | FCNEnsemble, cases: Sequence[np.ndarray], y: Sequence[int], chunk: int = 64
) -> tuple[float, float]:
    """(accuracy at the last step, loss) of ``net`` on ``cases``."""
    net.eval()
    correct, loss, n = 0, 0.0, 0
    with torch.no_grad():
        for a in range(0, len(cases), chunk):
            x, lengths = pad(cases[a : a + chunk])
            yy = torch.tensor(list(y[a : a + chunk]))
            logits = _logits(net, x, lengths)
            last = logits[torch.arange(x.shape[0]), lengths - 1]
            correct += int((last.argmax(-1) == yy).sum())
            loss += float(step_loss(logits, lengths, yy)) * len(yy)
            n += len(yy)
    return correct / max(n, 1), loss / max(n, 1)


def make_net(
    cand: Candidate,
    n_features: int,
    n_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    seed: int,
    members: int = 1,
) -> FCNNet | FCNEnsemble:
    net = build(
        NetConfig(
            task="classify",
            cell=cand.cell,
            n_features=n_features,
            hidden=cand.hidden,
            layers=cand.layers,
            n_classes=n_classes,
            dropout=cand.dropout,
            mean=mean,
            std=std,
            arch="fcn",
            filters=cand.filters,
            kernels=cand.kernels,
            members=members,
        ),
        seed=seed,
    )
    assert isinstance(net, FCNNet | FCNEnsemble)
    return net


def _single(net: FCNNet | FCNEnsemble) -> FCNNet:
    assert isinstance(net, FCNNet)
    return net


def fit(
    net: FCNNet,
    cases: Sequence[np.ndarray],
    y: Sequence[int],
    recipe: Recipe,
    seed: int,
    deadline: float = math.inf,
    desc: str = "fit",
) -> dict[str, Any]:
    """Train ``net`` for ``recipe.steps`` steps (fewer only past ``deadline``)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.2
    )
    std = net.std
    order: list[int] = []
    losses: list[float] = []
    bs = min(recipe.batch_size, len(cases))
    bar = progress(range(recipe.steps), desc=desc, unit="step")
    done = 0
    net.train()
    for step in bar:
        if clock() > deadline:
            break
        if len(order) < bs:
            order = torch.randperm(len(cases), generator=gen).tolist()
        idx, order = order[:bs], order[bs:]
        x, lengths = pad([_warp(cases[i], recipe.warp, gen) for i in idx])
        b, _, f = x.shape
        # augmentation in normalised units, applied to raw inputs through std
        scale = 1 + recipe.scale * torch.randn(b, 1, f, generator=gen)
        shift = recipe.offset * torch.randn(b, 1, f, generator=gen) * std
        noise = recipe.jitter * torch.randn(x.shape, generator=gen) * std
        x = (x - net.mean) * scale + net.mean + shift + noise
        yy = torch.tensor([y[i] for i in idx])
        opt.zero_grad()
        loss = step_loss(_logits(net, x, lengths), lengths, yy)
        loss.backward()  # type: ignore[no-untyped-call]
        nn.utils.clip_grad_norm_(net.parameters(), recipe.clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        done = step + 1
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    net.eval()
    return {"steps": done, "stopped_by_budget": done < recipe.steps, "loss": losses}


def _warp(case: np.ndarray, warp: float, gen: torch.Generator) -> np.ndarray:
    """The case stretched or squeezed in time by linear interpolation."""
    if warp <= 0:
        return case
    factor = 1 + warp * (2 * float(torch.rand(1, generator=gen)) - 1)
    n = len(case)
    m = max(2, round(n * factor))
    at = np.linspace(0, n - 1, m)
    cols = [np.interp(at, np.arange(n), case[:, j]) for j in range(case.shape[1])]
    return np.stack(cols, axis=1).astype(np.float32)


def stratified_split(
    labels: Sequence[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    for label in sorted(set(labels)):
        idx = [i for i, v in enumerate(labels) if v == label]
        rng.shuffle(idx)
        k = round(len(idx) * fraction) if len(idx) > 1 else 0
        val.extend(idx[:k])
        train.extend(idx[k:])
    return sorted(train), sorted(val)


def candidate_doc(c: Candidate) -> dict[str, Any]:
    return asdict(c)


def train_classifier(
    cfg: Any, cases: Sequence[np.ndarray], y: Sequence[int], n_classes: int
) -> tuple[FCNNet | FCNEnsemble, list[float], dict[str, Any]]:
    """The search (``cfg.arch == "auto"``) or the first candidate (``"fcn"``), fit on
    all training cases; returns the net, its loss per step and the metrics."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums on any number of cores
    try:
        return _search(cfg, cases, y, n_classes)
    finally:
        torch.set_num_threads(threads)


def _search(
    cfg: Any, cases: Sequence[np.ndarray], y: Sequence[int], n_classes: int
) -> tuple[FCNNet | FCNEnsemble, list[float], dict[str, Any]]:
    started, wall = clock(), time.monotonic()
    deadline = started + cfg.budget
    recipe = Recipe(steps=cfg.steps) if cfg.steps else Recipe()
    screen = replace(recipe, steps=max(1, round(recipe.steps * SCREEN_FRACTION)))
    n_features = cases[0].shape[1]
    pool = CANDIDATES if cfg.arch == "auto" else CANDIDATES[:1]
    tr, va = stratified_split(y, cfg.val_fraction, cfg.seed)
    scores: list[dict[str, Any]] = []
    best: tuple[float, float] | None = None
    chosen = pool[0]
    # (score, candidate, screened net, screening CPU seconds)
    screened: list[tuple[tuple[float, float], Candidate, FCNNet, float]] = []
    stopped = False
    if len(pool) > 1 and va:
        for k, cand in enumerate(pool):
            so_far = f"best so far {chosen.name} {best[0]:.3f}" if best else "first"
            desc = f"search {k + 1}/{len(pool)}: {cand.name} ({so_far})"
            t0 = clock()
            mean, std = normalisation([cases[i] for i in tr])
            cand_net = _single(make_net(cand, n_features, n_classes, mean, std, cfg.seed))
            sub = [cases[i] for i in tr]
            info = fit(cand_net, sub, [y[i] for i in tr], screen, cfg.seed, deadline, desc)
            if info["stopped_by_budget"]:
                stopped = True
                scores.append({**asdict(cand), "stopped_by_budget": True, "steps": info["steps"]})
                break
            acc, loss = evaluate(cand_net, [cases[i] for i in va], [y[i] for i in va])
            took = clock() - t0
            scores.append(
                {
                    **asdict(cand),
                    "val_accuracy": acc,
                    "val_loss": loss,
                    "steps": info["steps"],
                    "seconds": round(took, 1),
                }
            )
            screened.append(((acc, -loss), cand, cand_net, took))
            if best is None or (acc, -loss) > best:
                best, chosen = (acc, -loss), cand
    # The final fit on every training case, of the best candidate whose fit the budget
    # still allows (judged from its screening time); if none, the screened model stays.
    ranked = sorted(screened, key=lambda e: e[0], reverse=True)
    left = deadline - clock()
    members = cfg.members
    affordable = [e for e in ranked if e[3] * members * recipe.steps / screen.steps <= left]
    final = not screened or bool(affordable)
    if screened:
        chosen = (affordable or ranked)[0][1]
    losses: list[float] = []
    final_done = 0
    net: FCNNet | FCNEnsemble
    if final:
        mean, std = normalisation(cases)
        fitted: list[FCNNet] = []
        runs: list[list[float]] = []
        complete: list[FCNNet] = []
        for i in range(members):
            seed = cfg.seed + MEMBER_SEED * i
            one = _single(make_net(chosen, n_features, n_classes, mean, std, seed))
            desc = f"final fit: {chosen.name} on all {len(cases)} cases"
            desc += f", member {i + 1}/{members}" if members > 1 else ""
            info = fit(one, cases, y, recipe, seed, deadline, desc)
            stopped = stopped or info["stopped_by_budget"]
            fitted.append(one)
            if not info["stopped_by_budget"]:
                complete.append(one)
            runs.append(info["loss"])
            final_done = info["steps"] if i == 0 else min(final_done, info["steps"])
        # the members' mean loss per step, over the steps all of them trained
        losses = [float(np.mean(v)) for v in zip(*runs, strict=False)]
        # a member the budget cut short would only blur the others: the complete ones
        # stay (at least member 0), and metrics.json says how many
        fitted = complete if len(complete) > 1 else fitted[:1]
        members = len(fitted)
        net = fitted[0]
        if members > 1:
            net = make_net(chosen, n_features, n_classes, mean, std, cfg.seed, members)
            assert isinstance(net, FCNEnsemble)
            for slot, one in zip(net.member_nets(), fitted, strict=True):
                slot.load_state_dict(one.state_dict())
            net.eval()
    else:
        net = ranked[0][2]
        stopped = True
    stopped = stopped or (bool(screened) and chosen is not ranked[0][1])
    extra = {
        "search": {
            "candidates": scores,
            "chosen": chosen.name,
            "best_screened": ranked[0][1].name if ranked else chosen.name,
            "screen_steps": screen.steps,
            "final_fit_on_all_training_cases": final,
            "final_steps": recipe.steps,
            "final_steps_done": final_done,
            "members": members if final else 1,
            "budget_s": cfg.budget,
            "stopped_by_budget": stopped,
            "val_cases": len(va),
            "recipe": asdict(recipe),
            "cpu_seconds": round(clock() - started, 1),
            "seconds": round(time.monotonic() - wall, 1),
        }
    }
    if stopped:
        log.warning("the classifier search ran out of its %.0f s budget", cfg.budget)
    return net, losses or [math.nan], extra
