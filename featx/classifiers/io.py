"""Saved classifiers: one pickle-free file that `featx predict` loads, and an optional joblib export.

`save_classifier(NAME, ...)` writes `NAME.safetensors`, ONE file holding
- the arrays of the fitted pipeline (scaler mean/scale, PCA mean/components, coefficients,
  intercepts, class ids), as plain little-endian tensors;
- in its header, a JSON description: everything needed to go from an image to a class (model,
  weights and their sha256, the backbone's identity, layers, activation, pooling, the exact
  preprocessing, class names, featx version), the pipeline's steps (type, hyper-parameters, fitted
  sizes), a sha256 of the arrays, and the fit's results.

Loading reads plain data only: the description is checked against a schema, the arrays against
the description, and the scikit-learn Pipeline is rebuilt from them (`from_arrays`); nothing is
unpickled. The file is written to a temporary name and renamed into place, so a failed save
(full disk, Ctrl-C) leaves the previous classifier as it was.

`export_joblib(PATH.joblib, ...)` writes the fitted Pipeline as a joblib pickle plus `PATH.json`
(the description and the pickle's sha256): the format of featx 0.1.0, handy for Python users, and
read by `featx predict` only with `trust_pickle=True` (`--trust-pickle`), since unpickling runs
code. A legitimate pair and a forged one (payload plus a matching sha256) look alike.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os

import numpy as np

from featx import __version__
from featx.classifiers.description import (
    FORMAT,
    HEADER_KEY,
    SUFFIX,
    classifier_path,
    describe,
    export_paths,
    is_num,
    is_size,
    locate,
    validate_description,
)
from featx.errors import FeatxError, UsageError, first_line

log = logging.getLogger("featx")


# Step types featx can write as arrays: class, fitted array attributes, fitted integer attributes.
_TRANSFORMERS = {
    "StandardScaler": ("sklearn.preprocessing", ("mean_", "scale_", "var_"), ()),
    "L2Normalize": ("featx.classifiers.estimators", (), ()),
    "PCA": ("sklearn.decomposition", ("components_", "mean_", "explained_variance_"), ("n_components_",)),
    "IncrementalPCA": (
        "sklearn.decomposition",
        ("components_", "mean_", "explained_variance_"),
        ("n_components_",),
    ),
}


_CLASSIFIERS = {
    "LinearSVC": "sklearn.svm",
    "LogisticRegression": "sklearn.linear_model",
    "SGDClassifier": "sklearn.linear_model",
    "PerClassSVM": "featx.classifiers.estimators",
    "WeightedKNN": "featx.classifiers.knn",  # its training codes are its arrays (knn.WeightedKNN.to_arrays)
}


_LINEAR = ("coef_", "intercept_", "classes_")


def _plain(v) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    return v is None or isinstance(v, (str, bool, int)) or (isinstance(v, float) and math.isfinite(v))


def _params(est) -> dict:
    """The hyper-parameters that are plain values (dicts such as class_weight are rebuilt by type)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in est.get_params(deep=False).items() if _plain(v)
    }


def to_arrays(pipeline, knn_codes: str = "float32") -> tuple[list[dict], dict[str, np.ndarray]]:
    """A fitted featx-kind pipeline as (step descriptions, named arrays): the inverse of from_arrays.
    `knn_codes`: how a WeightedKNN stores its training codes (float32 exact, float16 half the size)."""
    from sklearn.pipeline import Pipeline

    steps = list(pipeline.named_steps.values()) if isinstance(pipeline, Pipeline) else [pipeline]
    specs, arrays = [], {}
    for i, est in enumerate(steps):
        kind = type(est).__name__
        last = i == len(steps) - 1
        if (kind not in _CLASSIFIERS if last else kind not in _TRANSFORMERS) or type(est).__module__.split(
            "."
        )[0] not in ("sklearn", "featx"):
            raise UsageError(
                f"cannot save a {kind} step as arrays: featx saves pipelines of StandardScaler or L2Normalize, "
                f"optional PCA, and LinearSVC, LogisticRegression, SGDClassifier, PerClassSVM or WeightedKNN "
                f"(export_joblib "
                f"writes any Pipeline as a pickle)"
            )
        n_in = (
            getattr(est, "n_features_in_", None) or est.estimators_[0].n_features_in_
        )  # PerClassSVM: its SVMs'
        spec = {"type": kind, "params": _params(est), "n_features_in": int(n_in), "fitted": {}}
        if kind == "WeightedKNN":
            knn_arrays, knn_params = est.to_arrays(knn_codes)
            arrays.update({f"{i}.{a}": v for a, v in knn_arrays.items()})
            spec["fitted"] = {a: knn_params[a] for a in ("n_neighbors_", "codes_dtype")}
        elif kind == "PerClassSVM":
            arrays[f"{i}.coef_"] = np.vstack([e.coef_ for e in est.estimators_])
            arrays[f"{i}.intercept_"] = np.concatenate([np.ravel(e.intercept_) for e in est.estimators_])
            arrays[f"{i}.classes_"] = np.asarray(est.classes_)
            spec["fitted"] = {
                "costs_": [float(c) for c in est.costs_],
                "cv_ap_": [float(a) for a in est.cv_ap_],
            }
        else:
            names, ints = (_LINEAR, ()) if last else _TRANSFORMERS[kind][1:]
            for a in names:
                if getattr(est, a, None) is not None:
                    arrays[f"{i}.{a}"] = np.asarray(getattr(est, a))
            spec["fitted"] = {a: int(getattr(est, a)) for a in ints}
        specs.append(spec)
    for k, v in arrays.items():
        if v.dtype.kind not in "fiu" or v.dtype.itemsize > 8:
            raise UsageError(
                f"cannot save the classifier: its {k} holds {v.dtype} values, not numbers "
                f"(train on featx's integer class ids)"
            )
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            raise FeatxError(f"cannot save the classifier: its {k} is not finite numbers (the fit diverged)")
        arrays[k] = np.ascontiguousarray(v)
    return specs, arrays


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        v = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{v.dtype.str}|{v.shape}|".encode())
        h.update(v.tobytes())
    return h.hexdigest()


