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
   and the layer is the deepest within one paired standard error of the best (featx.classifiers.selection,
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
`Protocol(solver="torch")` solves softmax with featx.classifiers.torch_softmax instead (scikit-learn's objective,
torch L-BFGS in float32, on `Protocol.device`), along the same chains; the pipeline it returns holds
a plain LogisticRegression with torch's solution, so saving and predicting do not change. `solver`
is part of a protocol's identity (reports, bench cell keys) only when it is torch; "auto" resolves
in `validate` (torch when softmax fits on CUDA, else sklearn), so a stored protocol never says auto.
Codes are standardized (default), L2-normalized or left as they are, optionally reduced by PCA.
`knn` (featx.classifiers.knn_probe) chooses k and T instead of C, under the same protocol; every
result has `k` and `temperature` (None for linear probes) and its `C` reads `k=20 T=0.07`.

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
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from featx.classifiers import selection
from featx.classifiers.cost import probe_cost, with_layer_cost
from featx.classifiers.estimators import make_pipeline
from featx.classifiers.grid import cv_splits, grid_scores, prepare_split, tiebreak_metric, warm_start
from featx.classifiers.knn_probe import fit_knn, knn_choice
from featx.classifiers.protocol import Protocol, TrainSize, parse_train_size
from featx.classifiers.rows import Rows, load_parts, select_rows
from featx.classifiers.sgd import fit_sgd
from featx.errors import FeatxError, UsageError, first_line
from featx.stats import pack_correct, wilson_interval
from featx.store.codes import CodesFile

log = logging.getLogger("featx")


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
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def fit_cell(
    path: str,
    layers: Sequence[str],
    protocol: Protocol,
    train_size: TrainSize | str = "all",
    seed: int = 0,
    return_model: bool = False,
    jobs: int = 1,
    warm: bool = True,
):
    """Fit and evaluate one cell. Returns the result dict, or (result, pipeline) with return_model.

    `jobs` fits grid values (and CV folds) side by side in threads; the results do not depend on
    it. `warm=False` fits every grid value and the refit from scratch, as featx did before warm
    starts (see `grid_scores` for how far the two may differ)."""
    train_size = train_size if isinstance(train_size, TrainSize) else parse_train_size(train_size)
    protocol = protocol.validate()  # `auto` solver resolved for this device
    t0 = time.perf_counter()
    with CodesFile(path) as f:
        f.require_labels("fit")
        layers = list(layers)
        f.check_layers(layers)  # every layer the file does not hold, in one line
        rows = select_rows(f, protocol, train_size, seed)
        dim = sum(f.dim(layer) for layer in layers)
        if protocol.classifier != "sgd":
            check_memory(len(rows.train) + len(rows.val) + len(rows.test), dim, layers)
        if (
            protocol.per_class
        ):  # its per-class cross-validation needs 2 images of each class: say which, by name
            counts = np.bincount(f.labels[rows.train], minlength=len(f.classes))
            if few := [c for c in range(len(counts)) if counts[c] == 1]:
                raise FeatxError(
                    f"class {f.classes[few[0]]!r} has fewer than 2 training images; the "
                    f"{protocol.preset or 'per-class svm'} protocol needs 2 or more per class"
                )
        # One BLAS thread, always: a multi-threaded BLAS sums in an order that depends on the
        # thread count, and lbfgs amplifies the last bits, so the numbers would change with --jobs
        # (joblib gives each worker one thread) or with the machine's cores. Parallelism comes from
        # fitting cells, grid values and folds side by side instead.
        with (
            warnings.catch_warnings(record=True) as caught,
            threadpool_limits(limits=1, user_api="blas"),
            _one_torch_thread(protocol),
        ):
            warnings.simplefilter("always")
            try:
                if protocol.classifier == "knn":
                    pipe, C, (val_score, tiebreak), y_pred, rule, val_folds = fit_knn(
                        f, layers, rows, protocol, seed
                    )
                elif protocol.classifier == "sgd":
                    pipe, C, (val_score, tiebreak), y_pred, rule, val_folds = fit_sgd(
                        f, layers, rows, protocol, seed
                    )
                else:
                    pipe, C, (val_score, tiebreak), y_pred, rule, val_folds = _fit_in_memory(
                        f, layers, rows, protocol, seed, dim, jobs, warm
                    )
            except (ValueError, FloatingPointError) as e:  # the solver gave up (overflow, degenerate data)
                raise FeatxError(
                    f"layer {'+'.join(layers)}: the {protocol.preset or protocol.classifier} solver "
                    f"failed ({first_line(e)}); try other "
                    f"--C values or --scale standardize"
                ) from None
        y_test = f.labels[rows.test]
        low, high = wilson_interval(int(np.sum(y_test == y_pred)), len(y_test))
        result = {
            "layer": "+".join(layers),
            "layers": layers,
            "dim": dim,
            "classifier": protocol.classifier,
            "preset": protocol.preset,
            "scale": protocol.scale,
            "pca": protocol.pca,
            "C": C,
            "seed": seed,
            "train_size": rows.train_size,
            "train_size_spec": str(train_size),
            "n_fit": len(rows.train) + len(rows.val),
            "n_val": len(rows.val),
            "n_test": len(rows.test),
            "val_source": rows.val_source,
            "test_split": rows.test_split,
            "val_score": val_score,
            "val_tiebreak": tiebreak,
            "val_tiebreak_metric": tiebreak_metric(protocol),
            "val_rule": rule,
            "val_folds": val_folds,
            "depth": _depth(f, layers),
            **metrics(y_test, y_pred, f.classes),
            "test_ci_low": low,
            "test_ci_high": high,
            "test_correct": pack_correct(y_test == y_pred),
            **knn_choice(pipe),
            "fit_seconds": round(time.perf_counter() - t0, 3),
            "convergence_warnings": sum(1 for w in caught if "Converge" in type(w.message).__name__),
        }
        result.update(probe_cost(pipe))
    return (result, pipe) if return_model else result


# Peak bytes per code value of an in-memory fit: the union of the rows read (float32), the train and
# test parts cut from it, the scaled copy, and the solver's working copies. Measured peaks of softmax
# and svm fits stay below it.
BYTES_PER_VALUE = 20


def memory_limit() -> tuple[int | None, str]:
    """(bytes this process can still take, what bounds it): the lower of the machine's available memory
    (MemAvailable) and what RLIMIT_AS leaves above the address space already mapped; None if unknown."""
    import resource

    found: list[tuple[int, str]] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            info = {
                ln.split(":")[0]: int(ln.split()[1]) * 1024
                for ln in fh
                if ln.split()[1:2] and ln.split()[1].isdigit()
            }
        if "MemAvailable" in info:
            found.append((info["MemAvailable"], "available memory"))
    except (OSError, ValueError, IndexError):
        pass
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        used = 0
        try:
            with open("/proc/self/status", encoding="ascii") as fh:
                used = next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("VmSize:"))
        except (OSError, ValueError, StopIteration):
            pass
        found.append((max(0, soft - used), "the address-space limit (ulimit -v)"))
    return min(found) if found else (None, "")


