"""Data sources -> a `Dataset`: class names, and per sample an id, a label, a split and a way to
load the image as RGB.

`--data` specs
  DIR               ImageFolder layout `DIR/CLASS/image`; top-level `train/`, `val/`, `test/` folders
                    (also training, valid, validation, testing) become splits: `DIR/train/CLASS/image`
  FILE.csv          a manifest `path,label[,split]` (header optional; relative paths are relative
                    to the CSV's folder)
  sklearn:digits    scikit-learn's bundled 8x8 digits (1,797 images)
  DIR of idx files  MNIST-format idx files (`train-images-idx3-ubyte[.gz]`, `t10k-...`), e.g.
                    Fashion-MNIST from Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist)
  torchvision:NAME  a torchvision dataset class (CIFAR10, FashionMNIST, Flowers102, ...), kept under
                    `data_root` and downloaded there by torchvision when missing (needs internet)

Sources without splits get a seeded, stratified train/test split (`test_fraction`). A
`per_class_limit` keeps at most K images per class and split (an int, or {split: K}), chosen with
`seed`. Images are decoded with EXIF orientation applied and converted to RGB (grayscale,
palette, CMYK, RGBA by dropping alpha like torchvision's loader, 16-bit scaled to 8-bit);
animated images give their first frame. A file that cannot be decoded raises `ImageError` with its
path and the reason; the extractor skips and lists it.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import logging
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.errors import UsageError

log = logging.getLogger("featx")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}  # fmt: skip
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


class ImageError(Exception):
    """An image that cannot be decoded; `str()` is 'path: reason'."""

    def __init__(self, ident: str, reason: str):
        super().__init__(f"{ident}: {reason}")
        self.ident, self.reason = ident, reason


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


@dataclass(frozen=True)
class DataOptions:
    """How to cut a source into the samples of one extraction."""

    test_fraction: float = 0.2
    per_class_limit: int | dict[str, int] | None = None
    seed: int = 0
    data_root: str | None = None

    def to_dict(self) -> dict:
        return {
            "test_fraction": self.test_fraction,
            "per_class_limit": self.per_class_limit,
            "seed": self.seed,
            "data_root": self.data_root,
        }


def parse_per_class_limit(text: str | int | None) -> int | dict[str, int] | None:
    """'200' -> 200; 'train=200,test=100' -> {'train': 200, 'test': 100}."""
    if text is None or isinstance(text, int):
        if isinstance(text, int) and text < 1:
            raise UsageError(f"--per-class-limit {text}: must be a positive integer")
        return text
    text = str(text).strip()
    try:
        if "=" not in text:
            k = int(text)
            if k < 1:
                raise ValueError
            return k
        out = {}
        for part in text.split(","):
            split, _, k = part.partition("=")
            split = _SPLIT_ALIASES.get(split.strip().lower())
            if split is None or int(k) < 1:
                raise ValueError
            out[split] = int(k)
        return out
    except ValueError:
        raise UsageError(
            f"--per-class-limit {text!r}: use a positive integer K, or per split: train=200,test=100"
        ) from None


# -- opening -------------------------------------------------------------------------------------


def open_source(spec: str, options: DataOptions | None = None) -> Dataset:
    """List the samples of `spec` (see the module docstring) and cut them per `options`."""
    opts = options or DataOptions()
    if not isinstance(opts.seed, int) or opts.seed < 0:
        raise UsageError(f"--seed {opts.seed}: must be a non-negative integer")
    if not 0.0 < opts.test_fraction < 1.0:
        raise UsageError(f"--test-fraction {opts.test_fraction}: must be between 0 and 1 (exclusive)")
    spec = (spec or "").strip()
    if not spec:
        raise UsageError(
            "--data is empty; give an image folder, a CSV manifest, sklearn:digits or torchvision:NAME"
        )
    if spec == "sklearn:digits":
        raw = _digits()
    elif spec.startswith("sklearn:"):
        raise UsageError(f"--data {spec}: the bundled scikit-learn source is sklearn:digits")
    elif spec.startswith("torchvision:"):
        raw = _torchvision(spec[len("torchvision:") :], opts.data_root)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise UsageError(f"--data {spec}: no such file or folder")
        if path.is_file():
            if path.suffix.lower() != ".csv":
                raise UsageError(
                    f"--data {spec}: a file must be a CSV manifest (path,label[,split]) ending in .csv"
                )
            raw = _manifest(path.resolve())
        elif _idx_files(path):
            raw = _idx(path.resolve())
        else:
            raw = _folder(path.resolve())
    return _cut(raw, opts)


@dataclass
class _Raw:
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


def _cut(raw: _Raw, opts: DataOptions) -> Dataset:
    """Per-class limit and, for sources without splits, a seeded stratified train/test split.

    A single K limits each class (in each split of a source that has splits) before a seeded
    split; a per-split limit ({'train': K1, 'test': K2}) on a source without splits applies after
    the seeded split."""
    n = len(raw.ids)
    rng = np.random.default_rng(opts.seed)
    limit = opts.per_class_limit
    splits_all = raw.splits
    if splits_all is None and isinstance(limit, dict):
        splits_all = _seeded_split(raw.labels, opts.test_fraction, rng)
    keep = np.ones(n, dtype=bool)
    if limit is not None:
        groups = splits_all if splits_all is not None else np.full(n, "all")
        for g in sorted(set(groups.tolist())):
            k = limit if isinstance(limit, int) else limit.get(g)
            if k is None:
                continue
            for c in range(len(raw.classes)):
                idx = np.flatnonzero((groups == g) & (raw.labels == c))
                if len(idx) > k:
                    keep[np.setdiff1d(idx, rng.choice(idx, size=k, replace=False))] = False
    sel = np.flatnonzero(keep)
    labels = raw.labels[sel]
    splits = splits_all[sel] if splits_all is not None else _seeded_split(labels, opts.test_fraction, rng)
    split_source = raw.split_source if raw.splits is not None else "seeded"
    ids = [raw.ids[i] for i in sel]
    loader = raw.loader if len(sel) == n else _Subset(raw.loader, sel)
    h = hashlib.sha256(raw.fingerprint.encode())
    seeded = limit or raw.splits is None
    h.update(
        repr(
            (opts.test_fraction if raw.splits is None else None, limit, opts.seed if seeded else None)
        ).encode()
    )
    h.update(np.ascontiguousarray(sel, dtype=np.int64).tobytes())
    h.update("\n".join(splits.tolist()).encode())
    return Dataset(
        name=raw.name, spec=raw.spec, classes=raw.classes, ids=ids, labels=labels.astype(np.int64),
        splits=splits.astype("<U5"), loader=loader, fingerprint=h.hexdigest(), split_source=split_source,
        notes=raw.notes,
    )  # fmt: skip


def _seeded_split(labels: np.ndarray, test_fraction: float, rng) -> np.ndarray:
    return np.where(stratified_holdout(labels, test_fraction, rng), "test", "train").astype("<U5")


def stratified_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask holding out round(fraction * n) of each class, at least one and never all
    of a class with two or more members (classes in sorted order, so a seed fixes the result)."""
    out = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(len(idx) * fraction))
        k = min(max(k, 1), len(idx) - 1) if len(idx) >= 2 else 0
        out[rng.permutation(idx)[:k]] = True
    return out