def from_arrays(specs: list[dict], arrays: dict[str, np.ndarray], where: str, n_labels: int):
    """Rebuild the scikit-learn Pipeline from step descriptions and arrays, checking every shape
    against the sizes the description states (`n_labels`: the number of class names)."""
    import importlib

    from sklearn.pipeline import Pipeline

    def bad(what: str):
        raise FeatxError(f"{where}: {what}; the file is damaged or was edited; refit the classifier")

    steps, used, width = [], set(), None
    for i, spec in enumerate(specs):
        kind, last = spec.get("type"), i == len(specs) - 1
        table = _CLASSIFIERS if last else _TRANSFORMERS
        if kind not in table:
            bad(f"step {i} has type {kind!r}, not one of {', '.join(table)}")
        params, fitted, n_in = spec.get("params"), spec.get("fitted"), spec.get("n_features_in")
        if not (
            isinstance(params, dict)
            and isinstance(fitted, dict)
            and is_size(n_in)
            and all(map(_plain, params.values()))
        ):
            bad(f"step {i} ({kind}) needs plain params, fitted values and n_features_in")
        if width is not None and n_in != width:
            bad(f"step {i} ({kind}) takes {n_in} features, the step before gives {width}")
        module = table[kind] if last else table[kind][0]
        cls = getattr(importlib.import_module(module), kind)
        known = cls().get_params(deep=False)
        try:
            est = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k in known})
        except (TypeError, ValueError) as e:
            bad(f"step {i} ({kind}) has unusable params ({e})")

        def get(
            name: str, ndim: int, rows: int | None = None, cols: int | None = None, ints: bool = False, i=i
        ):
            return _array(arrays, used, f"{i}.{name}", ndim, rows, cols, ints, bad)

        est.n_features_in_ = n_in
        if last and kind == "WeightedKNN":
            est = _rebuild_knn(i, est, params, fitted, n_in, n_labels, get, bad, where)
            width = None
        elif last:
            _rebuild_classifier(i, kind, est, fitted, n_in, n_labels, get, bad)
            width = None
        else:
            width = _rebuild_transformer(i, kind, est, fitted, n_in, arrays, get, bad)
        steps.append((spec.get("name") or ("clf" if last else ("pca" if "PCA" in kind else "scale")), est))
    extra = sorted(set(arrays) - used)
    if extra:
        bad(f"arrays {', '.join(extra)} belong to no step")
    names = [n for n, _ in steps]
    if len(set(names)) != len(names):
        steps = [(f"{n}{i}", e) for i, (n, e) in enumerate(steps)]
    return Pipeline(steps)


