"""Weighted k-nearest-neighbour classification on CNN codes, as DINOv2's k-NN evaluation votes.

    from featx.classifiers.knn import WeightedKNN, grid_scores
    clf = WeightedKNN(n_neighbors=20, temperature=0.07).fit(X_train, y_train)
    clf.predict(X_test); clf.predict_proba(X_test); clf.score(X_test, y_test)
    grid = grid_scores(X_train, y_train, X_val, y_val)   # every (k, T) from ONE similarity pass

The rule (DINOv2, `dinov2/eval/knn.py`, `KnnModule`): codes are L2-normalised, a query's similarity
to a training row is their cosine (a dot product of unit vectors), the k most similar training rows
vote for their class with weight exp(sim / T), and the class with the largest summed weight wins.
DINOv2 evaluates k in {10, 20, 100, 200} at T = 0.07 ("20 is usually working the best"). Its
probabilities are a softmax over the top max(k) similarities summed over the first k, so for k <
max(k) they do not add up to 1; `predict_proba` here divides each class's vote by the k votes'
total instead: the same ranking of classes, rows that sum to 1. The weights are computed as
exp((sim - top1 sim) / T), which is the same after that division and cannot overflow.

Determinism. Ties are broken by a stated order, never by what a selection algorithm happened to
do: among training rows of equal similarity the one with the smaller row index (its position in
the `fit` data) is the nearer neighbour, and a tie of summed votes goes to the class first in
`classes_` (numpy's argmax). The top k are found per block by `torch.topk` (numpy's
`np.argpartition` when torch is missing: same result, measured 15x slower on 256 x 100,000
similarities on this project's 2-core machine: 0.42 s against 0.028 s), then a tie at the k-th
place is detected (one comparison pass over the block) and only such rows are re-ranked by a
stable sort, so neighbours and votes are a function of the similarity values alone, whatever the
selection method or the training blocking. Similarities are float32 (codes are float32 in featx's
cache; float32 halves the memory and doubles the speed of the matrix product); weights and votes
are float64. The one limit: BLAS may round the last bit of a product differently for another
block shape (measured: a row predicted within 4-row query blocks gets probabilities up to 1e-6
relative away from the same row in a larger block, 1/T magnifying the similarity's rounding), so
a neighbour or a vote within float32 rounding of a tie may go either way between blockings. Same
data, same blocks, same machine: the same numbers.

Memory. Similarities are computed `query_block` query rows by `train_block` training rows at a
time (default 256 x 65,536 float32: 64 MiB), the top k of each training block kept, and the blocks'
candidates merged (same order as above), so memory is bounded by the block, not by the data.

Saving. A k-NN classifier IS its training codes: predicting needs every training row, so
`to_arrays()` returns them (L2-normalised, with their labels) beside `classes_`. That costs
n_train x n_features x 4 bytes (100,000 rows x 1,280 dims: 488 MiB; a linear classifier of the same
codes and 100 classes: 0.5 MiB), or half of it with `to_arrays(codes_dtype="float16")`. Measured
(benchmarks/knn_speed.py, synthetic clustered codes, 100,000 x 1,280, 10,000 queries, k = 20,
T = 0.07): float16 copies changed none of the 10,000 predictions, but moved probabilities by up to
0.043 (a similarity's float16 rounding, ~1e-3, is magnified by 1/T in the weight). So float32 is
the default, which predicts exactly what the fitted classifier predicted (the reports' numbers),
and float16 is an option where the file's size matters more. `from_arrays(arrays, params)`
rebuilds the fitted classifier from plain data (float16 codes are re-normalised in float32).

`grid_scores` is how featx chooses k and T on validation rows, as it chooses C: one neighbour search
at max(k), then every (k, T) from those top similarities, each scored as featx scores a softmax
(accuracy, ties to the mean log-likelihood of the true class). It equals fitting and scoring each
(k, T) separately (tests/classifiers/test_knn.py), at the cost of one (benchmarks/knn_speed.py).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featx.classifiers.protocol import KNN_KS, KNN_TEMPERATURES
from featx.errors import FeatxError, UsageError

KS = KNN_KS  # DINOv2's k grid (`--nb_knn` default); the protocol's default grid
TEMPERATURES = KNN_TEMPERATURES  # DINOv2's 0.07 and a factor ~3 either side: sharper or flatter votes
QUERY_BLOCK = 256  # query rows per matrix product
TRAIN_BLOCK = 65536  # training rows per matrix product: 256 x 65,536 float32 similarities = 64 MiB
LOG_FLOOR = 1e-15  # a true class with no vote scores log(1e-15), as classify's val_tiebreak does
CODES_DTYPES = ("float32", "float16")


class KnnUsageError(UsageError, ValueError):
    """A bad k-NN parameter or code: a featx UsageError (the CLI prints one line) and a ValueError,
    which is what scikit-learn's contract expects of an estimator given invalid input."""


