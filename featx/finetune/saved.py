"""Writing the fine-tuned model file: state dict plus the description `featx predict` uses."""

from __future__ import annotations

import os

from featx import __version__
from featx.errors import FeatxError
from featx.finetune.checkpoints import tensors_bytes, write_file
from featx.finetune.settings import FinetuneSettings
from featx.models.saved import FORMAT, HEADER_KEY


def save_model(
    target: str, module, backbone, head: str, classes, settings: FinetuneSettings, results: dict
) -> str:
    """OUT.safetensors: the network's state dict (the layout `featx.models.build` loads: the new head
    in place of the old one) and, in the header, the description `featx predict` uses."""
    meta = {
        "format": FORMAT,
        "kind": "finetuned",
        "model": str(backbone.name),
        "weights": backbone.weights.spec,
        "weights_source": backbone.weights.source,
        "weights_ident": backbone.weights.ident,
        "weights_sha256": backbone.weights.sha256,
        "head": head,
        "classes": list(classes),
        "preprocessing": backbone.preprocess.to_dict(),
        "recipe": settings.to_dict(),
        "results": results,
        "featx_version": __version__,
    }
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        write_file(target, tensors_bytes(module.state_dict(), {HEADER_KEY: meta}))
    except OSError as e:
        raise FeatxError(f"--out {target}: cannot write the model ({e.strerror or e})") from None
    return target