def _rebuild_classifier(i: int, kind: str, est, fitted: dict, n_in: int, n_labels: int, get, bad) -> None:
    """Set a linear classifier's fitted arrays (PerClassSVM: one binary LinearSVC per class)."""
    classes = get("classes_", 1, ints=True)
    if (
        len(classes) < 2
        or len(np.unique(classes)) != len(classes)
        or classes.min() < 0
        or classes.max() >= n_labels
    ):
        bad(f"array {i}.classes_ must hold 2 or more distinct class ids below {n_labels}")
    if len(classes) < n_labels:  # legitimate for classes with test images only, so a warning, not a refusal
        log.warning(
            "the classifier's description names %d classes but array %d.classes_ holds %d class ids: %d "
            "can never be predicted",
            n_labels,
            i,
            len(classes),
            n_labels - len(classes),
        )
    rows = len(classes) if (kind == "PerClassSVM" or len(classes) > 2) else 1
    coef, intercept = get("coef_", 2, rows, n_in), get("intercept_", 1, rows)
    est.classes_ = classes
    if kind != "PerClassSVM":
        est.coef_, est.intercept_ = coef, intercept
        return
    costs = fitted.get("costs_")
    if not (isinstance(costs, list) and len(costs) == rows and all(is_num(c) and c > 0 for c in costs)):
        bad("the per-class SVM needs one positive cost per class")
    est.costs_, est.cv_ap_, est.estimators_ = costs, fitted.get("cv_ap_"), []
    for r, cost in enumerate(costs):
        svm = est._svm(cost)
        svm.coef_, svm.intercept_, svm.classes_ = coef[r : r + 1], intercept[r : r + 1], np.array([-1, 1])
        svm.n_features_in_ = n_in
        est.estimators_.append(svm)


def _rebuild_knn(i: int, est, params: dict, fitted: dict, n_in: int, n_labels: int, get, bad, where: str):
    """The WeightedKNN of a step: its training codes, labels and class ids, checked by
    `WeightedKNN.from_arrays` (shapes, finite values, k within the rows) and here (class ids)."""
    dtype = fitted.get("codes_dtype")
    codes = get("codes", 2, None, n_in)
    if codes.dtype != np.dtype(dtype if dtype in ("float32", "float16") else "float32"):
        bad(f"array {i}.codes is {codes.dtype}, the description says {dtype}")
    classes = get("classes_", 1, ints=True)
    distinct = len(classes) >= 2 and len(np.unique(classes)) == len(classes)
    if not (distinct and classes.min() >= 0 and classes.max() < n_labels):
        bad(f"array {i}.classes_ must hold 2 or more distinct class ids below {n_labels}")
    arrays = {"codes": codes, "labels": get("labels", 1, len(codes), ints=True), "classes_": classes}
    knn = type(est).from_arrays(
        arrays, {**est.get_params(), **fitted, "type": type(est).__name__, "n_features_in": n_in}, where=where
    )
    return knn


def _rebuild_transformer(i: int, kind: str, est, fitted: dict, n_in: int, arrays, get, bad) -> int:
    """Set a scaler's or PCA's fitted arrays; returns the width it outputs."""
    if kind == "StandardScaler":
        for a in ("mean_", "scale_", "var_"):
            if f"{i}.{a}" in arrays or (a == "mean_" and est.with_mean) or (a == "scale_" and est.with_std):
                setattr(est, a, get(a, 1, n_in))
        if getattr(est, "scale_", None) is not None and not (est.scale_ > 0).all():
            bad(f"array {i}.scale_ must be positive")
        est.n_samples_seen_ = 1
        return n_in
    if kind == "L2Normalize":
        return n_in
    k = fitted.get("n_components_")  # PCA, IncrementalPCA
    if not is_size(k) or k > n_in:
        bad(f"step {i} ({kind}) needs n_components_ between 1 and {n_in}")
    est.components_, est.mean_ = get("components_", 2, k, n_in), get("mean_", 1, n_in)
    if f"{i}.explained_variance_" in arrays or est.whiten:
        est.explained_variance_ = get("explained_variance_", 1, k)
    est.n_components_ = k
    return k


def _array(arrays, used: set, key: str, ndim: int, rows, cols, ints: bool, bad) -> np.ndarray:
    v = arrays.get(key)
    if (
        v is None
        or v.ndim != ndim
        or (rows is not None and v.shape[0] != rows)
        or (cols is not None and v.shape[-1] != cols)
        or v.dtype.kind not in ("iu" if ints else "f")
    ):
        bad(f"array {key} is missing or has the wrong shape or type")
    if not ints and not np.isfinite(v).all():
        bad(f"array {key} holds values that are not finite")
    used.add(key)
    return v.astype(np.int64) if ints else v  # floats as saved: float32 PCA of float32 codes stays float32