class _Subset:
    def __init__(self, loader, index: np.ndarray):
        self.loader, self.index = loader, index

    def __call__(self, i: int):
        return self.loader(int(self.index[i]))


# -- image folders and manifests -----------------------------------------------------------------


def _printable(path: str) -> str:
    """A str that always encodes to UTF-8 (non-UTF-8 file names keep their bytes as \\x escapes)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def walk_images(top: str, fence: str | None = None, notes: list[str] | None = None) -> list[str]:
    """Image files under `top`, sorted. Symlinks are followed but never loop; with `fence`
    (the dataset root), a symlinked folder that leads back inside the dataset but out of `top`
    is skipped (it would label another class's images as this one's) and noted."""
    found: list[str] = []
    top_real = os.path.realpath(top)
    fence_real = os.path.realpath(fence) if fence else None
    seen: set[str] = set()
    for root, dirs, files in os.walk(top, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        keep = []
        for d in sorted(dirs):
            if d.startswith("."):
                continue
            target = os.path.realpath(os.path.join(root, d))
            inside_top = target == top_real or target.startswith(top_real + os.sep)
            inside_fence = fence_real is not None and (
                target == fence_real or target.startswith(fence_real + os.sep)
            )
            escapes_up = top_real.startswith(target + os.sep)
            if not inside_top and (inside_fence or escapes_up):
                if notes is not None:
                    notes.append(
                        f"{_printable(os.path.join(root, d))}: a link out of its class folder; skipped"
                    )
                continue
            keep.append(d)
        dirs[:] = keep
        for f in files:
            path = os.path.join(root, f)
            # non-regular files (FIFOs, dangling or looping links) are listed: decoding skips them with a reason
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS) and not os.path.isdir(path):
                found.append(path)
    return sorted(found)


def _stat_key(path: str) -> bytes:
    try:
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}".encode()
    except OSError:
        return b"missing"


def _subdirs(path: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise UsageError(f"--data {path}: cannot list folder ({e.strerror})") from None


def _folder(root: Path) -> _Raw:
    top = _subdirs(str(root))
    split_dirs = [d for d in top if d.lower() in _SPLIT_ALIASES]
    notes = []
    if split_dirs:
        ignored = [d for d in top if d not in split_dirs]
        if ignored:
            notes.append(
                f"{root}: folders {', '.join(ignored)} are not split folders (train/val/test) and were ignored"
            )
        layout = [(_SPLIT_ALIASES[d.lower()], os.path.join(str(root), d)) for d in split_dirs]
        if len({s for s, _ in layout}) != len(layout):
            raise UsageError(f"--data {root}: two folders name the same split ({', '.join(split_dirs)})")
    else:
        layout = [(None, str(root))]
    files: list[tuple[str | None, str, str]] = []  # (split, class, path)
    class_dirs: set[str] = set()
    for split, base in layout:
        for cls in _subdirs(base):
            class_dirs.add(cls)
            files.extend((split, cls, p) for p in walk_images(os.path.join(base, cls), str(root), notes))
    if not files:
        where = f"{root}/CLASS/image or {root}/train/CLASS/image"
        raise UsageError(
            f"--data {root}: no images found (expected {where}; extensions {' '.join(IMAGE_EXTENSIONS)})"
        )
    classes = sorted({c for _, c, _ in files})
    empty = sorted(class_dirs - set(classes))
    if empty:
        notes.append(f"{root}: class folders without images were ignored: {', '.join(empty)}")
    index = {c: i for i, c in enumerate(classes)}
    h = hashlib.sha256()
    ids = []
    for _split, _cls, p in files:
        rel = _printable(os.path.relpath(p, root))
        ids.append(rel)
        h.update(rel.encode() + b"\0" + _stat_key(p) + b"\n")
    splits = np.array([s for s, _, _ in files], dtype="<U5") if split_dirs else None
    return _Raw(
        name=root.name, spec=str(root), classes=classes, ids=ids,
        labels=np.array([index[c] for _, c, _ in files], dtype=np.int64), splits=splits,
        loader=FileLoader([p for _, _, p in files], ids), fingerprint=h.hexdigest(),
        split_source="folders" if split_dirs else "seeded", notes=notes,
    )  # fmt: skip


def _manifest(path: Path) -> _Raw:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"--data {path}: cannot read the CSV manifest ({e})") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    if not rows:
        raise UsageError(f"--data {path}: the manifest lists no images (expected rows path,label[,split])")
    widths = {len(r) for r in rows}
    if not widths <= {2, 3} or len(widths) != 1:
        bad = next(i for i, r in enumerate(rows, 1) if len(r) != len(rows[0]) or len(r) not in (2, 3))
        raise UsageError(
            f"--data {path}: row {bad} has {len(rows[bad - 1])} columns; every row must be path,label or path,label,split"
        )
    has_split = widths == {3}
    base = path.parent
    paths, labels_s, splits = [], [], []
    for i, r in enumerate(rows, 1):
        p, lab = r[0].strip(), r[1].strip()
        if not p or not lab:
            raise UsageError(f"--data {path}: row {i} has an empty path or label")
        paths.append(p)
        labels_s.append(lab)
        if has_split:
            s = _SPLIT_ALIASES.get(r[2].strip().lower())
            if s is None:
                raise UsageError(f"--data {path}: row {i}: split {r[2].strip()!r} is not train, val or test")
            splits.append(s)
    classes = sorted(set(labels_s))
    index = {c: i for i, c in enumerate(classes)}
    full = [p if os.path.isabs(p) else str(base / p) for p in paths]
    h = hashlib.sha256(path.read_bytes())
    for p in full:
        h.update(_stat_key(p))
    return _Raw(
        name=path.stem, spec=str(path), classes=classes, ids=paths,
        labels=np.array([index[c] for c in labels_s], dtype=np.int64),
        splits=np.array(splits, dtype="<U5") if has_split else None, loader=FileLoader(full, paths),
        fingerprint=h.hexdigest(), split_source="manifest" if has_split else "seeded",
    )  # fmt: skip


class FileLoader:
    """Image files by index as RGB PIL images; `ids` name them in errors."""

    def __init__(self, paths: list[str], ids: list[str]):
        self.paths, self.ids = paths, ids

    def __call__(self, i: int):
        return decode_image(self.paths[i], self.ids[i])


# Pillow's own limit (it warns above it and refuses above twice it); FEATX_MAX_IMAGE_PIXELS moves featx's
MAX_IMAGE_PIXELS = int(os.environ.get("FEATX_MAX_IMAGE_PIXELS", 89_478_485))


def decode_image(path: str, ident: str | None = None):
    """Open an image file as an RGB PIL image, or raise ImageError(ident, reason)."""
    from PIL import Image, ImageOps

    ident = ident or _printable(path)
    if not os.path.isfile(path):  # a FIFO or device would block or mislead the decoder
        raise ImageError(ident, "missing" if not os.path.exists(path) else "not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # featx applies its own limit
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageError(
                        ident,
                        f"too large ({w}x{h} pixels, over {MAX_IMAGE_PIXELS}); "
                        f"raise FEATX_MAX_IMAGE_PIXELS to allow it",
                    )
                im.load()  # the first frame of an animation
                if im.getexif().get(0x0112, 1) != 1:  # only then: exif_transpose copies the image
                    im = ImageOps.exif_transpose(im) or im
                return to_rgb(im)
    except ImageError:
        raise
    except Exception as e:  # decoders raise many types on hostile files; each is this file's fault
        reason = e.strerror if isinstance(e, OSError) and e.strerror else _first(e)
        raise ImageError(ident, f"cannot decode ({type(e).__name__}: {reason})") from None


def _first(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def to_rgb(im):
    """Any PIL mode -> RGB; 16/32-bit integer and float images are scaled to 8 bits."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255) else 255.0
        if im.mode == "F" and a.max(initial=0) <= 1.0:
            top = 1.0
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")


