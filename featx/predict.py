"""Classifier files and prediction on new images.

A saved classifier is two files:
- `NAME.joblib`: one scikit-learn Pipeline (scaling, optional PCA, classifier);
- `NAME.json`: everything needed to go from an image to a class (model, weights reference and
  sha256, layers, their activation and pooling, the exact preprocessing, class names, featx
  version), the fit's results, and the sha256 of `NAME.joblib`.

joblib files are pickles, and unpickling runs code. `load_classifier` therefore reads the JSON
first (plain data), refuses a pickle whose hash differs from the recorded one, or whose featx
version or weights differ, unless `force=True`, and warns before unpickling: load only files
you trust.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np

from featx import __version__
from featx.errors import FeatxError, UsageError

log = logging.getLogger("featx")

FORMAT = 1


def _sidecar(path: str) -> str:
    return os.path.splitext(path)[0] + ".json"


def _file_sha256(path: str) -> str:
    from featx.models import file_sha256

    return file_sha256(path)


def classifier_meta(codes_path: str, layers: list[str]) -> dict:
    """What a classifier trained on `layers` of a codes file needs at prediction time."""
    from featx.store import CodesFile

    with CodesFile(codes_path) as f:
        m = f.meta
        return {
            "featx_version": __version__, "format": FORMAT, "layers": list(layers), "model": m.model,
            "weights": m.weights, "weights_source": m.weights_source, "weights_ident": m.weights_ident,
            "weights_sha256": m.weights_sha256 or "", "pool": m.pool,
            "activations": {n: f.layer_meta(n).activation for n in layers},
            "dims": {n: f.dim(n) for n in layers}, "preprocessing": m.parsed("preprocessing", f.path),
            "precision": m.precision or "fp32", "classes": f.classes, "codes_file": os.path.abspath(codes_path),
            "cache_key": m.cache_key, "dataset": m.dataset,
        }  # fmt: skip


def save_classifier(path: str, pipeline, meta: dict) -> tuple[str, str]:
    """Write NAME.joblib and NAME.json (atomically each); returns both paths."""
    import joblib

    from featx.store import write_json_atomic

    path = os.path.abspath(path)
    if not path.endswith(".joblib"):
        raise UsageError(f"--out {path}: name the classifier file NAME.joblib")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        joblib.dump(pipeline, tmp)
        os.replace(tmp, path)
        meta = {**meta, "joblib_sha256": _file_sha256(path)}
        write_json_atomic(_sidecar(path), meta)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise FeatxError(f"--out {path}: cannot write the classifier ({e.strerror or e})") from None
    return path, _sidecar(path)


def read_meta(path: str) -> dict:
    side = _sidecar(path)
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such classifier file")
    try:
        with open(side, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise FeatxError(
            f"{path}: its metadata {side} is missing or unreadable ({e}); featx refuses to unpickle a classifier without it"
        ) from None
    need = (
        "featx_version",
        "layers",
        "model",
        "weights",
        "preprocessing",
        "classes",
        "joblib_sha256",
        "pool",
        "activations",
    )
    if not isinstance(meta, dict) or any(k not in meta for k in need):
        raise FeatxError(f"{side}: not a featx classifier description (keys {', '.join(need)} expected)")
    _validate(meta, side)
    return meta


def _validate(meta: dict, side: str) -> None:
    """The JSON is plain data from a file: check every field featx will use, by type and value."""
    from featx.preprocess import Preprocess
    from featx.taps import parse_pool

    def bad(field: str, want: str):
        raise FeatxError(f"{side}: field {field!r} must be {want}; refit the classifier with featx fit --out")

    for k in ("featx_version", "model", "weights", "joblib_sha256", "pool"):
        if not isinstance(meta[k], str) or not meta[k]:
            bad(k, "a non-empty string")
    for k in ("weights_sha256", "weights_ident", "weights_source", "precision"):
        if meta.get(k) is not None and not isinstance(meta[k], str):
            bad(k, "a string")
    layers, classes, acts = meta["layers"], meta["classes"], meta["activations"]
    if not isinstance(layers, list) or not layers or not all(isinstance(x, str) and x for x in layers):
        bad("layers", "a non-empty list of layer names")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(x, str) for x in classes):
        bad("classes", "a list of two or more class names")
    if not isinstance(acts, dict) or any(acts.get(n) not in ("relu", "relu6", "none") for n in layers):
        bad("activations", "relu, relu6 or none for every layer")
    if meta.get("precision") not in (None, "fp32", "bf16", "fp16"):
        bad("precision", "fp32, bf16 or fp16")
    try:
        parse_pool(meta["pool"])
        if not isinstance(meta["preprocessing"], dict):
            raise TypeError
        Preprocess.from_dict(meta["preprocessing"])
    except (FeatxError, KeyError, TypeError, ValueError):
        bad("pool/preprocessing", "what featx fit wrote")


def _same_release(a: str, b: str) -> bool:
    return a.split(".")[:2] == b.split(".")[:2]


def load_classifier(path: str, force: bool = False):
    """(pipeline, meta) of a saved classifier; see the module docstring for the checks."""
    import joblib

    meta = read_meta(path)
    if not force:
        digest = _file_sha256(path)
        if digest != meta["joblib_sha256"]:
            raise FeatxError(f"{path}: its sha256 does not match the one in {_sidecar(path)} (changed or corrupt); "
                             f"refusing to unpickle it (--force overrides)")  # fmt: skip
        if not _same_release(meta["featx_version"], __version__):
            raise FeatxError(f"{path} was made by featx {meta['featx_version']}, this is {__version__}; "
                             f"refit it, or pass --force to use it anyway")  # fmt: skip
    log.warning("loading %s: joblib files are pickles that can run code; load only files you trust", path)
    return joblib.load(path), meta


# -- images in -----------------------------------------------------------------------------------


def collect_images(inputs: list[str]) -> list[str]:
    """Files as given; folders searched recursively for images; a .csv gives its path column
    (featx.data.read_csv: the same reader as extract's manifests)."""
    from featx.data import IMAGE_EXTENSIONS, check_limits, read_image_list, walk_images

    check_limits()

    out: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = walk_images(item)
            if not found:
                raise UsageError(
                    f"{item}: no images in this folder (extensions {' '.join(IMAGE_EXTENSIONS)})"
                )
            out.extend(found)
        elif item.lower().endswith(".csv") and os.path.isfile(item):
            out.extend(read_image_list(item))
        elif os.path.exists(item):
            out.append(item)
        else:
            raise UsageError(f"{item}: no such image, folder or CSV")
    if not out:
        raise UsageError("give images, folders or a CSV of image paths to predict")
    return out


# -- the predictor -------------------------------------------------------------------------------


@dataclass
class Prediction:
    path: str
    label: str | None
    score: float | None
    top: list[tuple[str, float]]
    error: str | None = None

    def to_dict(self) -> dict:
        return {"path": self.path, "class": self.label, "score": self.score, "top": [[c, s] for c, s in self.top],
                "error": self.error}  # fmt: skip


class Predictor:
    """A loaded classifier plus the backbone that feeds it, checked against each other."""

    def __init__(self, path: str, *, weights: str | None = None, device: str = "auto", force: bool = False):
        from featx.engine import computer_for, resolve_device
        from featx.models import load_model, resolve_weights
        from featx.models import parse_model_name as parse
        from featx.plan import Plan

        self.pipeline, self.meta = load_classifier(path, force=force)
        meta = self.meta
        model = parse(meta["model"])
        spec = weights or meta["weights"]
        if meta.get("weights_source") == "file" and weights is None and not os.path.isfile(spec):
            raise FeatxError(
                f"{path} needs the weights file {spec}, which is gone; pass --weights PATH to its new place"
            )
        ref = resolve_weights(model, spec)
        backbone = load_model(meta["model"], weights_ref=ref)
        found_sha = backbone.weights.sha256 or ""
        want_sha = meta.get("weights_sha256") or ""
        mismatch = (want_sha and found_sha and want_sha != found_sha) or (
            not (want_sha and found_sha) and meta.get("weights_ident") != ref.ident
        )
        if mismatch and not force:
            raise FeatxError(
                f"{path} was trained on codes of {meta['model']} with weights {meta['weights']} "
                f"(sha256 {want_sha[:16] or meta.get('weights_ident')}), but the weights found differ "
                f"(sha256 {found_sha[:16] or ref.ident}); use the weights it was made for (--weights PATH) or refit it"
            )
        plan = Plan.from_meta(meta, backbone.module, weights_ref=ref)  # exactly what the codes file recorded
        self.preprocess = plan.preprocess
        missing = plan.missing_layers()
        if missing:
            raise FeatxError(
                f"{path}: layers {', '.join(missing)} are not in {meta['model']}; the classifier does not fit this model"
            )
        dim = sum(plan.dims)
        ids = getattr(self.pipeline, "classes_", None)
        if (
            getattr(self.pipeline, "n_features_in_", dim) != dim
            or ids is None
            or int(np.max(ids)) >= len(meta["classes"])
        ):
            raise FeatxError(
                f"{path}: the pipeline does not match its description (features or classes differ); refit it"
            )
        # the precision the training codes were computed at, on any device: the same codes
        self.computer = computer_for(
            plan, backbone.module, resolve_device(device), meta.get("precision") or "fp32"
        )
        self.classes = meta["classes"]

    def close(self) -> None:
        self.computer.close()

    def codes(self, images) -> np.ndarray:
        parts = self.computer(images)
        return np.hstack(parts) if len(parts) > 1 else parts[0]

    def predict(
        self, paths: list[str], top_k: int = 3, batch_size: int = 32, workers: int = 0
    ) -> list[Prediction]:
        from featx.data import FileLoader
        from featx.extraction import ImageSequence, make_loader

        out: list[Prediction] = []
        for index, images, bad, _done in make_loader(
            ImageSequence(FileLoader(paths, paths), len(paths), self.preprocess),
            batch_size,
            workers,
            pin_memory=False,
        ):
            results = {}
            if images is not None:
                X = self.codes(images)
                scores, probabilistic = self._scores(X)
                for row, i in enumerate(index):
                    order = np.argsort(-scores[row])[:top_k]
                    top = [(self.classes[int(self._class_ids[k])], float(scores[row, k])) for k in order]
                    results[int(i)] = Prediction(paths[i], top[0][0], top[0][1], top)
            for i, reason in bad:
                results[int(i)] = Prediction(paths[i], None, None, [], reason)
            out.extend(results[k] for k in sorted(results))
        return out

    @property
    def _class_ids(self) -> np.ndarray:
        return self.pipeline.classes_

    def _scores(self, X) -> tuple[np.ndarray, bool]:
        """Per class: probabilities when the classifier has them, else decision values."""
        if hasattr(self.pipeline, "predict_proba") and hasattr(self.pipeline[-1], "predict_proba"):
            try:
                return self.pipeline.predict_proba(X), True
            except AttributeError:  # e.g. SGD with hinge loss
                pass
        d = self.pipeline.decision_function(X)
        if d.ndim == 1:  # binary: one margin for the second class
            d = np.stack([-d, d], axis=1)
        return d, False
