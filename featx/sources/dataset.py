"""A `Dataset`: image ids, labels, splits and a loader; what every source yields after cutting."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from featx.sources.decode import (
    decode_image,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    """Samples in a fixed order; row i of an extraction is sample i unless it was skipped."""

    name: str  # short name for cache file names
    spec: str  # normalized spec: an absolute path or 'sklearn:digits'
    classes: list[str]
    ids: list[str]  # printable, stable per-sample ids (relative paths, 'train/00012')
    labels: np.ndarray  # int64 [N]
    splits: np.ndarray  # str [N], each of SPLITS
    loader: object  # callable(i) -> PIL.Image in RGB; raises ImageError
    fingerprint: str  # changes when the samples, labels or files change
    split_source: str  # 'folders' | 'manifest' | 'files' | 'seeded'
    notes: list[str] = field(default_factory=list)
    uncapped_train: int | None = None  # training images before --per-class-limit removed some
    groups: np.ndarray | None = None  # str [N]: subjects/patients/...; never on both sides of a split
    labelled: bool = True  # False: no labels in the source; classes [""], every label 0 (see `unlabelled`)

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int):
        return self.loader(i)

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for s in SPLITS:
            mask = self.splits == s
            if mask.any():
                binc = np.bincount(self.labels[mask], minlength=len(self.classes))
                out[s] = {c: int(n) for c, n in zip(self.classes, binc)}
        return out


@dataclass
class RawSource:
    name: str
    spec: str
    classes: list[str]
    ids: list[str]
    labels: np.ndarray
    splits: np.ndarray | None  # None: no splits in the source
    loader: object
    fingerprint: str
    split_source: str
    notes: list[str] = field(default_factory=list)
    groups: np.ndarray | None = None  # str [N]: a seeded split keeps each group on one side
    labelled: bool = True


# Unlabelled data (a flat folder of images, an image list, a CSV or shards without labels) is one
# class named "" with every label 0, and the file attribute `labelled` False: every reader of
# labels, classes and counts keeps working, and label-based commands refuse it in one line.
UNLABELLED_CLASSES = [""]


def unlabelled(n: int) -> tuple[list[str], np.ndarray]:
    """(classes, labels) of `n` unlabelled samples."""
    return list(UNLABELLED_CLASSES), np.zeros(n, dtype=np.int64)


class Subset:
    def __init__(self, loader, index: np.ndarray):
        self.loader, self.index = loader, index

    def __call__(self, i: int):
        return self.loader(int(self.index[i]))


class FileLoader:
    """Image files by index as RGB PIL images; `ids` name them in errors."""

    def __init__(self, paths: list[str], ids: list[str]):
        self.paths, self.ids = paths, ids

    def __call__(self, i: int):
        return decode_image(self.paths[i], self.ids[i])


class ArrayLoader:
    """Grayscale uint8 images in memory [N, H, W]."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __call__(self, i: int):
        from PIL import Image

        return Image.fromarray(self.images[i], "L").convert("RGB")
