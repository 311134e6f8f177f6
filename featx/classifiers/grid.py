"""Scoring the C grid on validation: hold-out or cross-validation folds, warm-started chains over C."""

from __future__ import annotations

import math

import numpy as np

from featx.classifiers.estimators import apply_steps, make_pipeline
from featx.classifiers.protocol import Protocol
from featx.errors import FeatxError


def tiebreak_metric(protocol: Protocol) -> str:
    if protocol.per_class:
        return "mean average precision"
    return "mean log-likelihood" if protocol.classifier in ("softmax", "knn") else "mean margin"


def val_scores(clf, X, y, protocol: Protocol) -> tuple[float, float]:
    """(accuracy, continuous tie-break) of a fitted classifier on validation images: the mean
    log-likelihood of the true class (softmax) or the mean margin of the true class's decision
    value over the best other class's (svm, sgd). Classes the classifier never saw count as the
    worst case."""
    y = np.asarray(y)
    if len(y) == 0:
        return (0.0, 0.0)
    acc = float(np.mean(clf.predict(X) == y))
    classes = np.asarray(clf.classes_)
    known = np.isin(y, classes)
    col = np.searchsorted(classes, y).clip(0, len(classes) - 1)
    rows = np.arange(len(y))
    if protocol.classifier == "softmax":
        p = clf.predict_proba(X)[rows, col]
        return acc, float(np.mean(np.where(known, np.log(np.clip(p, 1e-15, 1.0)), np.log(1e-15))))
    d = np.asarray(clf.decision_function(X), dtype=np.float64)
    if d.ndim == 1:  # binary: one value, positive for classes[1]
        d = np.stack([-d, d], axis=1)
    true = d[rows, col]
    d[rows, col] = -np.inf
    margin = np.where(known, true - d.max(axis=1), -np.abs(d).max(axis=1))
    return acc, float(np.mean(margin))


def cv_splits(X, y, seed: int, folds: int, groups=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds; with `groups`, stratified *group* folds (scikit-learn's
    StratifiedGroupKFold): no group is on both sides of a fold."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    smallest = int(np.bincount(y)[np.unique(y)].min())
    if min(folds, smallest) < 2:
        raise FeatxError(f"--cv {folds} needs at least 2 training images per class; one class has {smallest}")
    k = min(folds, smallest)
    if groups is None:
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(X, y))
    k = min(k, len(np.unique(groups)))
    if k < 2:
        raise FeatxError("cross-validation needs at least 2 groups of training images; the file has 1")
    return list(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(X, y, groups))


CHAIN_LENGTH = 2  # grid values per warm-start chain: a fixed split, so results never depend on --jobs;


def chains(protocol: Protocol, warm: bool) -> list[list[int]]:
    """Indices of `protocol.Cs` grouped into warm-start chains, each in ascending C: consecutive runs
    of CHAIN_LENGTH values (or one fewer) of the sorted grid for softmax (lbfgs takes a starting
    point), one value each for svm (liblinear starts from zero, always) or with `warm=False`."""
    order = sorted(range(len(protocol.Cs)), key=lambda i: protocol.Cs[i])
    if not warm or protocol.classifier != "softmax":
        return [[i] for i in order]
    return [list(c) for c in np.array_split(order, math.ceil(len(order) / CHAIN_LENGTH))]


def warm_start(clf, start) -> None:
    """Start a LogisticRegression's (or TorchSoftmax's) next fit at `start` = (coef, intercept); None:
    from zero. Other classifiers (liblinear's LinearSVC has no starting point) start from zero."""
    from sklearn.linear_model import LogisticRegression

    from featx.classifiers.block_softmax import BlockSoftmax
    from featx.classifiers.torch_softmax import TorchSoftmax

    if not isinstance(clf, (LogisticRegression, TorchSoftmax, BlockSoftmax)):
        return
    if start is None:
        clf.set_params(warm_start=False)
        return
    clf.set_params(warm_start=True)
    clf.coef_, clf.intercept_ = start[0].copy(), start[1].copy()


def prepare_split(X, y, split, protocol: Protocol, seed: int, dim: int, steps_only: bool = False):
    """One fold's training and validation codes through the pipeline's steps before the classifier
    (scaling, PCA: what Pipeline.fit does), fitted once and shared by every chain of that fold.
    `steps_only`: (the fitted steps, the transformed training codes)."""
    tr, va = split
    steps = make_pipeline(protocol, protocol.Cs[0], seed, len(tr), dim).steps[:-1]  # C does not touch them
    Xt = X if len(tr) == len(X) else X[tr]
    for _, step in steps:
        Xt = step.fit_transform(Xt, y[tr])
    if steps_only:
        return steps, Xt
    return Xt, y[tr], apply_steps(steps, X[va]), y[va]


