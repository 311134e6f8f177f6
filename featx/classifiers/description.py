"""A classifier file's name and description: paths, the codes and backbone it was fitted on, schema checks."""

from __future__ import annotations

import hashlib
import logging
import math
import os

from featx import __version__
from featx.errors import FeatxError, UsageError, first_line
from featx.files import CLASSIFIER_KEY

log = logging.getLogger("featx")


FORMAT = 2  # 1: the joblib + JSON pair of featx 0.1.0


HEADER_KEY = CLASSIFIER_KEY


SUFFIX = ".safetensors"


def classifier_path(name: str, option: str = "--out") -> str:
    """Where `save_classifier(name)` writes: NAME.safetensors (NAME.joblib, the 0.1.0 spelling,
    and NAME.safetensors name the same file)."""
    name = os.fspath(name) if isinstance(name, os.PathLike) else name
    if not name or name.endswith(os.sep) or os.path.isdir(name):
        raise UsageError(
            f"{option} {name!r}: give a file name, e.g. models/flowers (writes models/flowers{SUFFIX})"
        )
    stem, ext = os.path.splitext(name)
    if ext not in ("", SUFFIX, ".joblib"):  # m.pkl, r.json: most likely not meant as a classifier name
        raise UsageError(
            f"{option} {name}: name the classifier NAME or NAME{SUFFIX} (NAME.joblib is accepted too)"
        )
    return os.path.abspath(stem + SUFFIX)


def export_paths(path: str) -> tuple[str, str]:
    """The joblib export's two files: PATH.joblib and PATH.json."""
    if not path or os.path.isdir(path):
        raise UsageError(f"--export-joblib {path!r}: give a file name, e.g. models/flowers.joblib")
    stem, ext = os.path.splitext(path)
    if ext not in ("", ".joblib"):
        raise UsageError(f"--export-joblib {path}: name the export PATH.joblib")
    return os.path.abspath(stem + ".joblib"), os.path.abspath(stem + ".json")


