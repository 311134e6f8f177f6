"""Out-of-core SGD: codes streamed in chunks for entries larger than memory."""

from __future__ import annotations

import numpy as np

from featx.classifiers import selection
from featx.classifiers.estimators import L2Normalize, apply_steps
from featx.classifiers.grid import val_scores
from featx.classifiers.protocol import Protocol
from featx.classifiers.rows import Rows, load_codes
from featx.errors import UsageError
from featx.store.codes import CodesFile


def _chunks(f: CodesFile, layers, rows: np.ndarray, chunk_rows: int, rng=None):
    """(row positions, codes) over `rows` in chunks of at most `chunk_rows`, chunk order shuffled with `rng`."""
    starts = list(range(0, len(rows), chunk_rows))
    if rng is not None:
        rng.shuffle(starts)
    for s in starts:
        part = rows[s : s + chunk_rows]
        yield part, load_codes(f, layers, part)


def _sgd_prep(f: CodesFile, layers, rows: np.ndarray, protocol: Protocol, seed: int, dim: int):
    """Scaling and PCA fitted in one streaming pass each (partial_fit)."""
    from sklearn.decomposition import IncrementalPCA
    from sklearn.preprocessing import StandardScaler

    steps = []
    if protocol.scale == "standardize":
        scaler = StandardScaler()
        for _, X in _chunks(f, layers, rows, protocol.chunk_rows):
            scaler.partial_fit(X)
        steps.append(("scale", scaler))
    elif protocol.scale == "l2":
        steps.append(("scale", L2Normalize().fit(np.zeros((1, dim)))))
    if protocol.pca:
        k = min(protocol.pca, dim, len(rows))
        pca = IncrementalPCA(n_components=k)
        for _, X in _chunks(f, layers, rows, max(protocol.chunk_rows, k)):
            if len(X) >= k:  # IncrementalPCA needs at least k rows per batch
                pca.partial_fit(apply_steps(steps, X))
        steps.append(("pca", pca))
    return steps


def _sgd_train(f, layers, rows, steps, protocol: Protocol, C: float, seed: int, classes):
    from sklearn.linear_model import SGDClassifier

    clf = SGDClassifier(loss="hinge", penalty="l2", alpha=1.0 / (C * max(len(rows), 1)), random_state=seed)
    rng = np.random.default_rng(seed)
    for _ in range(protocol.epochs):
        for part, X in _chunks(f, layers, rows, protocol.chunk_rows, rng):
            order = rng.permutation(len(part))
            clf.partial_fit(apply_steps(steps, X)[order], f.labels[part][order], classes=classes)
    return clf


def _sgd_predict(f, layers, rows, steps, clf, chunk_rows: int) -> np.ndarray:
    out = np.empty(len(rows), dtype=np.int64)
    pos = 0
    for part, X in _chunks(f, layers, rows, chunk_rows):
        out[pos : pos + len(part)] = clf.predict(apply_steps(steps, X))
        pos += len(part)
    return out


def _sgd_val_scores(f, layers, rows, steps, clf, protocol: Protocol) -> tuple[float, float]:
    """`val_scores` over streamed chunks, weighted by chunk size."""
    total, acc, tie = 0, 0.0, 0.0
    for part, X in _chunks(f, layers, rows, protocol.chunk_rows):
        a, t = val_scores(clf, apply_steps(steps, X), f.labels[part], protocol)
        total, acc, tie = total + len(part), acc + a * len(part), tie + t * len(part)
    return (acc / total, tie / total) if total else (0.0, 0.0)


def fit_sgd(f: CodesFile, layers, rows: Rows, protocol: Protocol, seed: int):
    from sklearn.pipeline import Pipeline

    if protocol.cv:
        raise UsageError(
            "--classifier sgd validates on a hold-out or the val split; --cv is for svm and softmax"
        )
    dim = sum(f.dim(layer) for layer in layers)
    classes = np.unique(f.labels[np.concatenate([rows.train, rows.val])])
    steps = _sgd_prep(f, layers, rows.train, protocol, seed, dim)
    scores = []
    for C in protocol.Cs:
        clf = _sgd_train(f, layers, rows.train, steps, protocol, C, seed, classes)
        scores.append(_sgd_val_scores(f, layers, rows.val, steps, clf, protocol))
    best = selection.best_C(protocol.Cs, scores)
    C = float(protocol.Cs[best])
    fit_rows = np.sort(np.concatenate([rows.train, rows.val]))
    steps = _sgd_prep(f, layers, fit_rows, protocol, seed, dim)
    clf = _sgd_train(f, layers, fit_rows, steps, protocol, C, seed, classes)
    y_pred = _sgd_predict(f, layers, rows.test, steps, clf, protocol.chunk_rows)
    return Pipeline([*steps, ("clf", clf)]), C, scores[best], y_pred, selection.SCORE, []
