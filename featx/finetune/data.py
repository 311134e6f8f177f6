"""Fine-tune data: the same rows as `fit`, augmentation crops, batches and loaders."""

from __future__ import annotations

import logging
import math

import numpy as np

from featx.errors import FeatxError, UsageError
from featx.finetune.settings import MIN_VAL_PER_CLASS, FinetuneSettings

log = logging.getLogger("featx")


# augment -> (crop area scale, aspect ratio range, horizontal flip)
AUGMENT_PARAMS = {
    "default": ((0.08, 1.0), (3 / 4, 4 / 3), True),  # torchvision's RandomResizedCrop defaults + flip
    # small crops: at least 80% of the area, near-square, so a crop shifts and rescales by about 10%
    # and never cuts an object (a digit, a sign) away; no flip, which mirrors text and signs
    "light": ((0.8, 1.0), (0.9, 1 / 0.9), False),
}


class _RowsView:
    """A Dataset seen as `classify.select_rows` sees a codes file (same attributes), so a fine-tune
    picks exactly the training images, subsets and hold-out of a probe with the same seed."""

    def __init__(self, ds):
        self.path, self.split, self.labels = ds.spec, ds.splits, ds.labels
        self.classes, self.groups = ds.classes, ds.groups


def select_samples(ds, settings: FinetuneSettings):
    """`classify.Rows` for the dataset (train / val / test sample indices), checked for fine-tuning."""
    from featx.classifiers.protocol import Protocol, parse_train_size
    from featx.classifiers.rows import select_rows, subsample

    train = np.flatnonzero(ds.splits == "train")
    present = np.unique(ds.labels[train])
    if len(present) < 2:
        one = ds.classes[int(present[0])] if len(present) else "none"
        raise UsageError(
            f"--data {ds.spec}: the training images hold a single class ({one}); fine-tuning needs two or more"
        )
    protocol = Protocol(
        min_val_per_class=0, val_fraction=settings.val_fraction
    )  # a hold-out, as fit's default
    try:
        rows = select_rows(_RowsView(ds), protocol, parse_train_size(settings.train_size), settings.seed)
    except FeatxError as e:
        if "validate on" not in str(e):
            raise UsageError(str(e)) from None
        rows = None
    if rows is not None:
        counts = np.bincount(ds.labels[rows.val], minlength=len(ds.classes))[present]
    if rows is None or counts.min() < MIN_VAL_PER_CLASS:
        smallest = int(np.bincount(ds.labels[train])[present].min())
        raise UsageError(
            f"--data {ds.spec}: too few images per class for a validation split ({smallest} training "
            f"image(s) in the smallest class, --train-size {settings.train_size}); give every class at "
            f"least 2 training images, a val split, or a larger --train-size"
        )
    if settings.max_images is not None and settings.max_images < len(rows.train):
        size = parse_train_size(str(settings.max_images))
        rows.train = subsample(
            rows.train, ds.labels, size, np.random.default_rng([settings.seed, 1]), ds.classes
        )
    return rows


def crop_box(w: int, h: int, rng, scale=AUGMENT_PARAMS["default"][0], ratio=AUGMENT_PARAMS["default"][1]):
    """torchvision's RandomResizedCrop box (top, left, height, width), drawn from a numpy Generator."""
    area, lo, hi = w * h, math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(lo, hi))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    ratio, ratio_range = w / h, ratio
    if ratio < ratio_range[0]:
        cw, ch = w, int(round(w / ratio_range[0]))
    elif ratio > ratio_range[1]:
        cw, ch = int(round(h * ratio_range[1])), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class TrainImages:
    """Samples `rows` as (label, uint8 [3, S, S] or None): augmented (`augment` light or default)
    for (seed, epoch) when `epoch` is given (each image's crop and flip a function of seed, epoch
    and sample), else (or with `augment="none"`) the weights' eval transform."""

    def __init__(self, ds, rows, pre, seed: int, epoch: int | None = None, augment: str = "default"):
        self.ds, self.rows, self.pre, self.seed = ds, rows, pre, seed
        self.epoch, self.augment = (None, "none") if augment == "none" else (epoch, augment)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int):
        from featx.sources.decode import ImageError

        i = int(self.rows[k])
        try:
            image = self.ds.load(i)
            x = self.pre.to_uint8(image, self.ds.ids[i]) if self.epoch is None else self._augment(image, i)
        except ImageError as e:
            log.warning("skipped %s", e)
            x = None
        return int(self.ds.labels[i]), x

    def _augment(self, image, i: int):
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        from featx.sources.decode import check_size

        check_size(self.ds.ids[i], *image.size)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        scale, ratio, flip = AUGMENT_PARAMS[self.augment]
        top, left, h, w = crop_box(*image.size, rng, scale, ratio)
        size = self.pre.crop_size
        out = TF.resized_crop(
            image, top, left, h, w, [size, size], InterpolationMode(self.pre.interpolation), antialias=True
        )
        if flip and rng.random() < 0.5:
            out = TF.hflip(out)
        return TF.pil_to_tensor(out)


def _collate(items):
    import torch

    ok = [(y, x) for y, x in items if x is not None]
    if not ok:
        return None, None
    return torch.tensor([y for y, _ in ok]), torch.stack([x for _, x in ok])


def batch_positions(n: int, size: int) -> list[list[int]]:
    """Positions 0..n-1 in batches of `size`; a last batch of one joins the one before (batch norm
    cannot train on a single image)."""
    out = [list(range(s, min(n, s + size))) for s in range(0, n, size)]
    if len(out) > 1 and len(out[-1]) == 1:
        out[-2].extend(out.pop())
    return out


def batch_loader(images: TrainImages, batches, workers: int):
    import torch

    return torch.utils.data.DataLoader(
        images, batch_sampler=batches, num_workers=workers, collate_fn=_collate
    )