def run_chain(fold, chain: list[int], protocol: Protocol, seed: int, dim: int):
    """One prepared fold (`prepare_split`), one chain of grid values: (index, score, (coef, intercept))
    per value, each fit warm-started from the previous one's solution (the first from zero)."""
    Xt, yt, Xv, yv = fold
    clf = make_pipeline(protocol, protocol.Cs[chain[0]], seed, len(yt), dim).steps[-1][1]
    out, start = [], None
    for i in chain:
        clf.set_params(C=protocol.Cs[i])
        warm_start(clf, start)
        clf.fit(Xt, yt)
        start = (clf.coef_.copy(), clf.intercept_.copy()) if hasattr(clf, "coef_") else None
        out.append((i, val_scores(clf, Xv, yv, protocol), start))
    return out


def grid_scores(
    X, y, splits, protocol: Protocol, seed: int, dim: int, jobs: int = 1, warm: bool = True, side=None
):
    """Mean (accuracy, tie-break) per C over `splits` (one hold-out, or CV folds), per C the first
    split's solution (coef, intercept), the refit's starting point; third, the result of `side`, a
    function run in the same pool after the grid's tasks (into the gap they leave; None without
    one); fourth, per C the (accuracy, tie-break) of each split, in split order.

    Every (split, chain) runs as one task, side by side in `jobs` threads (each fit still uses one
    BLAS thread, and no task reads another's result), so the numbers are the same whatever `jobs`.

    Warm starts: lbfgs stops when the largest gradient component of scikit-learn's objective (mean
    log-loss + ||w||^2 / (2 C n)) is below `tol` (1e-4), from a cold start or a warm one alike, so
    a warm-started solution meets the same stopping rule as the cold one but is not bit-equal to it:
    coefficients differ by about what that tolerance allows, little where the objective is strongly
    convex (small C), more at C far above the best one, where the objective is flat and lbfgs may stop
    at once near the previous C's solution (both are then approximations of the same optimum). On
    benchmarks/fit_speed.py's problems (synthetic, and real EfficientNet-Lite0 codes) the chosen C
    is the same and test accuracy is within 0.1 point. Long chains drift further: one chain through
    the whole 8-value grid chose C = 1 instead of the cold fits' 0.1 on brain_tumor_mri's
    `global_pool` (test accuracy 0.9325 vs 0.9308), which is one reason chains are 2 values long.
    `warm=False` restores the cold fits exactly."""
    from joblib import Parallel, delayed

    # Weakly regularised fits take the most iterations (on Fashion-MNIST's codes a cold C = 100 takes
    # 489 lbfgs steps, C = 1e-4 takes 66), so the chains with the largest C go first: the longest
    # tasks start at once and the short ones fill in behind them (longest-processing-time-first
    # scheduling). Order changes when a task runs, never what it computes.
    tasks = sorted(
        ((s, c) for s in range(len(splits)) for c in chains(protocol, warm)),
        key=lambda t: (-max(protocol.Cs[i] for i in t[1]), t[0]),
    )
    folds = Parallel(n_jobs=min(jobs, len(splits)) if jobs > 0 else jobs, backend="threading")(
        delayed(prepare_split)(X, y, split, protocol, seed, dim) for split in splits
    )
    calls = [delayed(run_chain)(folds[s], c, protocol, seed, dim) for s, c in tasks]
    if side is not None:
        calls.append(delayed(side)())
    runs = Parallel(n_jobs=min(jobs, len(calls)) if jobs > 0 else jobs, backend="threading")(calls)
    side_result = runs.pop() if side is not None else None
    per_c: dict[int, dict[int, tuple]] = {}  # C index -> split index -> score
    starts: dict[int, tuple] = {}
    for (s, _), run in zip(tasks, runs):
        for i, score, start in run:
            per_c.setdefault(i, {})[s] = score
            if s == 0:
                starts[i] = start
    n = len(protocol.Cs)
    by_split = [[per_c[i][s] for s in range(len(splits))] for i in range(n)]
    scores = [tuple(float(v) for v in np.mean(by_split[i], axis=0)) for i in range(n)]
    return scores, [starts[i] for i in range(n)], side_result, by_split
