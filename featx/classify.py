"""Linear classifiers on cached codes: scikit-learn pipelines, protocols, honest evaluation.

The protocol of every fit (one *cell*: a layer or concatenation of layers, a train size, a seed):

1. training images = the file's `train` split, subsampled to `train_size` (total, stratified;
   or K per class) with `seed`;
2. validation = the file's `val` split when it has one (and a separate `test` split); else a seeded
   stratified hold-out of `val_fraction` of the training images, as long as it keeps at least
   `MIN_VAL_PER_CLASS` (10) images of every class; below that a hold-out decides on noise (two
   images per class at 10/class), so C is chosen by stratified k-fold cross-validation on the
   training images instead, k = min(5, smallest class count); or, with `cv=K`, K-fold
   cross-validation on the training (+ val) images. `sgd` streams its data and always uses the
   hold-out. `Protocol(min_val_per_class=0)` restores the plain hold-out;
3. C is the grid value with the best validation accuracy; ties are broken by a continuous
   validation score, the mean log-likelihood of the true class for softmax and the mean margin
   (true class's decision value minus the best other's) for svm and sgd, and only an exact tie of
   both goes to the smaller C. Under cross-validation softmax ranks by the log-likelihood first,
   and the layer is the deepest within one paired standard error of the best (featx.selection,
   a cell's `val_rule`). The pipeline is refitted on train + val with the chosen C;
4. metrics come from the test split only: the `test` split, or the `val` split when the file has
   no test split (hymenoptera's train/val), in which case validation comes from the training images.
   The test split never influences any choice.

Classifiers: `svm` (LinearSVC, squared hinge, L2), `softmax` (multinomial LogisticRegression,
lbfgs), `sgd` (SGDClassifier with hinge loss trained by `partial_fit` on row chunks streamed from
the HDF5 file, alpha = 1 / (C * n)): its memory is bounded by `chunk_rows`, whatever the file size.
softmax walks its C grid in fixed chains of warm starts (each C starts from the previous one's
solution, the refit from the chosen C's) and fits chains and CV folds side by side with `jobs`
(`_grid_scores` says how close that is to fits from scratch; `warm=False` gives those).
`Protocol(solver="torch")` solves softmax with featx.torch_softmax instead (scikit-learn's objective,
torch L-BFGS in float32, on `Protocol.device`), along the same chains; the pipeline it returns holds
a plain LogisticRegression with torch's solution, so saving and predicting do not change. `solver`
is part of a protocol's identity (reports, bench cell keys) only when it is torch; "auto" resolves
in `validate` (torch when softmax fits on CUDA, else sklearn), so a stored protocol never says auto.
Codes are standardized (default), L2-normalized or left as they are, optionally reduced by PCA.

Presets reproduce published protocols:
- `kornblith` (Kornblith et al. 2019, "Do Better ImageNet Models Transfer Better?"): multinomial
  L-BFGS logistic regression on raw codes, C = 1 / wd for wd in logspace(-6, 5, 45), validation =
  20% of train when there is no val split, refit on train + val.
- `vissl-svm` (VISSL's SVM benchmark): codes L2-normalized (x / (||x|| + 1e-5)); per class, a
  binary LinearSVC (labels +1/-1, class weight {+1: 2, -1: 1}, squared hinge, dual, tol 1e-4,
  max_iter 2000; seeded with 0, which VISSL leaves unset, so results repeat) whose cost is chosen
  from [0.01, 0.1, 1, 2, 5, 10, 15, 20, 50, 100, 1000] by 3-fold cross-validated average
  precision on the training (+ val) images; the class with the largest decision value wins.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from threadpoolctl import threadpool_limits

from featx import selection
from featx.data import group_holdout, stratified_holdout
from featx.errors import FeatxError, UsageError, first_line
from featx.settings import CLASSIFIERS, SCALES  # noqa: F401 (re-exported)
from featx.stats import pack_correct, wilson_interval
from featx.store import CodesFile

MIN_VAL_PER_CLASS = 10  # a hold-out keeping fewer images of a class than this: choose by CV instead
# (20 was measured too: at 50/class CV lowered the mean regret but raised it on flowers over 20
# seeds; README, "what the small-data rule buys")
MAX_AUTO_FOLDS = 5
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 3, 8))
# C outside this range breaks the solvers (sgd: alpha = 1 / (C n) underflows to 0 or overflows the
# weights; liblinear at C = 1e308 runs for minutes) and is far beyond any published grid
C_RANGE = (1e-10, 1e10)
VISSL_COSTS = (0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0)


@dataclass(frozen=True)
class Protocol:
    """How one cell is fitted and validated (see the module docstring)."""

    classifier: str = "softmax"
    Cs: tuple[float, ...] = DEFAULT_CS
    scale: str = "standardize"
    pca: int | None = None
    cv: int | None = None  # K-fold CV instead of a hold-out
    val_fraction: float = 0.2
    min_val_per_class: int = MIN_VAL_PER_CLASS  # smaller hold-outs become k-fold CV (0: never)
    preset: str | None = None
    per_class: bool = False  # VISSL's one binary SVM per class
    max_iter: int = 2000
    epochs: int = 5  # sgd
    chunk_rows: int = 4096  # sgd
    solver: str = "sklearn"  # softmax: 'sklearn' (lbfgs) or 'torch' (featx.torch_softmax); 'auto' resolves
    device: str = field(default="auto", compare=False)  # where the torch solver runs; not part of identity

    def validate(self) -> Protocol:
        if self.classifier not in CLASSIFIERS:
            raise UsageError(f"--classifier {self.classifier!r}: use one of {', '.join(CLASSIFIERS)}")
        if self.scale not in SCALES:
            raise UsageError(f"--scale {self.scale!r}: use one of {', '.join(SCALES)}")
        if not self.Cs or any(not (c > 0 and math.isfinite(c)) for c in self.Cs):
            raise UsageError("--C: give positive, finite values (e.g. 0.01,0.1,1)")
        out = [c for c in self.Cs if not C_RANGE[0] <= c <= C_RANGE[1]]
        if out:
            raise UsageError(
                f"--C {out[0]:g}: use values from {C_RANGE[0]:g} to {C_RANGE[1]:g} (e.g. 0.01,0.1,1)"
            )
        if self.pca is not None and self.pca < 1:
            raise UsageError(f"--pca {self.pca}: must be a positive number of components")
        if self.cv is not None and self.cv < 2:
            raise UsageError(f"--cv {self.cv}: needs at least 2 folds")
        if self.min_val_per_class < 0:
            raise UsageError(f"min_val_per_class {self.min_val_per_class}: must be 0 or more")
        if not 0.0 < self.val_fraction < 1.0:
            raise UsageError(f"--val-fraction {self.val_fraction}: must be between 0 and 1")
        if self.epochs < 1 or self.chunk_rows < 16:
            raise UsageError("--epochs must be >= 1 and --chunk-rows >= 16")
        from featx.torch_softmax import resolve_solver

        solver = resolve_solver(self.solver, self.classifier, self.device, self.per_class)
        return self if solver == self.solver else replace(self, solver=solver)

    def to_dict(self) -> dict:
        """The protocol's identity (reports, bench cell keys). `solver` enters it only when it is
        torch (its numbers differ slightly from scikit-learn's), so sklearn protocols keep the keys
        they had before the field existed; `device` never does (same solver, same answer).
        `selection` names featx.selection's cross-validated rule where it can apply (softmax that may
        validate by CV), so bench cells fitted under the older rule are refitted, not reused."""
        d = asdict(self)
        d["Cs"] = [float(c) for c in self.Cs]
        d.pop("device")
        if d["solver"] == "sklearn":
            d.pop("solver")
        if self.classifier == "softmax" and not self.per_class and (self.cv or self.min_val_per_class):
            d["selection"] = "cv-loglik-1se"  # featx.selection's rule under CV: cells from before it differ
        return d


PRESETS = {
    "kornblith": Protocol(
        "softmax",
        tuple(float(1.0 / wd) for wd in np.logspace(-6, 5, 45)),
        "none",
        val_fraction=0.2,
        preset="kornblith",
        max_iter=1000,
    ),  # fmt: skip
    "vissl-svm": Protocol("svm", VISSL_COSTS, "l2", cv=3, preset="vissl-svm", per_class=True, max_iter=2000),
}


def protocol_for(classifier: str = "softmax", preset: str | None = None, **overrides) -> Protocol:
    """A preset's protocol (overrides on top), or a plain one for `classifier`."""
    if preset is not None:
        if preset not in PRESETS:
            raise UsageError(f"--preset {preset!r}: use one of {', '.join(PRESETS)}")
        return replace(PRESETS[preset], **overrides).validate()
    return Protocol(classifier=classifier, **overrides).validate()


