"""Built-in and array sources: scikit-learn digits, idx files (Fashion-MNIST), torchvision datasets."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from featx.errors import UsageError, first_line
from featx.sources.dataset import ArrayLoader, RawSource
from featx.sources.decode import (
    to_rgb,
)

_FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def digits_source() -> RawSource:
    from importlib.metadata import version

    from sklearn.datasets import load_digits

    d = load_digits()
    # 0..16 intensities -> 0..255
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return RawSource(
        name="digits",
        spec="sklearn:digits",
        classes=[str(c) for c in range(10)],
        ids=[f"digits/{i:04d}" for i in range(len(images))],
        labels=d.target.astype(np.int64),
        splits=None,
        loader=ArrayLoader(images),
        fingerprint=f"sklearn-digits:{version('scikit-learn')}",
        split_source="seeded",
    )


def idx_files(path: Path) -> dict[str, tuple[Path, Path]]:
    found = {}
    for split, (imgs, labs) in _IDX_FILES.items():
        pair = []
        for stem in (imgs, labs):
            cands = [path / stem, path / f"{stem}.gz"]
            hit = next((c for c in cands if c.is_file()), None)
            if hit is None:
                break
            pair.append(hit)
        if len(pair) == 2:
            found[split] = (pair[0], pair[1])
    return found


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte idx file")
        dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(dims)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise UsageError(f"--data {path}: not a readable idx file ({e})") from None


def idx_source(root: Path) -> RawSource:
    pairs = idx_files(root)
    images, labels, splits, ids = [], [], [], []
    h = hashlib.sha256()
    for split, (ipath, lpath) in pairs.items():
        im, lab = _read_idx(ipath), _read_idx(lpath)
        if im.ndim != 3 or lab.ndim != 1 or len(im) != len(lab):
            raise UsageError(
                f"--data {root}: {ipath.name} and {lpath.name} do not pair up (shapes {im.shape}, {lab.shape})"
            )
        images.append(im)
        labels.append(lab.astype(np.int64))
        splits += [split] * len(lab)
        ids += [f"{split}/{i:05d}" for i in range(len(lab))]
        h.update(hashlib.sha256(ipath.read_bytes()).digest() + hashlib.sha256(lpath.read_bytes()).digest())
    if not sum(len(x) for x in labels):
        raise UsageError(f"--data {root}: the idx label files hold no samples")
    # the classes are the label values present ({0, 255} is two classes, not 256)
    present, labels_all = np.unique(np.concatenate(labels), return_inverse=True)
    fashion = "fashion" in str(root).lower() and present.max() <= 9
    classes = [_FASHION_CLASSES[v] if fashion else str(v) for v in present.tolist()]
    notes = []
    if present.tolist() != list(range(len(present))):
        notes.append(f"{root}: the label files hold the values {_listing(present.tolist())}; each is a class")
    return RawSource(
        name="fashion-mnist" if fashion else root.name,
        spec=str(root),
        classes=classes,
        ids=ids,
        labels=labels_all.astype(np.int64),
        splits=np.array(splits, dtype="<U5"),
        loader=ArrayLoader(np.concatenate(images)),
        fingerprint=h.hexdigest(),
        split_source="files",
        notes=notes,
    )


class _TorchvisionLoader:
    def __init__(self, parts: list, offsets: list[int]):
        self.parts, self.offsets = parts, offsets

    def __call__(self, i: int):
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        image = self.parts[k][i - self.offsets[k]][0]
        return to_rgb(image)


def _listing(values: list, k: int = 8) -> str:
    return ", ".join(map(str, values[:k])) + (f", ... ({len(values)} in all)" if len(values) > k else "")


def torchvision_source(name: str, root: str | None) -> RawSource:
    import inspect

    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if cls is None or not inspect.isclass(cls):
        from featx.errors import closest

        names = [n for n in dir(tvd) if n[:1].isupper()]
        raise UsageError(
            f"--data torchvision:{name}: no such torchvision dataset; closest: {closest(name, names)}"
        )
    if not root:
        raise UsageError(
            f"--data torchvision:{name} needs --data-root DIR (where torchvision keeps or downloads it)"
        )
    params = inspect.signature(cls).parameters
    if "train" in params:
        variants = [("train", {"train": True}), ("test", {"train": False})]
    elif "split" in params:
        variants = [(s, {"split": s}) for s in ("train", "val", "test")]
    else:
        raise UsageError(f"--data torchvision:{name}: featx reads datasets with a train= or split= argument")
    parts, splits, labels, ids, offsets = [], [], [], [], []
    classes = None
    for split, kw in variants:
        try:
            ds = cls(root, download=True, **kw) if "download" in params else cls(root, **kw)
        except ValueError:  # this dataset has no such split
            continue
        except (OSError, RuntimeError) as e:
            raise UsageError(
                f"--data torchvision:{name}: cannot load split {split!r} under {root} ({first_line(e)}); "
                f"torchvision downloads it there when online"
            ) from None
        targets = getattr(ds, "targets", None)
        if targets is None:
            targets = getattr(ds, "_labels", None)
        if targets is None:
            targets = [ds[i][1] for i in range(len(ds))]
        offsets.append(len(ids))
        parts.append(ds)
        t = np.asarray(targets, dtype=np.int64)
        labels.append(t)
        splits += [split] * len(t)
        ids += [f"{split}/{i:06d}" for i in range(len(t))]
        classes = classes or list(getattr(ds, "classes", []) or [])
    if not parts:
        raise UsageError(f"--data torchvision:{name}: no split could be loaded from {root}")
    labels_all = np.concatenate(labels)
    if not classes or len(classes) <= int(labels_all.max()):
        classes = [str(c) for c in range(int(labels_all.max()) + 1)]
    from importlib.metadata import version

    fp = hashlib.sha256(f"torchvision:{name}:{version('torchvision')}:{os.path.abspath(root)}".encode())
    fp.update(labels_all.tobytes())
    return RawSource(
        name=name.lower(),
        spec=f"torchvision:{name}",
        classes=[str(c) for c in classes],
        ids=ids,
        labels=labels_all,
        splits=np.array(splits, dtype="<U5"),
        loader=_TorchvisionLoader(parts, offsets),
        fingerprint=fp.hexdigest(),
        split_source="files",
    )