def save_classifier(
    path: str,
    pipeline,
    codes: str | dict | None = None,
    layers: list[str] | None = None,
    *,
    extra: dict | None = None,
    knn_codes: str = "float32",
) -> str:
    """Save a fitted classifier where `featx predict` (and `load_classifier`) find it; returns the
    file's path (NAME.safetensors; see `classifier_path`).

    `pipeline`: a `FitReport` from `featx.fit(..., return_models=True)` (its best layer is saved,
    with the fit's results), or a fitted Pipeline trained on `layers` of the codes file `codes`
    (or on a description from `describe`). `extra`: more plain fields for the description.
    `knn_codes`: a k-NN classifier's stored training codes, float32 (predicts exactly as fitted) or
    float16 (half the size; see featx.classifiers.knn). Linear classifiers ignore it.
    """
    target = classifier_path(path)
    meta, pipe = _description(pipeline, codes, layers)
    specs, arrays = to_arrays(pipe, knn_codes)
    for name, spec in zip(_step_names(pipe), specs):
        spec["name"] = name
    meta = {
        **meta,
        **(extra or {}),
        "format": FORMAT,
        "pipeline": specs,
        "arrays_sha256": arrays_sha256(arrays),
    }
    meta.pop("joblib_sha256", None)
    validate_description(meta, target)
    from_arrays(specs, arrays, target, len(meta["classes"]))  # what load will do, before anything is written
    header = json.dumps(meta)
    _write(target, lambda tmp: _save_file(arrays, tmp, header), "--out")
    old = target[: -len(SUFFIX)] + ".joblib"
    if os.path.isfile(old):
        log.info(
            "%s now stands for this name; featx predict no longer reads the older pickle %s (remove it "
            "and its .json when you no longer need them)",
            target,
            old,
        )
    return target


def _step_names(pipe) -> list[str]:
    from sklearn.pipeline import Pipeline

    return list(pipe.named_steps) if isinstance(pipe, Pipeline) else ["clf"]


def _save_file(arrays: dict, tmp: str, header: str) -> None:
    from safetensors.numpy import save

    data = save(arrays, metadata={HEADER_KEY: header, "format": f"featx-classifier/{FORMAT}"})
    with open(tmp, "wb") as f:  # Python's write, so a full disk is an OSError like any other
        f.write(data)


def _description(pipeline, codes, layers) -> tuple[dict, object]:
    from featx.classifiers.fit import FitReport

    if isinstance(pipeline, FitReport):
        report = pipeline
        if report.best not in report.models:
            raise UsageError("save_classifier: the FitReport holds no models; fit with return_models=True")
        best = report.best
        first = next(r for r in report.results if r["layer"] == best)
        meta = describe(report.path, best.split("+"))
        meta.update(
            {
                "layer": best,
                "protocol": report.protocol.to_dict(),
                "train_size": str(report.train_size),
                "seed": first["seed"],
                "C": first["C"],
                "results": report.to_dict(),
            }
        )
        if first.get("k") is not None:  # a k-NN probe: its chosen k and T
            meta.update({"k": first["k"], "temperature": first["temperature"]})
        return meta, report.models[best]
    if isinstance(codes, dict):
        return dict(codes), pipeline
    if not isinstance(codes, str) or not layers:
        raise UsageError("save_classifier: give the codes file and the layers the pipeline was trained on")
    return describe(codes, list(layers)), pipeline


def _write(target: str, write, option: str) -> None:
    from featx.files import write_atomic

    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        write_atomic(target, write)
    except OSError as e:
        raise FeatxError(
            f"{option} {target}: cannot write the classifier ({e.strerror or e}); "
            f"an earlier classifier there is unchanged"
        ) from None


def export_joblib(
    path: str, pipeline, codes: str | dict | None = None, layers: list[str] | None = None
) -> tuple[str, str]:
    """Write the fitted Pipeline as PATH.joblib plus PATH.json (description + the pickle's sha256),
    both complete under temporary names before either is renamed into place (the description
    last). Reading it back unpickles: `load_classifier(path, trust_pickle=True)`."""
    import joblib

    from featx.files import file_sha256, fsync_file

    pkl, side = export_paths(path)
    meta, pipe = _description(pipeline, codes, layers)
    tmp_pkl, tmp_side = f"{pkl}.tmp", f"{side}.tmp"
    try:
        os.makedirs(os.path.dirname(pkl), exist_ok=True)
        joblib.dump(pipe, tmp_pkl)
        meta = {**meta, "format": 1, "joblib_sha256": file_sha256(tmp_pkl)}
        for p in ("pipeline", "arrays_sha256"):
            meta.pop(p, None)
        with open(tmp_side, "w", encoding="utf-8") as f:
            json.dump(meta, f)
        for tmp in (tmp_pkl, tmp_side):
            fsync_file(tmp)
        os.replace(tmp_pkl, pkl)
        os.replace(tmp_side, side)
    except OSError as e:
        raise FeatxError(f"--export-joblib {pkl}: cannot write ({e.strerror or e})") from None
    finally:
        for tmp in (tmp_pkl, tmp_side):
            with contextlib.suppress(OSError):
                os.remove(tmp)
    return pkl, side


