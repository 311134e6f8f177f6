"""The model-input transform: image geometry on the CPU, normalization on the device.

`Preprocess` is the exact, recordable description of what torchvision's weight transforms
(`ImageClassification`) and timm's data config do: resize (shorter side, or both sides for
`squash`), centre crop, scale to [0, 1], normalize. It is split in two so that data-loader workers
ship compact uint8 tensors and the float work runs batched on the device:

- `Preprocess.to_uint8(pil_image)`: resize + crop with PIL (bit-identical to torchvision's
  transforms on PIL images), returning a CHW uint8 tensor;
- `Preprocess.normalize(batch)`: uint8 NCHW batch -> normalized float tensor, on any device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from featx.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash")


@dataclass(frozen=True)
class Preprocess:
    """Resize to `resize_size` (shorter side; both sides for crop_mode 'squash'), centre crop
    `crop_size`, scale to [0, 1], normalize with `mean`/`std`."""

    crop_size: int
    resize_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise UsageError(
                f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}"
            )
        if self.crop_mode not in CROP_MODES:
            raise UsageError(f"crop mode {self.crop_mode!r} is not one of {', '.join(CROP_MODES)}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def crop_pct(self) -> float:
        return self.crop_size / self.resize_size

    def with_overrides(self, image_size: int | None = None, crop_pct: float | None = None) -> Preprocess:
        """The same transform at another input size and/or crop fraction (timm's `crop_pct`)."""
        if image_size is None and crop_pct is None:
            return self
        if image_size is not None and not 8 <= image_size <= 4096:
            raise UsageError(f"--image-size {image_size} is out of range; use 8..4096 pixels")
        if crop_pct is not None and not 0.1 <= crop_pct <= 1.0:
            raise UsageError(f"--crop-pct {crop_pct} is out of range; use a fraction in 0.1..1.0")
        crop = image_size if image_size is not None else self.crop_size
        pct = crop_pct if crop_pct is not None else self.crop_pct
        # round, not floor: 224 / (224 / 256) must give back 256 despite float error
        return replace(self, crop_size=crop, resize_size=max(crop, int(round(crop / pct))))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(
            **{k: d[k] for k in ("crop_size", "resize_size", "interpolation", "mean", "std", "crop_mode")}
        )

    def __str__(self) -> str:
        side = "both sides" if self.crop_mode == "squash" else "shorter side"
        return (
            f"resize {side} to {self.resize_size} ({self.interpolation}, antialias) -> "
            f"center crop {self.crop_size} -> scale to [0,1] -> "
            f"normalize(mean={list(self.mean)}, std={list(self.std)})"
        )

    # -- the two halves of the transform -------------------------------------------------------

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of a width x height image after the resize step (torchvision's rule:
        the shorter side becomes resize_size, the longer one keeps the aspect ratio, truncated)."""
        r = self.resize_size
        if self.crop_mode == "squash":
            return r, r
        short, long = min(width, height), max(width, height)
        other = int(r * long / short) if short else 0
        return (r, other) if width <= height else (other, r)

    def to_uint8(self, image, ident: str = "image"):
        """PIL RGB image -> uint8 tensor [3, crop, crop] (resize and crop only). An image whose
        size, aspect ratio or resized size is over featx's limits raises ImageError(ident, reason)
        before anything is allocated (a 300,000 x 1 image resized to a shorter side of 256 would be
        59 GB)."""
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        from featx.sources.decode import check_size

        check_size(ident, *image.size, resized=self.resized_size(*image.size))
        mode = InterpolationMode(self.interpolation)
        size = [self.resize_size, self.resize_size] if self.crop_mode == "squash" else [self.resize_size]
        image = TF.resize(image, size, interpolation=mode, antialias=True)
        image = TF.center_crop(image, [self.crop_size])
        return TF.pil_to_tensor(image)

    def normalize(self, batch, dtype=None):
        """uint8 [N, 3, H, W] -> float [N, 3, H, W] on batch's device, keeping its memory format:
        (x / 255 - mean) / std, computed as (x - 255 mean) * (1 / (255 std)) in three passes
        (torchvision's four-pass order agrees within 1e-6)."""
        import torch

        x = batch.to(torch.float32)
        shift = torch.tensor([255.0 * m for m in self.mean], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], dtype=x.dtype, device=x.device).view(
            1, 3, 1, 1
        )
        x = x.sub_(shift).mul_(scale)
        return x if dtype is None else x.to(dtype)


def timm_preprocess(cfg: dict) -> Preprocess:
    """Preprocess from a timm data config (`timm.data.resolve_model_data_config`)."""
    size = int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    mode = cfg.get("crop_mode") or "center"
    interp = cfg.get("interpolation") or "bicubic"
    if interp not in INTERPOLATIONS:  # timm's 'random' and friends are for training
        interp = "bicubic"
    return Preprocess(
        crop_size=size,
        resize_size=int(math.floor(size / crop_pct)),
        interpolation=interp,
        mean=tuple(cfg.get("mean") or IMAGENET_MEAN),
        std=tuple(cfg.get("std") or IMAGENET_STD),
        crop_mode="squash" if mode == "squash" else "center",
    )