def check_memory(rows: int, dim: int, layers: Sequence[str]) -> None:
    """Refuse, before reading the codes, an in-memory fit that cannot fit in memory (one line, with the ways out)."""
    need = rows * dim * BYTES_PER_VALUE
    room, bound = memory_limit()
    if room is not None and need > room:
        gib = 1 << 30
        raise FeatxError(
            f"layer {'+'.join(layers)}: an in-memory fit of {rows:,} rows x {dim:,} dims needs about {need / gib:.1f} "
            f"GiB but {bound} leaves {room / gib:.1f} GiB; use --classifier sgd (streams the codes, --chunk-rows "
            f"bounds its memory), --pca K, or fewer rows (--train-size)"
        )


def _depth(f: CodesFile, layers: Sequence[str]) -> float:
    """A cell's relative depth for the layer choice: its layer's, or -1 for a concatenation."""
    return float(f.layer_meta(layers[0]).depth) if len(layers) == 1 else -1.0


@contextlib.contextmanager
def _one_torch_thread(protocol: Protocol):
    """The one-thread rule for the torch solver on the CPU (torch's intra-op threads are its BLAS;
    they also spin badly on a loaded machine): torch.set_num_threads(1) for the fit, then back."""
    from featx.classifiers.torch_softmax import fit_device_is_cpu

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