# -- train sizes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSize:
    """`all`, N images in total (stratified), or K images per class."""

    kind: str  # 'all' | 'total' | 'per_class'
    n: int = 0

    def __str__(self) -> str:
        return {"all": "all", "total": str(self.n), "per_class": f"{self.n}/class"}[self.kind]


def parse_train_size(text: str | int | None) -> TrainSize:
    if text is None or str(text).strip().lower() == "all":
        return TrainSize("all")
    s = str(text).strip().lower()
    try:
        if s.endswith("/class"):
            k = int(s[: -len("/class")])
            kind = "per_class"
        else:
            k, kind = int(s), "total"
        if k < 1:
            raise ValueError
    except ValueError:
        raise UsageError(
            f"--train-size {text!r}: use all, a total N (e.g. 200), or K per class (e.g. 10/class)"
        ) from None
    return TrainSize(kind, k)


# -- estimators ----------------------------------------------------------------------------------


class L2Normalize(TransformerMixin, BaseEstimator):
    """x / (||x|| + eps), row-wise (VISSL's normalization, eps 1e-5)."""

    def __init__(self, eps: float = 1e-5):
        self.eps = eps

    def fit(self, X, y=None):
        self.n_features_in_ = np.asarray(X).shape[1]
        return self

    def transform(self, X):
        X = np.asarray(X, dtype=np.float64)
        return X / (np.linalg.norm(X, axis=1, keepdims=True) + self.eps)


