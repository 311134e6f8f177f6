"""Choosing a fine-tune recipe on validation: successive halving over the grid's points.

A grid (several augmentations and/or learning rates) would cost one full run per point. Successive
halving (Jamieson & Talwalkar 2016; the rung rule of Hyperband, Li et al. 2018) spends most of that
on the points that look best: every point trains `SCREEN_EPOCHS` epochs, the best third by
validation (accuracy, then loss, then grid order) goes on to `ETA` times as many epochs, and so on
until one point is left, which then trains to the end (its own stopping rule or its epoch budget).
Nothing restarts: each point's training is the prefix of its full run (the learning-rate schedule
spans the cap, whether or not a point stops early), continued from where its rung left it, and
every point checkpoints each epoch, so a killed search resumes.

Cost with G points: G x 2 epochs in the first rung, then ceil(G / 3) x 4 more to epoch 6, ...;
6 points (3 augmentations x 2 learning rates) cost 12 + 8 = 20 screening epochs of which the
winner's 6 are part of its own run: 14 epochs beyond a single run. A point that converges inside a
rung stops there and is ranked on its best epoch. The bias to know: a short screen favours what
learns fast (weak augmentation, a high learning rate) over what would win late; the first rung's
`SCREEN_EPOCHS` is where that is decided for two thirds of the grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SCREEN_EPOCHS = 2  # the first rung: one warm-up epoch and one at the peak learning rate
ETA = 3  # keep the best 1/ETA at each rung (Hyperband's default); rungs grow by ETA


def rank_key(state: dict, index: int) -> tuple:
    """Higher is better: the best epoch's validation (accuracy, -loss), then the earlier grid point."""
    acc, neg_loss = state["best"]
    return (acc, neg_loss, -index)


def successive_halving(
    n: int, advance: Callable[[int, int | None], dict], cap: int
) -> tuple[int, list[dict]]:
    """Run the rungs over points 0..n-1; `advance(i, until)` trains point i up to epoch `until`
    (None: to its end) and returns its state (`best`, `history`). Returns (the winner, the rungs:
    [{"epochs", "points", "kept"}])."""
    alive, rungs, until = list(range(n)), [], SCREEN_EPOCHS
    while len(alive) > 1:
        until = min(until, cap)
        states = {i: advance(i, until) for i in alive}
        keep = max(1, math.ceil(len(alive) / ETA))
        ranked = sorted(alive, key=lambda i: rank_key(states[i], i), reverse=True)
        rungs.append({"epochs": until, "points": list(alive), "kept": sorted(ranked[:keep])})
        alive = sorted(ranked[:keep])
        if until >= cap:
            break
        until *= ETA
    winner = alive[0] if len(alive) == 1 else max(alive, key=lambda i: rank_key(advance(i, until), i))
    advance(winner, None)
    return winner, rungs