def _fit_in_memory(
    f: CodesFile,
    layers,
    rows: Rows,
    protocol: Protocol,
    seed: int,
    dim: int,
    jobs: int = 1,
    warm: bool = True,
):
    from joblib import effective_n_jobs
    from sklearn.linear_model import LogisticRegression

    from featx.classifiers import block_softmax

    n = len(rows.train)
    refit_rows = np.concatenate([rows.train, rows.val])  # train then val, the order the refit sums in
    X_all, X_te = load_parts(f, layers, (refit_rows, rows.test))  # one read of the file
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
            scores, _, _, folds = grid_scores(
                X_tr,
                y_tr,
                cv_splits(X_tr, y_tr, seed, rows.folds, rows.groups),
                protocol,
                seed,
                dim,
                jobs,
                warm,
            )
            # CV fits are small; the refit starts from zero
        else:
            holdout = [(np.arange(n), np.arange(n, len(y_all)))]
            # the refit's scaling/PCA does not depend on C: fitted in the grid's pool, after its chains
            scores, starts, refit_steps, _ = grid_scores(
                X_all,
                y_all,
                holdout,
                protocol,
                seed,
                dim,
                jobs,
                warm,
                side=lambda: prepare_split(
                    X_all, y_all, (np.arange(len(y_all)), np.arange(0)), protocol, seed, dim, steps_only=True
                ),
            )
        best = selection.best_C(protocol.Cs, scores, rule)
        C, val_score = float(protocol.Cs[best]), scores[best]
        if rows.folds:
            val_folds = [float(v[1]) for v in folds[best]]
        pipe = make_pipeline(protocol, C, seed, len(y_all), dim)
        if (
            warm
            and len(y_all) > block_softmax.BLOCK_ROWS
            and isinstance(pipe.steps[-1][1], LogisticRegression)
        ):
            # the refit runs alone: spread it over `jobs` cores, in numbers that do not depend on jobs
            pipe.steps[-1] = (
                "clf",
                block_softmax.BlockSoftmax(
                    C=C,
                    max_iter=protocol.max_iter,
                    threads=effective_n_jobs(jobs),
                    block_rows=block_softmax.BLOCK_ROWS,
                ),
            )
        clf = pipe.steps[-1][1]
        if refit_steps is None:  # CV: the refit fits its own steps on the training rows
            warm_start(clf, None)
            pipe.fit(X_all, y_all)
        else:  # hold-out: steps fitted beside the grid; the classifier starts from the chosen C's solution
            pipe.steps[:-1], Xt = refit_steps
            warm_start(clf, starts[best] if warm else None)
            clf.fit(Xt, y_all)
        warm_start(clf, None)  # the saved model reads as a plain one
        if hasattr(clf, "to_sklearn"):  # torch's or BlockSoftmax's as a plain LogisticRegression
            pipe.steps[-1] = ("clf", clf.to_sklearn())
    y_pred = pipe.predict(X_te)
    return pipe, C, val_score, y_pred, rule, val_folds


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
    notes: list[str] = field(default_factory=list)  # why a cost field is empty (featx.engine.layer_cost)

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
            rows.append(
                {
                    "layer": layer,
                    "dim": rs[0]["dim"],
                    "classifier": rs[0]["classifier"],
                    "preset": rs[0]["preset"],
                    "C": rs[0]["C"] if len(rs) == 1 else [r["C"] for r in rs],
                    "seeds": [r["seed"] for r in rs],
                    "train_size": rs[0]["train_size"],
                    "val_score": float(val.mean()),
                    "val_tiebreak": float(tie.mean()),
                    "val_source": rs[0]["val_source"],
                    "n_test": rs[0]["n_test"],
                    "accuracy": float(acc.mean()),
                    "accuracy_std": float(acc.std()),
                    "balanced_accuracy": float(bal.mean()),
                    "balanced_accuracy_std": float(bal.std()),
                    "fit_seconds": float(sum(r["fit_seconds"] for r in rs)),
                    # the cost fields (featx.classifiers.cost): the first seed's counts, mean seconds
                    "method": rs[0].get("method"),
                    "trainable_params": rs[0].get("trainable_params"),
                    "total_params": rs[0].get("total_params"),
                    "train_seconds": float(np.mean([r.get("train_seconds") or r["fit_seconds"] for r in rs])),
                    "inference_ms_per_image": rs[0].get("inference_ms_per_image"),
                    "inference_batch_size": rs[0].get("inference_batch_size"),
                }
            )
        return rows

    def candidates(self) -> list[selection.Candidate]:
        """Every layer as featx.classifiers.selection.choose_layer sees it (folds seed-major, in seed order)."""
        return [selection.candidate(layer, rs) for layer, rs in self.by_layer().items()]

    def to_dict(self) -> dict:
        return {
            "codes_file": self.path,
            "protocol": self.protocol.to_dict(),
            "train_size": str(self.train_size),
            "best_layer": self.best,
            "summary": self.summary(),
            "results": self.results,
            "cost_notes": self.notes,
        }