class PerClassSVM(ClassifierMixin, BaseEstimator):
    """VISSL's SVM protocol: per class, a binary LinearSVC whose cost is chosen by k-fold
    cross-validated average precision; prediction is the argmax of the decision functions."""

    def __init__(self, costs: Sequence[float] = VISSL_COSTS, folds: int = 3, max_iter: int = 2000):
        self.costs = costs
        self.folds = folds
        self.max_iter = max_iter

    def _svm(self, cost: float):
        from sklearn.svm import LinearSVC

        # VISSL leaves random_state unset; liblinear's dual solver shuffles, so featx seeds it (0) to be repeatable
        return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2",
                         loss="squared_hinge", tol=1e-4, dual=True, max_iter=self.max_iter, random_state=0)  # fmt: skip

    def fit(self, X, y):
        from sklearn.model_selection import cross_val_score

        X = np.asarray(X, dtype=np.float64)
        self.classes_ = np.unique(y)
        self.estimators_, self.costs_, self.cv_ap_ = [], [], []
        for c in self.classes_:
            yb = np.where(y == c, 1, -1)
            folds = min(self.folds, int(min((yb == 1).sum(), (yb == -1).sum())))
            if folds < 2:
                raise FeatxError(
                    f"class {c.item() if hasattr(c, 'item') else c} has fewer than 2 training images; "
                    f"the vissl-svm preset needs 2 or more"
                )
            aps = [
                cross_val_score(self._svm(cost), X, yb, cv=folds, scoring="average_precision").mean()
                for cost in self.costs
            ]
            best = int(np.argmax(aps))  # VISSL takes the first maximum
            self.costs_.append(float(self.costs[best]))
            self.cv_ap_.append(float(aps[best]))
            self.estimators_.append(self._svm(self.costs[best]).fit(X, yb))
        return self

    def decision_function(self, X):
        X = np.asarray(X, dtype=np.float64)
        return np.stack([e.decision_function(X) for e in self.estimators_], axis=1)

    def predict(self, X):
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]


