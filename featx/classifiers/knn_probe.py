"""The k-NN probe of one cell: k and T chosen on validation, the refit on train + val, the test read once.

`fit_cell` calls `fit_knn` for `Protocol(classifier="knn")`, in place of the C grid of the linear
probes, under the same protocol: the same rows (featx.classifiers.rows), the same validation
(a hold-out or val split; k-fold cross-validation on small data or with `--cv`), the test split
read once after every choice. Every (k, T) of the protocol's grid is scored from one neighbour
search per validation split (`featx.classifiers.knn.grid_scores`; each CV fold runs its own),
scores are averaged over folds, and `featx.classifiers.selection.best_knn` picks one (accuracy,
then the mean log-likelihood of the true class, then the smaller k, then the T nearest 0.07).

k larger than the rows a grid is fitted on is capped to that number, with one warning (logged, so
it reaches the CLI's stderr), and ks that cap to the same value are scored once: the grid every fold
sees is the same, so its scores average. The refit (train + val) keeps the chosen k.
"""

from __future__ import annotations

import logging

import numpy as np

from featx.classifiers import selection
from featx.classifiers.grid import cv_splits
from featx.classifiers.knn import KnnUsageError, WeightedKNN, grid_scores
from featx.classifiers.protocol import KNN_DEFAULT_T, Protocol
from featx.classifiers.rows import Rows, load_parts
from featx.errors import FeatxError
from featx.store.codes import CodesFile

log = logging.getLogger("featx")


def capped_ks(ks, n_rows: int, where: str) -> tuple[int, ...]:
    """`ks` with values above `n_rows` capped to it (one warning naming them), duplicates dropped."""
    over = [k for k in ks if k > n_rows]
    if over:
        log.warning(
            "%s: k-NN k=%s is more than the %d training rows a grid fit sees; using k=%d (every row votes)",
            where,
            ",".join(map(str, over)),
            n_rows,
            n_rows,
        )
    return tuple(dict.fromkeys(min(int(k), n_rows) for k in ks))


def fit_knn(f: CodesFile, layers, rows: Rows, protocol: Protocol, seed: int):
    """(pipeline, C text, (val_score, val_tiebreak), test predictions, val_rule, val_folds) of one
    cell, as `fit._fit_in_memory` returns them; the pipeline's one step is the refitted WeightedKNN."""
    from sklearn.pipeline import Pipeline

    where = f"layer {'+'.join(layers)}"
    n = len(rows.train)
    refit_rows = np.concatenate([rows.train, rows.val])
    X_all, X_te = load_parts(f, layers, (refit_rows, rows.test))
    y_all = f.labels[refit_rows]
    X_tr, y_tr = X_all[:n], y_all[:n]
    if rows.folds:
        splits = cv_splits(X_tr, y_tr, seed, rows.folds, rows.groups)
        parts = [(X_tr[tr], y_tr[tr], X_tr[va], y_tr[va]) for tr, va in splits]
    else:
        parts = [(X_tr, y_tr, X_all[n:], y_all[n:])]
    ks = capped_ks(protocol.ks, min(len(p[1]) for p in parts), where)
    try:
        per_split = [grid_scores(*p, ks=ks, temperatures=protocol.temperatures) for p in parts]
        scores = [
            type(g)(
                g.k,
                g.temperature,
                float(np.mean([s[i].val_score for s in per_split])),
                float(np.mean([s[i].val_tiebreak for s in per_split])),
            )
            for i, g in enumerate(per_split[0])
        ]
        best = selection.best_knn(scores, KNN_DEFAULT_T)
        k, T = scores[best].k, scores[best].temperature
        pipe = Pipeline([("clf", WeightedKNN(n_neighbors=k, temperature=T))]).fit(X_all, y_all)
        y_pred = pipe.predict(X_te)
    except KnnUsageError as e:  # codes with NaN/inf: not a grid or solver problem
        raise FeatxError(f"{where}: {e}") from None
    val_folds = [float(s[best].val_tiebreak) for s in per_split] if rows.folds else []
    val = (scores[best].val_score, scores[best].val_tiebreak)
    return pipe, knn_choice_text(k, T), val, y_pred, selection.SCORE, val_folds


def knn_choice(pipe) -> dict:
    """A result's `k` and `temperature`: the refitted k-NN's, or None for a linear probe."""
    clf = pipe.steps[-1][1] if hasattr(pipe, "steps") else pipe
    if not isinstance(clf, WeightedKNN):
        return {"k": None, "temperature": None}
    return {"k": int(clf.n_neighbors_), "temperature": float(clf.temperature)}


def knn_choice_text(k: int, temperature: float) -> str:
    """What the C column shows for a k-NN cell: `k=20 T=0.07`."""
    return f"k={k} T={temperature:g}"