# -- array sources -------------------------------------------------------------------------------


class _ArrayLoader:
    """Grayscale uint8 images in memory [N, H, W]."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __call__(self, i: int):
        from PIL import Image

        return Image.fromarray(self.images[i], "L").convert("RGB")


def _digits() -> _Raw:
    from importlib.metadata import version

    from sklearn.datasets import load_digits

    d = load_digits()
    # 0..16 intensities -> 0..255
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return _Raw(
        name="digits", spec="sklearn:digits", classes=[str(c) for c in range(10)],
        ids=[f"digits/{i:04d}" for i in range(len(images))], labels=d.target.astype(np.int64), splits=None,
        loader=_ArrayLoader(images), fingerprint=f"sklearn-digits:{version('scikit-learn')}", split_source="seeded",
    )  # fmt: skip


def _idx_files(path: Path) -> dict[str, tuple[Path, Path]]:
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


def _idx(root: Path) -> _Raw:
    pairs = _idx_files(root)
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
    labels_all = np.concatenate(labels)
    n_classes = int(labels_all.max()) + 1
    fashion = "fashion" in str(root).lower() and n_classes == 10
    classes = list(_FASHION_CLASSES) if fashion else [str(c) for c in range(n_classes)]
    return _Raw(
        name="fashion-mnist" if fashion else root.name, spec=str(root), classes=classes, ids=ids,
        labels=labels_all, splits=np.array(splits, dtype="<U5"), loader=_ArrayLoader(np.concatenate(images)),
        fingerprint=h.hexdigest(), split_source="files",
    )  # fmt: skip


# -- torchvision datasets ------------------------------------------------------------------------


class _TorchvisionLoader:
    def __init__(self, parts: list, offsets: list[int]):
        self.parts, self.offsets = parts, offsets

    def __call__(self, i: int):
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        image = self.parts[k][i - self.offsets[k]][0]
        return to_rgb(image)


def _torchvision(name: str, root: str | None) -> _Raw:
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
                f"--data torchvision:{name}: cannot load split {split!r} under {root} ({_first(e)}); "
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
    return _Raw(
        name=name.lower(), spec=f"torchvision:{name}", classes=[str(c) for c in classes], ids=ids,
        labels=labels_all, splits=np.array(splits, dtype="<U5"), loader=_TorchvisionLoader(parts, offsets),
        fingerprint=fp.hexdigest(), split_source="files",
    )  # fmt: skip