def make_pipeline(protocol: Protocol, C: float, seed: int, n_fit: int, dim: int):
    """The scikit-learn Pipeline of one protocol at one C: scaling, optional PCA, classifier."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    steps = []
    if protocol.scale == "standardize":
        steps.append(("scale", StandardScaler()))
    elif protocol.scale == "l2":
        steps.append(("scale", L2Normalize()))
    if protocol.pca:
        steps.append(("pca", PCA(n_components=min(protocol.pca, n_fit, dim), random_state=seed)))
    if protocol.per_class:
        clf = PerClassSVM(protocol.Cs, protocol.cv or 3, protocol.max_iter)
    elif protocol.classifier == "svm":
        clf = LinearSVC(
            C=C,
            loss="squared_hinge",
            penalty="l2",
            dual="auto",
            max_iter=protocol.max_iter,
            random_state=seed,
        )
    elif protocol.classifier == "softmax" and protocol.solver == "torch":
        from featx.torch_softmax import TorchSoftmax

        clf = TorchSoftmax(C=C, max_iter=protocol.max_iter, device=protocol.device)
    elif protocol.classifier == "softmax":
        clf = LogisticRegression(C=C, solver="lbfgs", max_iter=protocol.max_iter)
    else:
        clf = SGDClassifier(loss="hinge", penalty="l2", alpha=1.0 / (C * max(n_fit, 1)), random_state=seed)
    steps.append(("clf", clf))
    return Pipeline(steps)


# -- one cell ------------------------------------------------------------------------------------


@dataclass
class Rows:
    """Row indices of one cell, all sorted."""

    train: np.ndarray  # images the classifier learns from (after subsampling), hold-out excluded
    val: np.ndarray  # validation images (empty with cv)
    test: np.ndarray
    val_source: str  # 'val split' | 'hold-out 20% of train' | '5-fold cv'
    test_split: str  # 'test' | 'val'
    train_size: int  # training-split images used, hold-out included
    folds: int | None = None  # C chosen by this many CV folds on `train` (val is then empty)
    groups: np.ndarray | None = (
        None  # the groups of `train` (files made with --group-by): folds keep them whole
    )


def select_rows(f: CodesFile, protocol: Protocol, train_size: TrainSize, seed: int) -> Rows:
    """Which rows train, validate and test a cell; the errors a user can cause, stated plainly."""
    present = [s for s in ("train", "val", "test") if (f.split == s).any()]
    if "train" not in present:
        raise FeatxError(f"{f.path} has no train split (splits: {', '.join(present) or 'none'}); extract "
                         f"data with a train split, or data without splits so featx makes one")  # fmt: skip
    test_split = "test" if "test" in present else "val" if "val" in present else None
    if test_split is None:
        raise FeatxError(f"{f.path} has only a train split; there is nothing to test on")
    if seed < 0:
        raise UsageError(f"--seed {seed}: seeds must be non-negative integers")
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(f.split == "train")
    train = _subsample(train, f.labels, train_size, rng, f.classes)
    classes = np.unique(f.labels[train])
    if len(classes) < 2:
        name = f.classes[int(classes[0])] if len(classes) else "none"
        raise FeatxError(
            f"the training images of {f.path} hold a single class ({name}); a classifier needs two or more"
        )
    test = np.flatnonzero(f.split == test_split)
    n_train = len(train)
    g = getattr(f, "groups", None)
    grouped = "grouped " if g is not None else ""
    if test_split == "test" and "val" in present:
        val, source = np.flatnonzero(f.split == "val"), "val split"
        if protocol.cv or protocol.per_class:  # CV uses every labelled non-test image
            train, val = np.sort(np.concatenate([train, val])), np.empty(0, np.int64)
            source = f"{protocol.cv or 3}-fold cv on train+val"
    elif protocol.cv or protocol.per_class:
        val, source = np.empty(0, np.int64), f"{protocol.cv or 3}-fold {grouped}cv"
    elif (folds := _auto_folds(f.labels[train], protocol, None if g is None else g[train])) is not None:
        return Rows(train, np.empty(0, np.int64), test, f"{folds}-fold {grouped}cv", test_split, n_train, folds,
                    None if g is None else g[train])  # fmt: skip
    else:
        held = (
            stratified_holdout(f.labels[train], protocol.val_fraction, rng)
            if g is None
            else group_holdout(f.labels[train], g[train], protocol.val_fraction, rng)
        )
        train, val = train[~held], train[held]
        source = f"{grouped}hold-out {protocol.val_fraction:.0%} of train"
        if len(val) == 0:
            raise FeatxError(
                f"--train-size {train_size} leaves no images to validate on; use a larger train size or --cv"
            )
    folds = protocol.cv if protocol.cv and not protocol.per_class else None
    train, val = np.sort(train), np.sort(val)
    return Rows(train, val, test, source, test_split, n_train, folds, None if g is None else g[train])


def _auto_folds(labels: np.ndarray, protocol: Protocol, groups: np.ndarray | None = None) -> int | None:
    """k for cross-validation when a hold-out would keep fewer than `min_val_per_class` images of
    some class (the same count `stratified_holdout` takes), else None: keep the hold-out. With
    groups, k is at most the number of groups."""
    if protocol.classifier == "sgd" or not protocol.min_val_per_class:
        return None
    smallest = int(np.bincount(labels)[np.unique(labels)].min())
    held = max(1, int(round(smallest * protocol.val_fraction)))
    k = min(MAX_AUTO_FOLDS, smallest, len(np.unique(groups)) if groups is not None else smallest)
    if held >= protocol.min_val_per_class or k < 2:
        return None
    return k


def _subsample(rows: np.ndarray, labels: np.ndarray, size: TrainSize, rng, classes: list[str]) -> np.ndarray:
    if size.kind == "all":
        return rows
    y = labels[rows]
    present = np.unique(y)
    if size.kind == "per_class":
        out = []
        for c in present:
            idx = rows[y == c]
            if len(idx) < size.n:
                raise FeatxError(
                    f"--train-size {size}: class {classes[int(c)]!r} has only {len(idx)} training images"
                )
            out.append(rng.choice(idx, size.n, replace=False))
        return np.sort(np.concatenate(out))
    if size.n > len(rows):
        raise FeatxError(f"--train-size {size.n} is larger than the {len(rows)} training images")
    if size.n < len(present):
        raise FeatxError(f"--train-size {size.n} is smaller than the number of classes ({len(present)})")
    from sklearn.model_selection import train_test_split

    if size.n == len(rows):
        return rows
    picked, _ = train_test_split(rows, train_size=size.n, stratify=y, random_state=int(rng.integers(2**31)))
    return np.sort(picked)


def _load(f: CodesFile, layers: Sequence[str], rows: np.ndarray) -> np.ndarray:
    return (
        np.hstack([f.codes(layer, rows) for layer in layers]) if len(layers) > 1 else f.codes(layers[0], rows)
    )


def _load_parts(f: CodesFile, layers: Sequence[str], parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    """`_load` of several disjoint row sets in one read of their union (a cell's train, val and
    test rows together are often the whole file, which reads faster in one pass than in three)."""
    union = np.sort(np.concatenate(parts))
    X = _load(f, layers, union)
    return [X[np.searchsorted(union, p)] for p in parts]


def metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(classes)))
    p, r, f1, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(np.mean(y_true == y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "per_class": {
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]), "support": int(s[i])}
            for i, c in enumerate(classes)
        },  # fmt: skip
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def fit_cell(path: str, layers: Sequence[str], protocol: Protocol, train_size: TrainSize | str = "all", seed: int = 0,
             return_model: bool = False, jobs: int = 1, warm: bool = True):  # fmt: skip
    """Fit and evaluate one cell. Returns the result dict, or (result, pipeline) with return_model.

    `jobs` fits grid values (and CV folds) side by side in threads; the results do not depend on
    it. `warm=False` fits every grid value and the refit from scratch, as featx did before warm
    starts (see `_grid_scores` for how far the two may differ)."""
    train_size = train_size if isinstance(train_size, TrainSize) else parse_train_size(train_size)
    t0 = time.perf_counter()
    with CodesFile(path) as f:
        layers = list(layers)
        for layer in layers:
            f.dim(layer)  # a clear error for a layer the file does not hold
        rows = select_rows(f, protocol, train_size, seed)
        dim = sum(f.dim(layer) for layer in layers)
        # One BLAS thread, always: a multi-threaded BLAS sums in an order that depends on the
        # thread count, and lbfgs amplifies the last bits, so the numbers would change with --jobs
        # (joblib gives each worker one thread) or with the machine's cores. Parallelism comes from
        # fitting cells, grid values and folds side by side instead.
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1, user_api="blas"), \
                _one_torch_thread(protocol):  # fmt: skip
            warnings.simplefilter("always")
            try:
                if protocol.classifier == "sgd":
                    pipe, C, (val_score, tiebreak), y_pred, rule, val_folds = _fit_sgd(f, layers, rows, protocol,
                                                                                        seed)  # fmt: skip
                else:
                    pipe, C, (val_score, tiebreak), y_pred, rule, val_folds = _fit_in_memory(
                        f, layers, rows, protocol, seed, dim, jobs, warm)  # fmt: skip
            except (ValueError, FloatingPointError) as e:  # the solver gave up (overflow, degenerate data)
                raise FeatxError(f"layer {'+'.join(layers)}: the {protocol.preset or protocol.classifier} solver "
                                 f"failed ({first_line(e)}); try other "
                                 f"--C values or --scale standardize") from None  # fmt: skip
        y_test = f.labels[rows.test]
        low, high = wilson_interval(int(np.sum(y_test == y_pred)), len(y_test))
        result = {
            "layer": "+".join(layers), "layers": layers, "dim": dim, "classifier": protocol.classifier,
            "preset": protocol.preset, "scale": protocol.scale, "pca": protocol.pca, "C": C, "seed": seed,
            "train_size": rows.train_size, "train_size_spec": str(train_size), "n_fit": len(rows.train) + len(rows.val),
            "n_val": len(rows.val), "n_test": len(rows.test), "val_source": rows.val_source,
            "test_split": rows.test_split, "val_score": val_score, "val_tiebreak": tiebreak,
            "val_tiebreak_metric": _tiebreak_metric(protocol), "val_rule": rule, "val_folds": val_folds,
            "depth": _depth(f, layers), **metrics(y_test, y_pred, f.classes),
            "test_ci_low": low, "test_ci_high": high, "test_correct": pack_correct(y_test == y_pred),
            "fit_seconds": round(time.perf_counter() - t0, 3),
            "convergence_warnings": sum(1 for w in caught if "Converge" in type(w.message).__name__),
        }  # fmt: skip
    return (result, pipe) if return_model else result


def _depth(f: CodesFile, layers: Sequence[str]) -> float:
    """A cell's relative depth for the layer choice: its layer's, or -1 for a concatenation."""
    return float(f.layer_meta(layers[0]).depth) if len(layers) == 1 else -1.0


@contextlib.contextmanager
def _one_torch_thread(protocol: Protocol):
    """The one-thread rule for the torch solver on the CPU (torch's intra-op threads are its BLAS;
    they also spin badly on a loaded machine): torch.set_num_threads(1) for the fit, then back."""
    from featx.torch_softmax import fit_device_is_cpu

    if protocol.solver != "torch" or not fit_device_is_cpu(protocol.device):
        yield
        return
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _fit_in_memory(f: CodesFile, layers, rows: Rows, protocol: Protocol, seed: int, dim: int, jobs: int = 1,
                   warm: bool = True):  # fmt: skip
    from joblib import effective_n_jobs
    from sklearn.linear_model import LogisticRegression

    from featx import block_softmax

    n = len(rows.train)
    refit_rows = np.concatenate([rows.train, rows.val])  # train then val, the order the refit sums in
    X_all, X_te = _load_parts(f, layers, (refit_rows, rows.test))  # one read of the file
    y_all = f.labels[refit_rows]
    X_tr, y_tr = X_all[:n], y_all[:n]
    rule = selection.val_rule(protocol.classifier, protocol.per_class, bool(rows.folds))
    val_folds: list[float] = []
    if protocol.per_class:
        pipe = make_pipeline(protocol, 1.0, seed, len(y_tr), dim).fit(X_tr, y_tr)
        clf = pipe.named_steps["clf"]
        C, val_score = clf.costs_, (float(np.mean(clf.cv_ap_)),) * 2  # mean AP is continuous already
    else:
        refit_steps = None
        if rows.folds:
            scores, _, _, folds = _grid_scores(X_tr, y_tr, _cv_splits(X_tr, y_tr, seed, rows.folds, rows.groups),
                                               protocol, seed, dim, jobs, warm)  # fmt: skip
            # CV fits are small; the refit starts from zero
        else:
            holdout = [(np.arange(n), np.arange(n, len(y_all)))]
            # the refit's scaling/PCA does not depend on C: fitted in the grid's pool, after its chains
            scores, starts, refit_steps, _ = _grid_scores(
                X_all, y_all, holdout, protocol, seed, dim, jobs, warm,
                side=lambda: _prepare(X_all, y_all, (np.arange(len(y_all)), np.arange(0)), protocol, seed, dim,
                                      steps_only=True),
            )  # fmt: skip
        best = selection.best_C(protocol.Cs, scores, rule)
        C, val_score = float(protocol.Cs[best]), scores[best]
        if rows.folds:
            val_folds = [float(v[1]) for v in folds[best]]
        pipe = make_pipeline(protocol, C, seed, len(y_all), dim)
        if warm and len(y_all) > block_softmax.BLOCK_ROWS and isinstance(pipe.steps[-1][1], LogisticRegression):
            # the refit runs alone: spread it over `jobs` cores, in numbers that do not depend on jobs
            pipe.steps[-1] = ("clf", block_softmax.BlockSoftmax(C=C, max_iter=protocol.max_iter,
                                                                threads=effective_n_jobs(jobs),
                                                                block_rows=block_softmax.BLOCK_ROWS))  # fmt: skip
        clf = pipe.steps[-1][1]
        if refit_steps is None:  # CV: the refit fits its own steps on the training rows
            _warm_start(clf, None)
            pipe.fit(X_all, y_all)
        else:  # hold-out: steps fitted beside the grid; the classifier starts from the chosen C's solution
            pipe.steps[:-1], Xt = refit_steps
            _warm_start(clf, starts[best] if warm else None)
            clf.fit(Xt, y_all)
        _warm_start(clf, None)  # the saved model reads as a plain one
        if hasattr(clf, "to_sklearn"):  # torch's or BlockSoftmax's as a plain LogisticRegression
            pipe.steps[-1] = ("clf", clf.to_sklearn())
    y_pred = pipe.predict(X_te)
    return pipe, C, val_score, y_pred, rule, val_folds


def _tiebreak_metric(protocol: Protocol) -> str:
    if protocol.per_class:
        return "mean average precision"
    return "mean log-likelihood" if protocol.classifier == "softmax" else "mean margin"


def _val_scores(clf, X, y, protocol: Protocol) -> tuple[float, float]:
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


def _cv_splits(X, y, seed: int, folds: int, groups=None) -> list[tuple[np.ndarray, np.ndarray]]:
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
# 2 balances the chains across cores better than longer ones (measured: benchmarks/fit_speed.py)


def _chains(protocol: Protocol, warm: bool) -> list[list[int]]:
    """Indices of `protocol.Cs` grouped into warm-start chains, each in ascending C: consecutive runs
    of CHAIN_LENGTH values (or one fewer) of the sorted grid for softmax (lbfgs takes a starting
    point), one value each for svm (liblinear starts from zero, always) or with `warm=False`."""
    order = sorted(range(len(protocol.Cs)), key=lambda i: protocol.Cs[i])
    if not warm or protocol.classifier != "softmax":
        return [[i] for i in order]
    return [list(c) for c in np.array_split(order, math.ceil(len(order) / CHAIN_LENGTH))]


def _warm_start(clf, start) -> None:
    """Start a LogisticRegression's (or TorchSoftmax's) next fit at `start` = (coef, intercept); None:
    from zero. Other classifiers (liblinear's LinearSVC has no starting point) start from zero."""
    from sklearn.linear_model import LogisticRegression

    from featx.block_softmax import BlockSoftmax
    from featx.torch_softmax import TorchSoftmax

    if not isinstance(clf, (LogisticRegression, TorchSoftmax, BlockSoftmax)):
        return
    if start is None:
        clf.set_params(warm_start=False)
        return
    clf.set_params(warm_start=True)
    clf.coef_, clf.intercept_ = start[0].copy(), start[1].copy()


def _prepare(X, y, split, protocol: Protocol, seed: int, dim: int, steps_only: bool = False):
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
    return Xt, y[tr], _apply(steps, X[va]), y[va]


def _chain(fold, chain: list[int], protocol: Protocol, seed: int, dim: int):
    """One prepared fold (`_prepare`), one chain of grid values: (index, score, (coef, intercept))
    per value, each fit warm-started from the previous one's solution (the first from zero)."""
    Xt, yt, Xv, yv = fold
    clf = make_pipeline(protocol, protocol.Cs[chain[0]], seed, len(yt), dim).steps[-1][1]
    out, start = [], None
    for i in chain:
        clf.set_params(C=protocol.Cs[i])
        _warm_start(clf, start)
        clf.fit(Xt, yt)
        start = (clf.coef_.copy(), clf.intercept_.copy()) if hasattr(clf, "coef_") else None
        out.append((i, _val_scores(clf, Xv, yv, protocol), start))
    return out


def _grid_scores(X, y, splits, protocol: Protocol, seed: int, dim: int, jobs: int = 1, warm: bool = True,
                 side=None):  # fmt: skip
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
    tasks = sorted(((s, c) for s in range(len(splits)) for c in _chains(protocol, warm)),
                   key=lambda t: (-max(protocol.Cs[i] for i in t[1]), t[0]))  # fmt: skip
    folds = Parallel(n_jobs=min(jobs, len(splits)) if jobs > 0 else jobs, backend="threading")(
        delayed(_prepare)(X, y, split, protocol, seed, dim) for split in splits
    )
    calls = [delayed(_chain)(folds[s], c, protocol, seed, dim) for s, c in tasks]
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


# -- out-of-core SGD -----------------------------------------------------------------------------


def _chunks(f: CodesFile, layers, rows: np.ndarray, chunk_rows: int, rng=None):
    """(row positions, codes) over `rows` in chunks of at most `chunk_rows`, chunk order shuffled with `rng`."""
    starts = list(range(0, len(rows), chunk_rows))
    if rng is not None:
        rng.shuffle(starts)
    for s in starts:
        part = rows[s : s + chunk_rows]
        yield part, _load(f, layers, part)


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
                pca.partial_fit(_apply(steps, X))
        steps.append(("pca", pca))
    return steps


def _apply(steps, X):
    for _, step in steps:
        X = step.transform(X)
    return X


def _sgd_train(f, layers, rows, steps, protocol: Protocol, C: float, seed: int, classes):
    from sklearn.linear_model import SGDClassifier

    clf = SGDClassifier(loss="hinge", penalty="l2", alpha=1.0 / (C * max(len(rows), 1)), random_state=seed)
    rng = np.random.default_rng(seed)
    for _ in range(protocol.epochs):
        for part, X in _chunks(f, layers, rows, protocol.chunk_rows, rng):
            order = rng.permutation(len(part))
            clf.partial_fit(_apply(steps, X)[order], f.labels[part][order], classes=classes)
    return clf


def _sgd_predict(f, layers, rows, steps, clf, chunk_rows: int) -> np.ndarray:
    out = np.empty(len(rows), dtype=np.int64)
    pos = 0
    for part, X in _chunks(f, layers, rows, chunk_rows):
        out[pos : pos + len(part)] = clf.predict(_apply(steps, X))
        pos += len(part)
    return out


def _sgd_val_scores(f, layers, rows, steps, clf, protocol: Protocol) -> tuple[float, float]:
    """`_val_scores` over streamed chunks, weighted by chunk size."""
    total, acc, tie = 0, 0.0, 0.0
    for part, X in _chunks(f, layers, rows, protocol.chunk_rows):
        a, t = _val_scores(clf, _apply(steps, X), f.labels[part], protocol)
        total, acc, tie = total + len(part), acc + a * len(part), tie + t * len(part)
    return (acc / total, tie / total) if total else (0.0, 0.0)


def _fit_sgd(f: CodesFile, layers, rows: Rows, protocol: Protocol, seed: int):
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


# -- many cells ----------------------------------------------------------------------------------


@dataclass
class FitReport:
    """Results of `fit`: one dict per (layer, seed), the layer chosen by validation score, and
    (with return_models) the first seed's pipeline per layer."""

    path: str
    protocol: Protocol
    train_size: TrainSize
    results: list[dict]
    best: str
    models: dict = field(default_factory=dict)

    def by_layer(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for r in self.results:
            out.setdefault(r["layer"], []).append(r)
        return out

    def summary(self) -> list[dict]:
        """Per layer: mean and std over seeds of the headline numbers."""
        rows = []
        for layer, rs in self.by_layer().items():
            acc = np.array([r["accuracy"] for r in rs])
            bal = np.array([r["balanced_accuracy"] for r in rs])
            val = np.array([r["val_score"] for r in rs])
            tie = np.array([r.get("val_tiebreak", 0.0) for r in rs])
            rows.append({
                "layer": layer, "dim": rs[0]["dim"], "classifier": rs[0]["classifier"], "preset": rs[0]["preset"],
                "C": rs[0]["C"] if len(rs) == 1 else [r["C"] for r in rs], "seeds": [r["seed"] for r in rs],
                "train_size": rs[0]["train_size"], "val_score": float(val.mean()),
                "val_tiebreak": float(tie.mean()), "val_source": rs[0]["val_source"], "n_test": rs[0]["n_test"],
                "accuracy": float(acc.mean()),
                "accuracy_std": float(acc.std()), "balanced_accuracy": float(bal.mean()),
                "balanced_accuracy_std": float(bal.std()), "fit_seconds": float(sum(r["fit_seconds"] for r in rs)),
            })  # fmt: skip
        return rows

    def candidates(self) -> list[selection.Candidate]:
        """Every layer as featx.selection.choose_layer sees it (folds seed-major, in seed order)."""
        return [selection.candidate(layer, rs) for layer, rs in self.by_layer().items()]

    def to_dict(self) -> dict:
        return {"codes_file": self.path, "protocol": self.protocol.to_dict(), "train_size": str(self.train_size),
                "best_layer": self.best, "summary": self.summary(), "results": self.results}  # fmt: skip


def fit(path: str, layers: Sequence[str] | str | None = None, protocol: Protocol | None = None,
        train_size: TrainSize | str = "all", seeds: Sequence[int] = (0,), jobs: int = 1, concat: bool = False,
        return_models: bool = False, warm: bool = True) -> FitReport:  # fmt: skip
    """Fit every layer (each on its own, plus their concatenation with `concat`) for every seed,
    in parallel with joblib; the best layer is featx.selection.choose_layer's (validation only).
    `warm=False`: every grid value fitted from scratch (`fit_cell`)."""
    from joblib import Parallel, delayed, effective_n_jobs

    protocol = (protocol or Protocol()).validate()
    train_size = train_size if isinstance(train_size, TrainSize) else parse_train_size(train_size)
    with CodesFile(path) as f:
        names = (
            f.layers
            if layers in (None, "all")
            else ([x.strip() for x in layers.split(",")] if isinstance(layers, str) else list(layers))
        )
        names = [n for n in names if n]
        for n in names:
            f.dim(n)
    if not names:
        raise UsageError("--layer is empty; name layers of the file (featx info FILE lists them)")
    groups = [[n] for n in dict.fromkeys(names)]
    if concat:
        if len(groups) < 2:
            raise UsageError("--concat needs two or more layers")
        groups.append(list(dict.fromkeys(names)))
    seeds = list(dict.fromkeys(int(s) for s in seeds)) or [0]
    cells = [(g, s) for g in groups for s in seeds]
    # Cells side by side in processes; cores left over fit grid values side by side inside a cell
    # (a single-layer fit gets them all). Neither changes a number.
    n_jobs = effective_n_jobs(jobs)
    inner = max(1, n_jobs // len(cells))
    if len(cells) == 1:
        out = [fit_cell(path, cells[0][0], protocol, train_size, cells[0][1], return_models, inner, warm)]
    else:
        out = Parallel(n_jobs=min(n_jobs, len(cells)))(
            delayed(fit_cell)(path, g, protocol, train_size, s, return_models and s == seeds[0], inner, warm)
            for g, s in cells
        )
    results, models = [], {}
    for (g, s), o in zip(cells, out):
        if return_models and s == seeds[0]:
            o, pipe = o
            models["+".join(g)] = pipe
        results.append(o)
    report = FitReport(path, protocol, train_size, results, best="", models=models)
    report.best = selection.choose_layer(report.candidates())
    return report