def _check_params(n_neighbors, temperature, query_block, train_block) -> None:
    def bad(name, value, want):
        raise KnnUsageError(f"k-NN {name}={value!r}: {want}")

    def whole(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1

    def positive(v) -> bool:
        number = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
        return number and bool(np.isfinite(v)) and v > 0

    if not whole(n_neighbors):
        bad("n_neighbors", n_neighbors, "k must be a whole number of at least 1 (DINOv2: 10, 20, 100, 200)")
    if not positive(temperature):
        bad("temperature", temperature, "T must be a positive number (DINOv2 uses 0.07)")
    for name, v in (("query_block", query_block), ("train_block", train_block)):
        if not whole(v):
            bad(name, v, "give a whole number of rows, at least 1")


def _finite(X: np.ndarray, what: str) -> None:
    if not np.isfinite(X).all():
        rows = int((~np.isfinite(X)).any(axis=1).sum())
        raise KnnUsageError(
            f"k-NN {what}: {rows} of {len(X)} rows hold NaN or inf values; drop or re-extract those rows"
        )


def _normalise(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32; an all-zero row stays zero (similarity 0 to all)."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64)).astype(np.float32)
    norms[norms == 0] = 1.0
    return X / norms[:, None]


def _cap(k: int, n: int) -> int:
    if k > n:
        warnings.warn(
            f"k-NN n_neighbors={k} is more than the {n} training rows; using k={n} (every training row votes)",
            UserWarning,
            stacklevel=3,
        )
    return min(k, n)


def _select(S: np.ndarray, k: int, offset: int, use_torch: bool) -> tuple[np.ndarray, np.ndarray]:
    """The k largest of each row of a similarity block, ordered by (similarity desc, column asc),
    with their columns + `offset`; a tie at the k-th place goes to the smaller column."""
    q, m = S.shape
    if k >= m:
        cols = np.broadcast_to(np.arange(m), (q, m))
    else:
        if use_torch:
            import torch

            cols = torch.topk(torch.from_numpy(S), k, dim=1, sorted=False).indices.numpy()
        else:
            cols = np.argpartition(S, m - k, axis=1)[:, m - k :]
        kth = np.take_along_axis(S, cols, axis=1).min(axis=1)
        tied = np.flatnonzero((kth[:, None] <= S).sum(axis=1) > k)  # more than k rows reach the k-th value
        if len(tied):
            cols = cols.copy()
            cols[tied] = np.argsort(-S[tied], axis=1, kind="stable")[:, :k]
    vals = np.take_along_axis(S, cols, axis=1)
    order = np.lexsort((cols, -vals), axis=1)
    idx = np.take_along_axis(cols, order, axis=1).astype(np.int64) + offset
    return np.take_along_axis(vals, order, axis=1), idx


def _merge(vals: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of candidates from several training blocks, in the same (similarity, index) order."""
    order = np.lexsort((idx, -vals), axis=1)[:, :k]
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(idx, order, axis=1)


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _votes(sims: np.ndarray, labels: np.ndarray, k: int, temperature: float, n_classes: int) -> np.ndarray:
    """Class probabilities (q, n_classes) from the first k of sorted neighbours: weights
    exp((sim - top1) / T) summed per class, divided by their total."""
    s = sims[:, :k].astype(np.float64)
    w = np.exp((s - s[:, :1]) / temperature)
    q = len(s)
    flat = (np.arange(q)[:, None] * n_classes + labels[:, :k]).ravel()
    votes = np.bincount(flat, weights=w.ravel(), minlength=q * n_classes).reshape(q, n_classes)
    return votes / votes.sum(axis=1, keepdims=True)


class WeightedKNN(ClassifierMixin, BaseEstimator):
    """k-NN on L2-normalised codes: the k most similar (cosine) training rows vote exp(sim / T).

    Parameters
    ----------
    n_neighbors : int, default 20
        k, the number of voting neighbours; more than the training rows is capped, with a warning.
    temperature : float, default 0.07
        T in the vote weight exp(sim / T): small T lets the nearest neighbours dominate.
    query_block, train_block : int
        Rows per matrix product (memory: query_block x train_block x 4 bytes); results do not depend
        on them.

    Fitted attributes: `classes_`, `n_features_in_`, `n_neighbors_` (k after capping),
    `train_codes_` (float32, unit rows), `train_labels_` (indices into `classes_`).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> clf = WeightedKNN(n_neighbors=3).fit(X, [0, 0, 1, 1])
    >>> clf.predict([[1.0, 0.2], [0.2, 1.0]]).tolist()
    [0, 1]
    """

    def __init__(
        self,
        n_neighbors: int = 20,
        temperature: float = 0.07,
        query_block: int = QUERY_BLOCK,
        train_block: int = TRAIN_BLOCK,
    ):
        self.n_neighbors = n_neighbors
        self.temperature = temperature
        self.query_block = query_block
        self.train_block = train_block

    def fit(self, X, y):
        _check_params(self.n_neighbors, self.temperature, self.query_block, self.train_block)
        X, y = validate_data(self, X, y, dtype=(np.float32, np.float64), ensure_all_finite=False)
        check_classification_targets(y)
        _finite(X, "training codes")
        self.classes_, labels = np.unique(y, return_inverse=True)
        self.train_labels_ = labels.astype(np.int64)
        self.train_codes_ = _normalise(X)
        self.n_neighbors_ = _cap(int(self.n_neighbors), len(X))
        return self

    def kneighbors(self, X, n_neighbors: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, training row indices) of each query's nearest rows, most similar first:
        float32 and int64 arrays of shape (n_queries, k); k defaults to `n_neighbors_` and is capped
        at the training rows (with a warning)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=(np.float32, np.float64), ensure_all_finite=False)
        _finite(X, "query codes")
        n = len(self.train_codes_)
        if n_neighbors is None:
            k = self.n_neighbors_
        else:
            _check_params(n_neighbors, self.temperature, self.query_block, self.train_block)
            k = _cap(int(n_neighbors), n)
        Q = _normalise(X)
        qb, tb = int(self.query_block), int(self.train_block)
        use_torch = _torch_available()
        sims = np.empty((len(Q), k), dtype=np.float32)
        idx = np.empty((len(Q), k), dtype=np.int64)
        for a in range(0, len(Q), qb):
            block, codes = Q[a : a + qb], self.train_codes_
            parts = [_select(block @ codes[b : b + tb].T, k, b, use_torch) for b in range(0, n, tb)]
            if len(parts) == 1:
                s, i = parts[0]
            else:
                s, i = _merge(np.hstack([p[0] for p in parts]), np.hstack([p[1] for p in parts]), k)
            sims[a : a + qb], idx[a : a + qb] = s, i
        return sims, idx

    def predict_proba(self, X) -> np.ndarray:
        """Each class's share of the k neighbours' vote weights (rows sum to 1), columns in `classes_` order."""
        check_is_fitted(self)
        sims, idx = self.kneighbors(X)
        k, T = self.n_neighbors_, float(self.temperature)
        return _votes(sims, self.train_labels_[idx], k, T, len(self.classes_))

    def predict(self, X) -> np.ndarray:
        """The class with the largest summed vote weight (a tie: the class first in `classes_`)."""
        check_is_fitted(self)
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    # -- pickle-free saving ------------------------------------------------------------------------

    def to_arrays(self, codes_dtype: str = "float32") -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, params): the fitted classifier as named numpy arrays and a JSON-able dict.

        arrays: `codes` (n_train x n_features, unit rows, `codes_dtype`: float32 exact, float16 half
        the size and a few predictions different, see the module docstring), `labels` (int64 indices
        into `classes_`) and `classes_` (numbers for safetensors: featx trains on integer class ids).
        params: the hyper-parameters, `n_neighbors_`, `n_features_in` and `codes_dtype`."""
        check_is_fitted(self)
        if codes_dtype not in CODES_DTYPES:
            raise KnnUsageError(f"k-NN codes_dtype={codes_dtype!r}: use one of {', '.join(CODES_DTYPES)}")
        arrays = {
            "codes": np.ascontiguousarray(self.train_codes_, dtype=codes_dtype),
            "labels": np.ascontiguousarray(self.train_labels_, dtype=np.int64),
            "classes_": np.asarray(self.classes_),
        }
        params = {
            "type": type(self).__name__,
            "n_neighbors": int(self.n_neighbors),
            "temperature": float(self.temperature),
            "query_block": int(self.query_block),
            "train_block": int(self.train_block),
            "n_neighbors_": int(self.n_neighbors_),
            "n_features_in": int(self.n_features_in_),
            "codes_dtype": codes_dtype,
        }
        json.dumps(params)  # plain data, by construction
        return arrays, params

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict, where: str = "k-NN") -> WeightedKNN:
        """The fitted classifier `to_arrays` described, every shape and value checked (a damaged or
        edited file is a FeatxError naming `where`, never a wrong prediction)."""

        def bad(what: str):
            raise FeatxError(f"{where}: {what}; the file is damaged or was edited; refit the classifier")

        if not isinstance(params, dict) or params.get("type", cls.__name__) != cls.__name__:
            kind = params.get("type") if isinstance(params, dict) else type(params).__name__
            bad(f"params describe a {kind}, not a {cls.__name__}")
        if set(arrays) != {"codes", "labels", "classes_"}:
            bad(f"arrays {', '.join(sorted(arrays))}: expected codes, labels, classes_")
        try:
            est = cls(**{p: params[p] for p in ("n_neighbors", "temperature", "query_block", "train_block")})
            _check_params(est.n_neighbors, est.temperature, est.query_block, est.train_block)
            k, d, dtype = int(params["n_neighbors_"]), int(params["n_features_in"]), params["codes_dtype"]
        except (KeyError, TypeError, ValueError) as e:
            bad(f"params are unusable ({e})")
        codes, labels, classes = (np.asarray(arrays[a]) for a in ("codes", "labels", "classes_"))
        if dtype not in CODES_DTYPES or codes.dtype != np.dtype(dtype) or codes.shape[1:] != (d,):
            bad(f"array codes must be {dtype} of shape (rows, {d}); got {codes.dtype} {codes.shape}")
        n = len(codes)
        if n < 1 or not np.isfinite(codes).all():
            bad("array codes must hold at least one row of finite numbers")
        if labels.shape != (n,) or labels.dtype.kind not in "iu" or classes.ndim != 1 or len(classes) < 1:
            bad(f"arrays labels ({n} integers) and classes_ (one or more) do not match the codes")
        if labels.min() < 0 or labels.max() >= len(classes) or len(np.unique(classes)) != len(classes):
            bad(f"array labels must index the {len(classes)} distinct classes_")
        if not 1 <= k <= min(n, int(est.n_neighbors)):
            bad(f"n_neighbors_={k} must be between 1 and min(n_neighbors, {n} rows)")
        est.classes_ = classes
        est.train_labels_ = labels.astype(np.int64)
        est.train_codes_ = _normalise(codes) if dtype == "float16" else np.ascontiguousarray(codes)
        est.n_neighbors_ = k
        est.n_features_in_ = d
        return est


@dataclass(frozen=True)
class GridScore:
    """One (k, T) of `grid_scores`: validation accuracy and mean log-likelihood of the true class
    (classify's `val_score` and `val_tiebreak`)."""

    k: int
    temperature: float
    val_score: float
    val_tiebreak: float


def grid_scores(
    X_train,
    y_train,
    X_val,
    y_val,
    ks: Sequence[int] = KS,
    temperatures: Sequence[float] = TEMPERATURES,
    *,
    query_block: int = QUERY_BLOCK,
    train_block: int = TRAIN_BLOCK,
) -> list[GridScore]:
    """Validation scores of WeightedKNN(k, T) fitted on the training rows, for every k in `ks` and T
    in `temperatures` (k-major order), from one neighbour search at max(k).

    Each score equals `WeightedKNN(k, T).fit(X_train, y_train)` scored on the validation rows:
    accuracy, and the mean log-likelihood of the true class with probabilities floored at 1e-15 (a
    class absent from the training rows counts as that floor), as featx scores a softmax. k above
    the training rows is capped with one warning; ks that cap to the same k are scored once each.

    >>> import numpy as np
    >>> X = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> [s.val_score for s in grid_scores(X, [0, 0, 1, 1], X, [0, 0, 1, 1], ks=(1, 2), temperatures=(0.07,))]
    [1.0, 1.0]
    """
    ks, temperatures = list(ks), list(temperatures)
    if not ks or not temperatures:
        raise KnnUsageError("k-NN grid: give at least one k and one temperature")
    for k in ks:
        _check_params(k, temperatures[0], query_block, train_block)
    for t in temperatures:
        _check_params(ks[0], t, query_block, train_block)
    knn = WeightedKNN(max(ks), temperatures[0], query_block, train_block).fit(X_train, y_train)
    n = len(knn.train_codes_)
    sims, idx = knn.kneighbors(X_val)  # max(k), capped once (the fit warned)
    labels = knn.train_labels_[idx]
    y_val = np.asarray(y_val)
    known = np.isin(y_val, knn.classes_)
    col = np.searchsorted(knn.classes_, y_val).clip(0, len(knn.classes_) - 1)
    rows = np.arange(len(y_val))
    out = []
    for k in dict.fromkeys(min(k, n) for k in ks):
        for t in temperatures:
            proba = _votes(sims, labels, k, float(t), len(knn.classes_))
            acc = float(np.mean(knn.classes_[np.argmax(proba, axis=1)] == y_val))
            loglik = np.where(known, np.log(np.clip(proba[rows, col], LOG_FLOOR, 1.0)), np.log(LOG_FLOOR))
            out.append(GridScore(int(k), float(t), acc, float(np.mean(loglik))))
    return out