def layer_names(path: str, layers: Sequence[str] | str | None) -> list[str]:
    """`--layer` (None or 'all': every layer of the file) as names, each checked against the file
    (which must hold labels)."""
    with CodesFile(path) as f:
        f.require_labels("fit")
        names = (
            f.layers
            if layers in (None, "all")
            else ([x.strip() for x in layers.split(",")] if isinstance(layers, str) else list(layers))
        )
        names = [n for n in names if n]
        f.check_layers(names)
    return names


def fit(
    path: str,
    layers: Sequence[str] | str | None = None,
    protocol: Protocol | None = None,
    train_size: TrainSize | str = "all",
    seeds: Sequence[int] = (0,),
    jobs: int = 1,
    concat: bool = False,
    return_models: bool = False,
    warm: bool = True,
    cost: bool = True,
    timing: bool = True,
) -> FitReport:
    """Fit every layer (each on its own, plus their concatenation with `concat`) for every seed,
    in parallel with joblib; the best layer is featx.classifiers.selection.choose_layer's (validation only).
    `warm=False`: every grid value fitted from scratch (`fit_cell`). `cost`: each result's
    `total_params` and inference time per image (featx.classifiers.cost), the forward to each layer
    timed on `protocol.device` at the entry's extraction batch size; False leaves them None.
    `timing=False` counts the parameters but skips the timing (it builds the architecture and runs a
    few batches: seconds on a CPU at 224 px)."""
    from joblib import Parallel, delayed, effective_n_jobs

    protocol = (protocol or Protocol()).validate()
    train_size = train_size if isinstance(train_size, TrainSize) else parse_train_size(train_size)
    names = layer_names(path, layers)
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
    costs = {}
    if cost:
        from featx.engine.layer_cost import entry_costs

        layers = list(dict.fromkeys(r["layer"] for r in results))
        costs = entry_costs(path, layers, protocol.device, timing=timing)
    results = [with_layer_cost(r, costs.get(r["layer"])) for r in results]
    notes = list(dict.fromkeys(c.note for c in costs.values() if c.note))
    report = FitReport(path, protocol, train_size, results, best="", models=models, notes=notes)
    report.best = selection.choose_layer(report.candidates())
    _warn_grid_edge(results, protocol)
    return report


def _warn_grid_edge(results: list[dict], protocol: Protocol) -> None:
    """A chosen C at the end of its grid may be cut short by the grid: say so, once per layer."""
    if len(protocol.Cs) < 3:
        return
    low, high = min(protocol.Cs), max(protocol.Cs)
    edges = {}
    for r in results:
        c = r.get("C")
        if c is not None and c in (low, high):
            edges.setdefault(r["layer"], c)
    for layer, c in edges.items():
        side, wider = ("smallest", f"{low / 100:g}") if c == low else ("largest", f"{high * 100:g}")
        log.warning(
            "%s: the chosen C = %g is the grid's %s value; the best C may lie beyond it "
            "(widen --C, e.g. with %s)",
            layer,
            c,
            side,
            wider,
        )