def _same_release(a: str, b: str) -> bool:
    return a.split(".")[:2] == b.split(".")[:2]


def _check_release(path: str, meta: dict, force: bool) -> None:
    if not force and not _same_release(meta["featx_version"], __version__):
        raise FeatxError(
            f"{path} was made by featx {meta['featx_version']}, this is {__version__}; "
            f"refit it, or pass --force to use it anyway"
        )


def read_description(path: str) -> dict:
    """The JSON description in a classifier file's header, checked against the schema."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for damaged or truncated files
        raise FeatxError(
            f"{path}: not a readable classifier file ({first_line(e)}); refit it with featx fit --out"
        ) from None
    if HEADER_KEY not in header:
        raise FeatxError(
            f"{path}: a safetensors file without a featx classifier description (weights?); "
            f"featx fit --out NAME writes classifiers"
        )
    try:
        meta = json.loads(header[HEADER_KEY])
    except ValueError as e:
        raise FeatxError(f"{path}: its classifier description is not JSON ({e})") from None
    validate_description(meta, path, need=("pipeline", "arrays_sha256", "dims"))
    width = sum(meta["dims"].values())
    if meta["pipeline"][0].get("n_features_in") != width:
        raise FeatxError(
            f"{path}: field 'dims' (layer widths summing to {width}) does not match the pipeline's "
            f"input; the file was edited or is damaged; refit the classifier"
        )
    return meta


def _load_arrays(path: str, force: bool):
    from safetensors import safe_open

    meta = read_description(path)
    _check_release(path, meta, force)
    try:
        with safe_open(path, framework="numpy") as f:
            arrays = {k: np.array(f.get_tensor(k)) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # noqa: BLE001 (damaged data after a good header)
        raise FeatxError(f"{path}: its arrays are unreadable ({first_line(e)}); refit it") from None
    if arrays_sha256(arrays) != meta["arrays_sha256"] and not force:
        raise FeatxError(
            f"{path}: its arrays do not match the sha256 in its description (changed or corrupt); "
            f"refit it (--force uses it anyway)"
        )
    return from_arrays(meta["pipeline"], arrays, path, len(meta["classes"])), meta


def _load_pickle(path: str, force: bool, trust_pickle: bool):
    from featx.files import file_sha256

    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        raise FeatxError(
            f"{path}: is a safetensors file named .joblib, not a joblib pickle; rename it to "
            f"{os.path.splitext(path)[0]}.safetensors"
        )
    if not trust_pickle:
        raise FeatxError(
            f"{path} is a joblib pickle (featx 0.1.0's format, or an --export-joblib), and unpickling runs code, "
            f"so featx predict does not load it; re-save it pickle-free with featx fit ... --out NAME, or pass "
            f"--trust-pickle if you trust whoever made it"
        )
    side = os.path.splitext(path)[0] + ".json"
    try:
        with open(side, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise FeatxError(
            f"{path}: its metadata {side} is missing or unreadable ({e}); featx refuses to "
            f"unpickle a classifier without it"
        ) from None
    validate_description(meta, side, need=("joblib_sha256",))
    if not force and file_sha256(path) != meta["joblib_sha256"]:
        raise FeatxError(
            f"{path}: its sha256 does not match the one in {side} (changed or corrupt); "
            f"refusing to unpickle it (--force overrides)"
        )
    _check_release(path, meta, force)
    log.warning("loading %s: joblib files are pickles that can run code; load only files you trust", path)
    import joblib

    try:
        pipeline = joblib.load(path)
    except Exception as e:  # noqa: BLE001 (truncated or foreign bytes: any error the unpickler raises)
        raise FeatxError(
            f"{path}: not a readable joblib file ({type(e).__name__}: {first_line(e)}); refit it"
        ) from None
    if not hasattr(pipeline, "predict"):
        raise FeatxError(f"{path}: holds a {type(pipeline).__name__}, not a fitted classifier; refit it")
    return pipeline, meta


def load_classifier(path: str, force: bool = False, trust_pickle: bool = False):
    """(pipeline, description) of a saved classifier. The pickle-free file is rebuilt from plain
    arrays; a joblib pickle is read only with `trust_pickle` (after its sha256 check). `force`
    accepts a hash or featx-version mismatch, never a malformed file."""
    kind, found = locate(path, trust_pickle)
    if kind == "arrays":
        return _load_arrays(found, force)
    return _load_pickle(found, force, trust_pickle)
