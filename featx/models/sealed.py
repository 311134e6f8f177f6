"""Sealed safetensors files: tensors plus a JSON description, with a sha256 of both in the header.

Fine-tune checkpoints (`OUT.ckpt/epoch-NNNN.safetensors`) and fine-tuned models (`OUT.safetensors`)
are written with `seal` and read back with `read_sealed`, which refuses a file that is torn, not
safetensors, lacks its description, does not match its digest (`featx_sha256`: every tensor's
name, dtype, shape and bytes, then every other header entry), or holds NaN or Inf. The
description of a fine-tuned model is also schema-checked here (`finetuned_problem`), so that
`predict` and `extract --weights` refuse the same files with the same one line.

The digest finds damage (a flipped bit, a re-encoded tensor, an edited header), not forgery: anyone
can recompute a sha256. The schema checks keep a forged but consistent file from reaching code
that would misread it.
"""

from __future__ import annotations

import hashlib
import json
import math

from featx.errors import FeatxError
from featx.files import FINETUNED_KEY

DIGEST_KEY = "featx_sha256"
CHECKPOINT_KEY = "featx_checkpoint"
FINETUNED_FORMAT = 2  # 1: featx releases that wrote no digest (read, with a warning, unverified)
MAX_CLASSES = 1_000_000
MAX_NAME = 1000


class DamagedFile(FeatxError):
    """A sealed file that fails its checks (exit code 1); the message is one line naming the file."""


def digest(tensors: dict, header: dict[str, str]) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes; names sorted) and every header entry but the digest."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    for key in sorted(header):
        if key != DIGEST_KEY:
            h.update(f"{key}\0{header[key]}\0".encode())
    return h.hexdigest()


def seal(tensors: dict, header: dict) -> bytes:
    """The bytes of a safetensors file of `tensors` with `header` (values as JSON) and its digest."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in header.items()}
    meta[DIGEST_KEY] = digest(flat, meta)
    return save(flat, metadata=meta)


def read_header(path: str) -> dict[str, str] | None:
    """The string header of a safetensors file, or None when it is not one (unreadable, torn header)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 (a torn or foreign file raises whatever safetensors meets first)
        return None