def locate(path: str, trust_pickle: bool = False) -> tuple[str, str]:
    """('arrays', FILE) or ('pickle', FILE.joblib) for what `featx predict PATH` means.

    The pickle-free file wins when both exist, unless `trust_pickle` and PATH names the .joblib.
    """
    stem = path
    for ext in (SUFFIX, ".joblib"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    arrays, pickled = stem + SUFFIX, stem + ".joblib"
    if path.endswith(SUFFIX):
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no such classifier file")
        return "arrays", path
    if trust_pickle and path.endswith(".joblib") and os.path.isfile(path):
        return "pickle", path
    if os.path.isfile(arrays):
        return "arrays", arrays
    if os.path.isfile(pickled) and not os.path.isdir(path):
        return "pickle", pickled
    raise UsageError(f"{path}: no such classifier file (featx fit --out NAME writes NAME{SUFFIX})")


def describe(codes_path: str, layers: list[str]) -> dict:
    """What a classifier trained on `layers` of a codes file needs at prediction time."""
    from featx.store.codes import CodesFile

    with CodesFile(codes_path) as f:
        m = f.meta  # the typed root attributes (featx.store.meta.FileMeta)
        meta = {
            "featx_version": __version__,
            "format": FORMAT,
            "layers": list(layers),
            "model": m.model,
            "weights": m.weights,
            "weights_source": m.weights_source,
            "weights_ident": m.weights_ident,
            "weights_sha256": m.weights_sha256 or "",
            "pool": m.pool,
            "activations": {n: f.layer_meta(n).activation for n in layers},
            "dims": {n: f.dim(n) for n in layers},
            "preprocessing": m.parsed("preprocessing", f.path),
            "precision": m.precision or "fp32",
            "classes": f.classes,
            "codes_file": os.path.abspath(codes_path),
            "cache_key": m.cache_key,
            "dataset": m.dataset,
        }
    meta["backbone"] = _backbone_of(meta)
    return meta


def _backbone_of(meta: dict) -> dict | None:
    """The identity of the backbone the codes came from, rebuilt as `predict` will build it; None
    (with a warning) when it cannot be loaded here, e.g. a weights file that is gone."""
    from featx.models.build import load_recorded

    try:
        return backbone_identity(load_recorded(meta).module)
    except (FeatxError, OSError) as e:  # OSError: e.g. hub weights that are not cached, offline
        log.warning(
            "cannot load %s to record its identity (%s); predict will check the weights by name only",
            meta["model"],
            first_line(e),
        )
        return None


def backbone_identity(module) -> dict:
    """Tensor count, a hash of tensor names and shapes (the architecture) and one of their values."""
    import torch

    shapes, values = hashlib.sha256(), hashlib.sha256()
    state = module.state_dict()
    for name, t in state.items():
        line = f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode()
        shapes.update(line)
        values.update(line)
        t = t.detach().to("cpu").contiguous().reshape(-1)  # 1-D: a 0-d tensor cannot be viewed as bytes
        values.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {"tensors": len(state), "shapes_sha256": shapes.hexdigest(), "state_sha256": values.hexdigest()}


def check_backbone(path: str, meta: dict, module, force: bool = False) -> None:
    """Refuse a backbone that is not the one the classifier was trained on: another architecture
    always (its codes mean something else, even with the same widths), other weights unless forced."""
    want = meta.get("backbone")
    if not want:
        return  # featx 0.1.0 files: the weights checks by name and sha256 are all there is
    found = backbone_identity(module)
    if found["shapes_sha256"] != want["shapes_sha256"]:
        raise FeatxError(
            f"{path}: {meta['model']} has {found['tensors']} tensors of other names or shapes than the network the "
            f"classifier was trained on ({want['tensors']} tensors); its description was edited or names another "
            f"model; refit the classifier"
        )
    if found["state_sha256"] != want["state_sha256"] and not force:
        raise FeatxError(
            f"{path}: the weights of {meta['model']} found here ({meta['weights']}) differ from those the classifier "
            f"was trained on (state sha256 {found['state_sha256'][:16]} != {want['state_sha256'][:16]}); use the "
            f"weights it was made for (--weights PATH), refit it, or pass --force"
        )


def _is_str(v) -> bool:
    return isinstance(v, str) and bool(v)


def is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_size(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_count(v) -> bool:  # the pixels baseline's module holds no tensors
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _three(v, positive: bool = False) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(is_num(x) and (x > 0 or not positive) for x in v)


# field -> (check, what it must be); the checks read nothing but the value
_SCHEMA = {
    "featx_version": (_is_str, "a non-empty string"),
    "model": (_is_str, "a non-empty string"),
    "weights": (_is_str, "a non-empty string"),
    "pool": (_is_str, "a non-empty string"),
    "layers": (
        lambda v: isinstance(v, list) and bool(v) and all(_is_str(x) for x in v),
        "a list of layer names",
    ),
    "classes": (
        lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(x, str) for x in v),
        "a list of two or more class names",
    ),
    "activations": (lambda v: isinstance(v, dict), "relu, relu6 or none for every layer"),
    "preprocessing": (lambda v: isinstance(v, dict), "what featx fit wrote"),
}


_OPTIONAL = {
    "weights_sha256": (lambda v: isinstance(v, str), "a string"),
    "weights_ident": (lambda v: isinstance(v, str), "a string"),
    "weights_source": (lambda v: isinstance(v, str), "a string"),
    "precision": (lambda v: v in ("fp32", "bf16", "fp16"), "fp32, bf16 or fp16"),
    "dims": (lambda v: isinstance(v, dict) and all(is_size(x) for x in v.values()), "layer widths"),
    "backbone": (
        lambda v: (
            isinstance(v, dict)
            and _is_count(v.get("tensors"))
            and _is_str(v.get("shapes_sha256"))
            and _is_str(v.get("state_sha256"))
        ),
        "tensors, shapes_sha256 and state_sha256",
    ),
    "pipeline": (
        lambda v: isinstance(v, list) and bool(v) and all(isinstance(s, dict) for s in v),
        "a list of steps",
    ),
    "arrays_sha256": (_is_str, "a sha256"),
    "joblib_sha256": (_is_str, "a sha256"),
    # a k-NN probe's chosen k and T (fit --out); its step holds them too, checked against its arrays
    "k": (is_size, "a positive whole number (the k-NN probe's k)"),
    "temperature": (lambda v: is_num(v) and v > 0, "a positive number (the k-NN probe's T)"),
}


def validate_description(meta, where: str, need: tuple[str, ...] = ()) -> dict:
    """Check a description (plain data from a file) field by field before any of it is used."""
    from featx.models.preprocess import Preprocess
    from featx.settings import parse_pool

    def bad(field: str, want: str):
        raise FeatxError(
            f"{where}: field {field!r} must be {want}; refit the classifier with featx fit --out"
        )

    if not isinstance(meta, dict):
        raise FeatxError(f"{where}: not a featx classifier description (a JSON object expected)")
    missing = [k for k in (*_SCHEMA, *need) if k not in meta]
    if missing:
        raise FeatxError(f"{where}: not a featx classifier description (missing {', '.join(missing)})")
    for k, (ok, want) in _SCHEMA.items():
        if not ok(meta[k]):
            bad(k, want)
    for k, (ok, want) in _OPTIONAL.items():
        if meta.get(k) is not None and not ok(meta[k]):
            bad(k, want)
    if any(meta["activations"].get(n) not in ("relu", "relu6", "none") for n in meta["layers"]):
        bad("activations", "relu, relu6 or none for every layer")
    pre = meta["preprocessing"]
    if not (_three(pre.get("mean")) and _three(pre.get("std"), positive=True)):
        bad("preprocessing", "what featx fit wrote (mean and std: 3 finite numbers each, std > 0)")
    if not (is_size(pre.get("crop_size")) and is_size(pre.get("resize_size"))):
        bad("preprocessing", "what featx fit wrote (crop_size and resize_size: positive integers)")
    if meta.get("dims") is not None and sorted(meta["dims"]) != sorted(set(meta["layers"])):
        bad("dims", "the width of every layer in 'layers'")
    try:
        parse_pool(meta["pool"])
        Preprocess.from_dict(pre)
    except (FeatxError, KeyError, TypeError, ValueError):
        bad("pool/preprocessing", "what featx fit wrote")
    return meta
