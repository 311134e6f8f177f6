"""Reading a fine-tuned model file (OUT.safetensors): its description and the module with its head.
"""

from __future__ import annotations

import json
import os

from featx.errors import FeatxError
from featx.files import FINETUNED_KEY

HEADER_KEY = FINETUNED_KEY


FORMAT = 1


def finetuned_description(path: str) -> dict | None:
    """The description of a fine-tuned model file, or None when `path` is not one."""
    from safetensors import safe_open

    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
    except Exception:  # noqa: BLE001 (not a safetensors file: the classifier loader says so)
        return None
    if HEADER_KEY not in header:
        return None
    try:
        meta = json.loads(header[HEADER_KEY])
    except ValueError as e:
        raise FeatxError(f"{path}: its fine-tuned model description is not JSON ({e})") from None
    missing = [k for k in ("model", "classes", "preprocessing", "head", "featx_version") if k not in meta]
    if missing:
        raise FeatxError(f"{path}: its description lacks {', '.join(missing)}; fine-tune it again")
    return meta


def load_finetuned(path: str):
    """(module in eval mode on the CPU, head TapInfo, Preprocess, description) of a saved fine-tuned model."""
    from featx.models.build import load_model
    from featx.models.preprocess import Preprocess
    from featx.models.taps import list_taps

    meta = finetuned_description(path)
    backbone = load_model(meta["model"], path)
    pre = Preprocess.from_dict(meta["preprocessing"])
    taps = {t.name: t for t in list_taps(backbone.module, pre.crop_size, device="cpu")}
    tap = taps.get(meta["head"])
    if tap is None or tap.shape != (len(meta["classes"]),):
        raise FeatxError(f"{path}: its head {meta['head']} does not give {len(meta['classes'])} class scores; fine-tune it again")
    return backbone.module, tap, pre, meta