def read_sealed(path: str, key: str, require_digest: bool = True) -> tuple[dict, dict]:
    """(tensors, description) of a sealed file; DamagedFile (one line) for anything but a whole,
    unaltered, finite file with a JSON object under `key`."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types for bad files)
        raise DamagedFile(f"{path}: not a whole safetensors file ({_first(e)})") from None
    if key not in header:
        raise DamagedFile(f"{path}: has no {key} description; it was not written by featx for this use")
    try:
        desc = json.loads(header[key])
    except ValueError:
        raise DamagedFile(f"{path}: its {key} description is not JSON") from None
    if not isinstance(desc, dict):
        raise DamagedFile(f"{path}: its {key} description is not a JSON object")
    if DIGEST_KEY in header:
        if header[DIGEST_KEY] != digest(tensors, header):
            raise DamagedFile(
                f"{path}: its tensors or description do not match its sha256 (a damaged or edited file)"
            )
    elif require_digest:
        raise DamagedFile(f"{path}: has no content digest ({DIGEST_KEY}); it was not written by this featx")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DamagedFile(f"{path}: tensor {name} holds NaN or Inf")
    return tensors, desc


def _first(e: BaseException) -> str:
    from featx.errors import first_line

    return first_line(e, 120)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _text(v, max_len: int = MAX_NAME) -> bool:
    return isinstance(v, str) and 0 < len(v) <= max_len


def preprocessing_problem(p) -> str | None:
    """What is wrong with a recorded `Preprocess.to_dict()`, or None."""
    from featx.models.preprocess import CROP_MODES, INTERPOLATIONS

    if not isinstance(p, dict):
        return f"preprocessing is {type(p).__name__}, not an object"
    for k in ("crop_size", "resize_size"):
        if not _is_int(p.get(k)) or not 8 <= p[k] <= 4096:
            return f"preprocessing {k} {p.get(k)!r} is not a whole number of pixels in 8..4096"
    if p["resize_size"] < p["crop_size"]:
        return "preprocessing resize_size is below crop_size"
    if p.get("interpolation") not in INTERPOLATIONS:
        return f"preprocessing interpolation {p.get('interpolation')!r} is not one of {', '.join(INTERPOLATIONS)}"
    if p.get("crop_mode") not in CROP_MODES:
        return f"preprocessing crop_mode {p.get('crop_mode')!r} is not one of {', '.join(CROP_MODES)}"
    for k, low, high in (("mean", -10.0, 10.0), ("std", 1e-6, 10.0)):
        v = p.get(k)
        if not isinstance(v, list) or len(v) != 3 or not all(_is_num(x) and low <= x <= high for x in v):
            return f"preprocessing {k} {str(v)[:60]} is not 3 numbers in {low:g}..{high:g}"
    return None


def finetuned_problem(meta: dict) -> str | None:
    """What is wrong with a fine-tuned model's description (types, lengths, ranges), or None."""
    fmt = meta.get("format", 1)
    if not _is_int(fmt) or fmt < 1:
        return f"format {fmt!r} is not a format number"
    if fmt > FINETUNED_FORMAT:
        return f"format {fmt} is newer than this featx reads ({FINETUNED_FORMAT}); upgrade featx"
    missing = [k for k in ("model", "classes", "preprocessing", "head", "featx_version") if k not in meta]
    if missing:
        return f"its description lacks {', '.join(missing)}"
    for k in ("model", "head", "featx_version"):
        if not _text(meta[k]):
            return f"{k} {str(meta[k])[:60]!r} is not a name"
    if meta.get("kind", "finetuned") != "finetuned":
        return f"kind {str(meta.get('kind'))[:60]!r} is not 'finetuned'"
    classes = meta["classes"]
    if (
        not isinstance(classes, list)
        or not 2 <= len(classes) <= MAX_CLASSES
        or not all(_text(c) for c in classes)
    ):
        return "classes is not a list of at least 2 class names"
    if len(set(classes)) != len(classes):
        return "classes holds a name twice"
    for k in ("weights", "weights_source", "weights_ident", "weights_sha256"):
        if meta.get(k) is not None and not isinstance(meta[k], str):
            return f"{k} {str(meta[k])[:60]!r} is not text"
    for k in ("recipe", "results"):
        if meta.get(k) is not None and not isinstance(meta[k], dict):
            return f"{k} is {type(meta[k]).__name__}, not an object"
    return preprocessing_problem(meta["preprocessing"])


_VERIFIED: dict[tuple, dict] = {}  # (path, size, mtime, inode) -> description: one verification per process


def check_finetuned_file(path: str) -> dict | None:
    """The verified description of a fine-tuned model file; None when `path` is not one (another
    safetensors file, or not safetensors at all); DamagedFile when it is one but fails a check."""
    import logging
    import os

    try:
        st = os.stat(path)
    except OSError:
        return None
    stamp = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if stamp in _VERIFIED:
        return _VERIFIED[stamp]
    header = read_header(path)
    if header is None or FINETUNED_KEY not in header:
        if header is None and _claims_finetuned(path):
            raise DamagedFile(
                f"{path}: a fine-tuned model file that is not whole (torn or damaged); fine-tune it again"
            )
        return None
    try:
        fmt = json.loads(header[FINETUNED_KEY]).get("format", 1)
    except (ValueError, AttributeError):
        fmt = None
    legacy = fmt == 1 and DIGEST_KEY not in header
    _tensors, meta = read_sealed(path, FINETUNED_KEY, require_digest=not legacy)
    problem = finetuned_problem(meta)
    if problem:
        raise DamagedFile(f"{path}: not a valid fine-tuned model ({problem}); fine-tune it again")
    if legacy:
        logging.getLogger("featx").warning(
            "%s: written by an older featx without a content digest; its tensors are "
            "not verified (fine-tune again to seal it)",
            path,
        )
    _VERIFIED[stamp] = meta
    return meta


def _claims_finetuned(path: str) -> bool:
    """Whether the first bytes of an unreadable file still name a fine-tuned model header."""
    try:
        with open(path, "rb") as f:
            return FINETUNED_KEY.encode() in f.read(1 << 16)
    except OSError:
        return False
