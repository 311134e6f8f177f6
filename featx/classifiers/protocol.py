"""The probe protocol (classifier, C grid, preprocessing, validation) and train sizes; presets.

`knn` (featx.classifiers.knn.WeightedKNN, DINOv2's weighted vote) has no C: its grid is `ks` x
`temperatures` (`--knn-k`, `--knn-t`), chosen on validation as C is. It compares cosine
similarities of the codes as extracted (the estimator L2-normalises them itself), so its `scale` is
`none` and it takes no PCA; its identity (`to_dict`) holds only the fields that change its numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from featx.errors import UsageError
from featx.settings import CLASSIFIERS, SCALES, SOLVERS, bad_value, choice

MIN_VAL_PER_CLASS = 10  # a hold-out keeping fewer images of a class than this: choose by CV instead


# (20 was measured too: at 50/class CV lowered the mean regret but raised it on flowers over 20
# seeds; docs/results/probes.md, "what the small-data rule buys")
MAX_AUTO_FOLDS = 5


DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 3, 8))


# C outside this range breaks the solvers (sgd: alpha = 1 / (C n) underflows to 0 or overflows the
# weights; liblinear at C = 1e308 runs for minutes) and is far beyond any published grid
C_RANGE = (1e-10, 1e10)


KNN_KS = (10, 20, 100, 200)  # DINOv2's k grid (`--nb_knn` default)
KNN_TEMPERATURES = (0.02, 0.07, 0.2)  # DINOv2's 0.07 and a factor ~3 either side: sharper or flatter votes
KNN_DEFAULT_T = 0.07  # an exact tie between temperatures goes to the one nearest this (DINOv2's value)

# the fields of a knn protocol's identity; C, the solver's and sgd's fields do not touch its numbers
_KNN_IDENTITY = (
    "classifier",
    "ks",
    "temperatures",
    "scale",
    "pca",
    "cv",
    "val_fraction",
    "min_val_per_class",
    "preset",
    "per_class",
)


VISSL_COSTS = (0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0)


@dataclass(frozen=True)
class Protocol:
    """How one cell is fitted and validated (see the module docstring)."""

    classifier: str = "softmax"
    Cs: tuple[float, ...] = DEFAULT_CS
    scale: str | None = None  # None: standardize, or none for knn (resolved at construction)
    pca: int | None = None
    cv: int | None = None  # K-fold CV instead of a hold-out
    val_fraction: float = 0.2
    min_val_per_class: int = MIN_VAL_PER_CLASS  # smaller hold-outs become k-fold CV (0: never)
    preset: str | None = None
    per_class: bool = False  # VISSL's one binary SVM per class
    max_iter: int = 2000
    epochs: int = 5  # sgd
    chunk_rows: int = 4096  # sgd
    solver: str = (
        "sklearn"  # softmax: 'sklearn' (lbfgs) or 'torch' (featx.classifiers.torch_softmax); 'auto' resolves
    )
    device: str = field(default="auto", compare=False)  # where the torch solver runs; not part of identity
    ks: tuple[int, ...] = KNN_KS  # knn: the k grid
    temperatures: tuple[float, ...] = KNN_TEMPERATURES  # knn: the T grid

    def __post_init__(self) -> None:
        """Validated at construction, like every settings object (errors name the CLI option)."""
        choice("classifier", self.classifier, CLASSIFIERS)
        if self.scale is None:
            object.__setattr__(self, "scale", "none" if self.classifier == "knn" else "standardize")
        choice("scale", self.scale, SCALES)
        self._check_knn()
        try:
            object.__setattr__(self, "Cs", tuple(float(c) for c in self.Cs))
        except (TypeError, ValueError):
            bad_value("Cs", self.Cs, "give positive, finite numbers (e.g. 0.01,0.1,1)")
        if not self.Cs or any(not (c > 0 and math.isfinite(c)) for c in self.Cs):
            raise UsageError("--C: give positive, finite values (e.g. 0.01,0.1,1)")
        out = [c for c in self.Cs if not C_RANGE[0] <= c <= C_RANGE[1]]
        if out:
            raise UsageError(
                f"--C {out[0]:g}: use values from {C_RANGE[0]:g} to {C_RANGE[1]:g} (e.g. 0.01,0.1,1)"
            )
        if self.pca is not None and not (isinstance(self.pca, int) and self.pca >= 1):
            bad_value("pca", self.pca, "must be a positive number of components")
        if self.cv is not None and not (isinstance(self.cv, int) and self.cv >= 2):
            bad_value("cv", self.cv, "needs at least 2 folds")
        if not (isinstance(self.min_val_per_class, int) and self.min_val_per_class >= 0):
            bad_value("min_val_per_class", self.min_val_per_class, "must be 0 or more")
        if not 0.0 < self.val_fraction < 1.0:
            bad_value("val_fraction", self.val_fraction, "must be between 0 and 1")
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            bad_value("epochs", self.epochs, "must be >= 1")
        if not (isinstance(self.chunk_rows, int) and self.chunk_rows >= 16):
            bad_value("chunk_rows", self.chunk_rows, "must be >= 16")
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            bad_value("max_iter", self.max_iter, "must be >= 1")
        choice("solver", self.solver, SOLVERS)

    def _check_knn(self) -> None:
        """The k and T grids (always, so a bad default can never hide), and what knn cannot take."""

        def whole(v) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1

        def positive(v) -> bool:
            return (
                isinstance(v, (int, float, np.integer, np.floating))
                and not isinstance(v, bool)
                and bool(np.isfinite(v))
                and v > 0
            )

        ks, ts = (tuple(v) if isinstance(v, (list, tuple)) else (v,) for v in (self.ks, self.temperatures))
        if not ks or not all(whole(k) for k in ks):
            bad_value(
                "ks", ",".join(map(str, ks)), "k must be whole numbers, at least 1 (e.g. 10,20,100,200)"
            )
        if not ts or not all(positive(t) for t in ts):
            bad_value("temperatures", ",".join(map(str, ts)), "T must be positive numbers (e.g. 0.07)")
        object.__setattr__(self, "ks", tuple(sorted({int(k) for k in ks})))
        object.__setattr__(self, "temperatures", tuple(sorted({float(t) for t in ts})))
        if self.classifier != "knn":
            return
        if self.scale != "none":
            raise UsageError(
                f"--scale {self.scale}: the k-NN probe compares cosine similarities of the codes as "
                f"extracted (it L2-normalises them itself); leave --scale out or use --scale none"
            )
        if self.pca is not None or self.per_class:
            raise UsageError("--pca: the k-NN probe takes the codes as extracted; leave --pca out with knn")

    def validate(self) -> Protocol:
        """The protocol with `solver='auto'` resolved for its device (the checks ran at construction)."""
        from featx.classifiers.torch_softmax import resolve_solver

        solver = resolve_solver(self.solver, self.classifier, self.device, self.per_class)
        return self if solver == self.solver else replace(self, solver=solver)

    def to_dict(self) -> dict:
        """The protocol's identity (reports, bench cell keys). `solver` enters it only when it is
        torch (its numbers differ slightly from scikit-learn's), so sklearn protocols keep the keys
        they had before the field existed; `device` never does (same solver, same answer).
        `selection` names featx.classifiers.selection's cross-validated rule where it can apply (softmax that may
        validate by CV), so bench cells fitted under the older rule are refitted, not reused."""
        d = asdict(self)
        if self.classifier == "knn":
            return {k: list(d[k]) if isinstance(d[k], tuple) else d[k] for k in _KNN_IDENTITY}
        d["Cs"] = [float(c) for c in self.Cs]
        for k in ("device", "ks", "temperatures"):  # the knn grids: not part of a linear probe's identity
            d.pop(k)
        if d["solver"] == "sklearn":
            d.pop("solver")
        if self.classifier == "softmax" and not self.per_class and (self.cv or self.min_val_per_class):
            d["selection"] = (
                "cv-loglik-1se"  # featx.classifiers.selection's rule under CV: cells from before it differ
            )
        return d


PRESETS = {
    "kornblith": Protocol(
        "softmax",
        tuple(float(1.0 / wd) for wd in np.logspace(-6, 5, 45)),
        "none",
        val_fraction=0.2,
        preset="kornblith",
        max_iter=1000,
    ),
    "vissl-svm": Protocol("svm", VISSL_COSTS, "l2", cv=3, preset="vissl-svm", per_class=True, max_iter=2000),
}


def protocol_for(classifier: str = "softmax", preset: str | None = None, **overrides) -> Protocol:
    """A preset's protocol (overrides on top), or a plain one for `classifier`."""
    if preset is not None:
        if preset not in PRESETS:
            raise UsageError(f"--preset {preset!r}: use one of {', '.join(PRESETS)}")
        return replace(PRESETS[preset], **overrides).validate()
    return Protocol(classifier=classifier, **overrides).validate()


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
