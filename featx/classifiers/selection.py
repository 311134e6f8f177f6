"""How featx chooses, from validation only: C within a cell, and the layer among cells.

Two rules, named by a cell's `val_rule`:

- `val_score` (a hold-out, a val split; svm, sgd and presets scored per class, whatever the
  validation): C is the grid value with the best validation score (accuracy, or mean AP per
  class), ties to the better continuous score (`val_tiebreak`), an exact tie of both to the
  smaller C. Layers are ranked the same way (an exact tie to the deeper layer).
- `log-likelihood` (softmax validated by k-fold cross-validation: automatically when a hold-out
  would keep fewer than 10 images of a class, or with `--cv K`): C is the grid value with the best
  cross-validated mean log-likelihood of the true class (`val_tiebreak`), ties to the better
  accuracy, then to the smaller C. The layer: the one with the best cross-validated
  log-likelihood is the reference; every layer whose per-fold deficit against it is at most one
  standard error of the paired differences (the same folds, seed by seed) is within noise of it,
  and among those the deepest wins (a concatenation of layers counts as shallower than any single
  layer, so it must win outright).

Why the second rule: on a handful of images per class a fold's accuracy moves in steps of one image
and ties are everywhere, while the log-likelihood is continuous and a proper score (it rewards a
classifier for being right with confidence, not just right). Picking the best of several noisy
layer scores favours whichever got lucky; the one-standard-error rule (Hastie, Tibshirani and
Friedman, "Elements of Statistical Learning", 7.10) keeps a layer the folds cannot tell apart from
the best and prefers the default of the field, the top codes, unless the folds say otherwise.
The k-NN probe's k and T (`best_knn`) follow the first rule (accuracy, then the mean
log-likelihood of the true class) under any validation, cross-validation included: its vote shares
give a class no probability when no neighbour votes for it, so its log-likelihood is dominated by
the 1e-15 floor and says little on its own. An exact tie of both goes to the smaller k (fewer
neighbours: a more local vote), then to the T nearest DINOv2's 0.07 (by ratio), then the smaller T.

Measured (docs/results/probes.md, "what the small-data rule buys"): `benchmarks/selection_regret.py`; a threshold
of two standard errors preferred the top layer too often, half a standard error too rarely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCORE = "val_score"
LOGLIK = "log-likelihood"
NOISE_SE = 1.0  # a layer within this many paired standard errors of the best counts as tied with it


RULE_TEXT = {  # how a layer was chosen, in a report's words
    SCORE: "the best validation score",
    LOGLIK: "the deepest layer within one standard error of the best cross-validated log-likelihood",
}


def val_rule(classifier: str, per_class: bool, cv: bool) -> str:
    """The rule a cell selects by (module docstring)."""
    return LOGLIK if cv and classifier == "softmax" and not per_class else SCORE


def best_C(Cs: Sequence[float], scores: Sequence[tuple[float, float]], rule: str = SCORE) -> int:
    """Index of the chosen grid value; `scores` are (val_score, val_tiebreak) per value."""
    key = (lambda s: (s[1], s[0])) if rule == LOGLIK else (lambda s: tuple(s))
    top = max(key(s) for s in scores)
    return min((i for i, s in enumerate(scores) if key(s) == top), key=lambda i: Cs[i])


def best_knn(grid: Sequence, default_t: float = 0.07) -> int:
    """Index of the chosen (k, T) among `grid` (objects with k, temperature, val_score, val_tiebreak:
    featx.classifiers.knn.GridScore), by the rule in the module docstring."""

    def key(i: int):
        g = grid[i]
        ratio = round(abs(float(np.log(g.temperature / default_t))), 9)  # 0.035 and 0.14: equally near 0.07
        return (-g.val_score, -g.val_tiebreak, g.k, ratio, g.temperature)

    return min(range(len(grid)), key=key)


@dataclass(frozen=True)
class Candidate:
    """One layer (or concatenation) as the layer choice sees it: mean validation numbers over seeds
    and, under the log-likelihood rule, the per-fold log-likelihoods of every seed (seed-major, the
    same seed order for every candidate)."""

    name: str
    depth: float  # relative depth in the network; a concatenation: -1
    score: float  # mean val_score
    tiebreak: float  # mean val_tiebreak
    rule: str = SCORE
    folds: tuple[float, ...] = ()


def candidate(layer: str, results: Sequence[dict]) -> Candidate:
    """One layer's cells at one train size (one per seed: fit_cell results or bench rows)."""
    rs = sorted(results, key=lambda r: r["seed"])
    rules = {r.get("val_rule") or SCORE for r in rs}
    depth = rs[0].get("depth", rs[0].get("relative_depth"))
    return Candidate(
        name=layer,
        depth=float(depth) if depth is not None else 0.0,
        score=float(np.mean([r["val_score"] for r in rs])),
        tiebreak=float(np.mean([r.get("val_tiebreak") or 0.0 for r in rs])),
        rule=rules.pop() if len(rules) == 1 else SCORE,
        folds=tuple(v for r in rs for v in unpack_folds(r.get("val_folds"))),
    )


def choose_layer(candidates: Sequence[Candidate]) -> str:
    """The chosen layer's name (module docstring). The log-likelihood rule applies only when every
    candidate was selected by it and their folds pair up; otherwise the val_score rule."""
    if not candidates:
        raise ValueError("no candidate layers")
    paired = (
        all(c.rule == LOGLIK for c in candidates)
        and len({len(c.folds) for c in candidates}) == 1
        and len(candidates[0].folds) > 0
    )
    if not paired:
        return max(candidates, key=lambda c: (c.score, c.tiebreak, c.depth)).name
    ref = max(candidates, key=lambda c: (c.tiebreak, c.score, c.depth))
    within = [c for c in candidates if c is ref or paired_deficit(ref.folds, c.folds) <= 0.0]
    return max(within, key=lambda c: (c.depth, c.tiebreak)).name


def paired_deficit(ref: Sequence[float], other: Sequence[float], se: float = NOISE_SE) -> float:
    """Mean of (ref - other) over paired folds minus `se` standard errors of that mean: positive when
    `other` is worse than `ref` beyond noise. One fold: no standard error, the plain difference."""
    d = np.asarray(ref, dtype=float) - np.asarray(other, dtype=float)
    sem = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(d.mean()) - se * sem - 1e-12


def pack_folds(folds: Sequence[float]) -> str:
    """Per-fold scores as one CSV-safe field ("-0.41 -0.39 ..."); "" without folds."""
    return " ".join(f"{v:.9g}" for v in folds)


def unpack_folds(value) -> tuple[float, ...]:
    """`pack_folds`'s text, or a list (results held in memory), back to floats."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ()
    if isinstance(value, str):
        return tuple(float(v) for v in value.split())
    return tuple(float(v) for v in value)
