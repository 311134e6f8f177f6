"""Reading a fine-tuned model file (OUT.safetensors): its verified description and the module with its head.

The file is sealed (`featx.models.sealed`): its digest, finite tensors and the description's schema are
checked before anything is built from it, so a damaged file is refused in one line.
"""

from __future__ import annotations

import os

from featx.errors import FeatxError
from featx.models.sealed import FINETUNED_FORMAT, FINETUNED_KEY, check_finetuned_file

HEADER_KEY = FINETUNED_KEY
FORMAT = FINETUNED_FORMAT


def finetuned_description(path: str) -> dict | None:
    """The verified description of a fine-tuned model file, or None when `path` is not one."""
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return None
    return check_finetuned_file(path)


def load_finetuned(path: str):
    """(module in eval mode on the CPU, head TapInfo, Preprocess, description) of a saved fine-tuned model."""
    from featx.models.build import load_model
    from featx.models.preprocess import Preprocess
    from featx.models.taps import list_taps

    meta = finetuned_description(path)
    if meta is None:
        raise FeatxError(f"{path}: not a fine-tuned model file (featx finetune --out writes one)")
    backbone = load_model(meta["model"], path)
    pre = Preprocess.from_dict(meta["preprocessing"])
    taps = {t.name: t for t in list_taps(backbone.module, pre.crop_size, device="cpu")}
    tap = taps.get(meta["head"])
    if tap is None or tap.shape != (len(meta["classes"]),):
        raise FeatxError(
            f"{path}: its head {meta['head']} does not give {len(meta['classes'])} class scores; fine-tune it again"
        )
    return backbone.module, tap, pre, meta
