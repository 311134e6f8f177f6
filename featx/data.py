"""Data sources -> a `Dataset`: class names, and per sample an id, a label, a split and a way to
load the image as RGB.

`--data` specs
  DIR               ImageFolder layout `DIR/CLASS/image`; top-level `train/`, `val/`, `test/` folders
                    (also training, valid, validation, testing) become splits: `DIR/train/CLASS/image`
  FILE.csv          a manifest `path,label[,split]` (header optional, see `read_csv`; a header may
                    name a group column, whose groups a seeded split keeps on one side; relative
                    paths are relative to the CSV's folder)
  sklearn:digits    scikit-learn's bundled 8x8 digits (1,797 images)
  DIR of idx files  MNIST-format idx files (`train-images-idx3-ubyte[.gz]`, `t10k-...`), e.g.
                    Fashion-MNIST from Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist)
  torchvision:NAME  a torchvision dataset class (CIFAR10, FashionMNIST, Flowers102, ...), kept under
                    `data_root` and downloaded there by torchvision when missing (needs internet)

Sources without splits get a seeded, stratified train/test split (`test_fraction`). A
`per_class_limit` keeps at most K images per class and split (an int, or {split: K}), chosen with
`seed`. Images are decoded with EXIF orientation applied and converted to RGB (grayscale,
palette, CMYK, RGBA by dropping alpha like torchvision's loader, 16-bit scaled to 8-bit);
animated images give their first frame. A file that cannot be decoded, or whose size or aspect
ratio is over the limits (`check_size`), raises `ImageError` with its path and the reason; the
extractor skips and lists it. What a source drops (loose images, folder links back into the tree,
files reached twice, duplicate manifest rows) is said once per kind in `Dataset.notes`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.decode import (  # noqa: F401 (re-exported: decoding lives in decode.py)
    ImageError,
    check_limits,
    check_size,
    decode_image,
    pil_with_limits,
    printable,
    to_rgb,
)
from featx.errors import UsageError, first_line
from featx.settings import _SPLIT_ALIASES, DataOptions, parse_per_class_limit  # noqa: F401 (re-exported)

log = logging.getLogger("featx")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SPLITS = ("train", "val", "test")
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


# -- opening -------------------------------------------------------------------------------------


def open_source(spec: str, options: DataOptions | None = None) -> Dataset:
    """List the samples of `spec` (see the module docstring) and cut them per `options`."""
    opts = options or DataOptions()
    check_limits()
    if not isinstance(opts.seed, int) or opts.seed < 0:
        raise UsageError(f"--seed {opts.seed}: must be a non-negative integer")
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
    if opts.group_by:
        raw.groups = groups_from_paths(raw.ids, opts.group_by)
    return _cut(raw, opts)


def groups_from_paths(ids: list[str], pattern: str) -> np.ndarray:
    """Each image's group: the first match of `pattern` on its relative path (its first capture
    group when the pattern has one). Every image must match."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UsageError(f"--group-by {pattern!r} is not a regular expression ({e})") from None
    out, missing = [], []
    for ident in ids:
        m = rx.search(ident)
        if m is None:
            missing.append(ident)
        else:
            out.append(m.group(1) if rx.groups else m.group(0))
    if missing:
        raise UsageError(f"--group-by {pattern!r} matches nothing in {len(missing)} of {len(ids)} image paths "
                         f"(first: {printable(missing[0])}); every image needs a group: adjust the pattern")  # fmt: skip
    return np.array(out, dtype=str)


def _group_notes(groups: np.ndarray, labels: np.ndarray, splits: np.ndarray, given: bool) -> list[str]:
    names, inverse = np.unique(groups, return_inverse=True)
    notes = []
    mixed = sum(1 for g in range(len(names)) if len(set(labels[inverse == g].tolist())) > 1)
    if mixed:
        notes.append(f"{mixed} of {len(names)} groups hold images of more than one class (allowed: each group "
                     f"stays whole on one side of every split)")  # fmt: skip
    if given:
        both = sum(1 for g in range(len(names)) if len(set(splits[inverse == g].tolist())) > 1)
        if both:
            notes.append(f"{both} of {len(names)} groups have images in more than one of the data's own splits; "
                         f"featx keeps those splits as given and groups only its hold-out and CV folds")  # fmt: skip
    return notes


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
    groups: np.ndarray | None = None  # str [N]: a seeded split keeps each group on one side


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
        splits_all = _seeded_split(raw.labels, opts.test_fraction, rng, raw.groups)
    keep = np.ones(n, dtype=bool)
    notes = list(raw.notes)
    if limit is not None:
        groups = splits_all if splits_all is not None else np.full(n, "all")
        if isinstance(limit, dict) and (unused := [k for k in limit if k not in set(groups.tolist())]):
            have = ", ".join(s for s in SPLITS if s in set(groups.tolist()))
            notes.append(f"--per-class-limit {','.join(f'{k}={limit[k]}' for k in unused)}: the data has no "
                         f"{' or '.join(unused)} split (its splits: {have}), so that limit does nothing")  # fmt: skip
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
    train_before = int(np.sum(splits_all == "train")) if splits_all is not None else None
    if splits_all is not None:
        splits = splits_all[sel]
    else:
        splits = _seeded_split(
            labels, opts.test_fraction, rng, None if raw.groups is None else raw.groups[sel]
        )
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
    groups = None if raw.groups is None else raw.groups[sel]
    if groups is not None:
        h.update(("groups\0" + "\0".join(groups.tolist())).encode())
    if raw.splits is not None:
        notes += _untrained_classes(raw, labels, splits)
    if groups is not None:
        notes += _group_notes(groups, labels, splits, raw.splits is not None)
    train_after = int(np.sum(splits == "train"))
    return Dataset(
        name=raw.name, spec=raw.spec, classes=raw.classes, ids=ids, labels=labels.astype(np.int64),
        splits=splits.astype("<U5"), loader=loader, fingerprint=h.hexdigest(), split_source=split_source,
        notes=notes, uncapped_train=train_before if train_before is not None and train_before > train_after else None,
        groups=groups,
    )  # fmt: skip


def _untrained_classes(raw: _Raw, labels: np.ndarray, splits: np.ndarray) -> list[str]:
    """A note naming the classes that have val/test images but no training images: a classifier
    can never predict them, so each of their images counts as an error."""
    n = len(raw.classes)
    train = np.bincount(labels[splits == "train"], minlength=n)
    other = np.bincount(labels[splits != "train"], minlength=n)
    missing = [c for c in range(n) if other[c] and not train[c]]
    if not missing:
        return []
    names = ", ".join(raw.classes[c] for c in missing[:5]) + (", ..." if len(missing) > 5 else "")
    return [
        f"{raw.spec}: {len(missing)} class(es) have val/test images but no training images "
        f"({names}; {int(other[missing].sum())} images): a classifier cannot predict them"
    ]


def _seeded_split(
    labels: np.ndarray, test_fraction: float, rng, groups: np.ndarray | None = None
) -> np.ndarray:
    held = (
        stratified_holdout(labels, test_fraction, rng)
        if groups is None
        else group_holdout(labels, groups, test_fraction, rng)
    )
    return np.where(held, "test", "train").astype("<U5")


def group_holdout(labels: np.ndarray, groups: np.ndarray, fraction: float, rng) -> np.ndarray:
    """Hold out whole groups (a manifest's group column: a subject, a patient, a source photo) so
    that no group is on both sides: groups in seeded order are held out while no class of theirs
    would pass round(fraction * its size) (at least 1) held-out images."""
    names, inverse = np.unique(groups, return_inverse=True)
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    per_group = np.zeros((len(names), n_classes), dtype=np.int64)
    np.add.at(per_group, (inverse, labels), 1)
    target = np.maximum(np.round(per_group.sum(0) * fraction), 1)
    taken = np.zeros(n_classes, dtype=np.int64)
    held = np.zeros(len(names), dtype=bool)
    for g in rng.permutation(len(names)):
        if (taken + per_group[g] <= target).all():
            held[g] = True
            taken += per_group[g]
    return held[inverse]


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


def _inside(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip(os.sep) + os.sep)


def _leads_back(path: str, tree: str) -> bool:
    """A symlinked folder whose target is inside `tree` (the real dataset root) or holds it:
    following it would list the tree's images again, under another folder's label."""
    if not os.path.islink(path):
        return False
    target = os.path.realpath(path)
    return _inside(target, tree) or _inside(tree, target)


class _Walk:
    """What one listing of image files dropped, summed over its folders and said once each."""

    def __init__(self, tree: str):
        self.tree = os.path.realpath(tree)
        self.links: dict[str, None] = {}  # folder links back into the tree, skipped (ordered set)
        self.loose: list[str] = []  # images beside class folders, ignored

    def subdirs(self, path: str) -> list[str]:
        """Non-hidden subfolders of `path` that do not lead back into the tree, sorted."""
        keep = []
        for d in _subdirs(path):
            if _leads_back(os.path.join(path, d), self.tree):
                self.links[os.path.join(path, d)] = None
            else:
                keep.append(d)
        return keep

    def images(self, top: str) -> list[str]:
        """Image files under `top`, sorted; symlinks are followed unless they lead back into the
        tree, and never loop."""
        found: list[str] = []
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
                if _leads_back(os.path.join(root, d), self.tree):
                    self.links[os.path.join(root, d)] = None
                    continue
                keep.append(d)
            dirs[:] = keep
            for f in files:
                path = os.path.join(root, f)
                # non-regular files (FIFOs, dangling or looping links) are listed: decoding skips them with a reason
                if _is_image_name(f) and not os.path.isdir(path):
                    found.append(path)
        return sorted(found)

    def note_loose(self, folder: str) -> None:
        try:
            names = sorted(e.name for e in os.scandir(folder) if _is_image_name(e.name) and not e.is_dir())
        except OSError:
            return
        self.loose += [os.path.join(folder, n) for n in names]

    def notes(self, root: str) -> list[str]:
        out = []
        if self.loose:
            out.append(
                f"{root}: {len(self.loose)} image(s) lie directly in the data folder or a split folder, "
                f"not in a class folder, and were ignored (first: {_rel(self.loose[0], root)})"
            )
        if self.links:
            first = next(iter(self.links))
            out.append(
                f"{root}: {len(self.links)} folder link(s) lead back into the dataset and were skipped, "
                f"as they would list its images again under another label (first: {_rel(first, root)} -> "
                f"{printable(os.readlink(first))})"
            )
        return out


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _rel(path: str, root: str) -> str:
    return printable(os.path.relpath(path, root))


def walk_images(top: str, notes: list[str] | None = None) -> list[str]:
    """Image files under `top`, sorted, each file once. Folder symlinks are followed unless they
    lead back into `top`'s tree (skipped, noted in `notes`), and never loop."""
    walk = _Walk(top)
    found = _unique_files([(None, None, p) for p in walk.images(top)], top, notes)
    if notes is not None:
        notes += walk.notes(top)
    return [p for _, _, p in found]


def _unique_files(files: list[tuple], root: str, notes: list[str] | None) -> list[tuple]:
    """(split, class, path) entries with each file (device, inode) once: where one file is reached
    twice (links), the entry at its own path wins over one through a link, else the first."""
    by_file: dict[tuple[int, int], list[int]] = {}
    for k, (_, _, p) in enumerate(files):
        try:
            st = os.stat(p)
        except OSError:
            continue  # missing or looping: listed, and skipped with its reason when decoded
        if st.st_ino:  # some network file systems give every file inode 0: no identity to compare
            by_file.setdefault((st.st_dev, st.st_ino), []).append(k)
    drop: set[int] = set()
    first = None
    for ks in by_file.values():
        if len(ks) > 1:
            own = [k for k in ks if os.path.realpath(files[k][2]) == os.path.abspath(files[k][2])]
            keep = (own or ks)[0]
            drop.update(k for k in ks if k != keep)
            first = first or (files[keep][2], files[next(k for k in ks if k != keep)][2])
    if drop and notes is not None:
        notes.append(
            f"{root}: {len(drop)} image file(s) are reached twice (through links) and were taken once "
            f"(first: {_rel(first[0], root)}, again as {_rel(first[1], root)})"
        )
    return [f for k, f in enumerate(files) if k not in drop]


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
    """An ImageFolder. Top-level folders named like splits (train/, test/, ...) are splits when
    at least one of them holds subfolders (class folders); otherwise they are classes like any."""
    walk = _Walk(str(root))
    top = walk.subdirs(str(root))
    named = [d for d in top if d.lower() in _SPLIT_ALIASES]
    split_dirs = [d for d in named if walk.subdirs(os.path.join(str(root), d))]
    notes = []
    if split_dirs:
        ignored = [d for d in top if d not in split_dirs]
        if ignored:
            notes.append(
                f"{root}: folders {', '.join(ignored)} are not split folders holding class folders "
                f"(train/CLASS, test/CLASS) and were ignored"
            )
        layout = [(_SPLIT_ALIASES[d.lower()], os.path.join(str(root), d)) for d in split_dirs]
        if len({s for s, _ in layout}) != len(layout):
            raise UsageError(f"--data {root}: two folders name the same split ({', '.join(split_dirs)})")
        walk.note_loose(str(root))
    else:
        layout = [(None, str(root))]
        if named:
            notes.append(
                f"{root}: folder(s) {', '.join(named)} hold no class folders and are read as classes, not splits"
            )
    files: list[tuple[str | None, str, str]] = []  # (split, class, path)
    class_dirs: set[str] = set()
    for split, base in layout:
        walk.note_loose(base)
        for cls in walk.subdirs(base):
            class_dirs.add(cls)
            files.extend((split, cls, p) for p in walk.images(os.path.join(base, cls)))
    notes += walk.notes(str(root))
    files = _unique_files(files, str(root), notes)
    if not files:
        where = f"{root}/CLASS/image or {root}/train/CLASS/image"
        loose = f"; {len(walk.loose)} image(s) lie outside class folders" if walk.loose else ""
        raise UsageError(
            f"--data {root}: no images found (expected {where}; extensions {' '.join(IMAGE_EXTENSIONS)}){loose}"
        )
    classes = sorted({c for _, c, _ in files})
    empty = sorted(class_dirs - set(classes))
    if empty:
        notes.append(f"{root}: class folders without images were ignored: {', '.join(empty)}")
    index = {c: i for i, c in enumerate(classes)}
    h = hashlib.sha256()
    ids = []
    for _split, _cls, p in files:
        rel = printable(os.path.relpath(p, root))
        ids.append(rel)
        h.update(rel.encode() + b"\0" + _stat_key(p) + b"\n")
    splits = np.array([s for s, _, _ in files], dtype="<U5") if split_dirs else None
    return _Raw(
        name=root.name, spec=str(root), classes=classes, ids=ids,
        labels=np.array([index[c] for _, c, _ in files], dtype=np.int64), splits=splits,
        loader=FileLoader([p for _, _, p in files], ids), fingerprint=h.hexdigest(),
        split_source="folders" if split_dirs else "seeded", notes=notes,
    )  # fmt: skip


# Column names a CSV header may use, per role (compared case-insensitively).
CSV_COLUMNS = {
    "path": ("path", "filename", "file", "file_name", "filepath", "file_path", "image", "image_path",
             "image_file", "image_name", "img", "img_path", "fname"),
    "label": ("label", "class", "target", "category", "class_name", "classname", "labels", "y"),
    "split": ("split", "subset", "set", "partition"),
    "group": ("group", "group_id", "subject", "subject_id", "patient", "patient_id"),
}  # fmt: skip


@dataclass
class CsvTable:
    """The data rows of a CSV: `rows[k]` is (line number, {role: stripped value}) for the roles
    in `columns` (role -> column index); `header` is 'named', 'unnamed' or None."""

    columns: dict[str, int]
    rows: list[tuple[int, dict[str, str]]]
    header: str | None
    notes: list[str] = field(default_factory=list)


def read_csv(path: str | Path, where: str, need: tuple[str, ...] = ("path", "label")) -> CsvTable:
    """Read a CSV of image paths for extract's manifest and predict's input, or raise a one-line
    UsageError that starts with `where` (the option and file).

    UTF-8 with or without a byte-order mark. The first row is a header when none of its cells
    names an image (an existing file, or a name ending in an image extension): taken as data, such
    a row would invent an image and a class named after its label column. A header's known column
    names (CSV_COLUMNS: path, filename, file, image...; label, class, target...; split; group)
    place the columns (an unnamed path or label column is the first or second one); without
    known names, or without a header, the columns are path, label[, split] by position. `need`
    lists the roles every row must have."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{where}: cannot read the CSV ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")  # -sig: spreadsheets write a byte-order mark
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UsageError(
            f"{where}: the CSV is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); save it as "
            f"UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}-utf8.csv"
        ) from None
    rows: list[tuple[int, list[str]]] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for r in reader:
            if r and any(c.strip() for c in r):
                rows.append((reader.line_num, [c.strip() for c in r]))
    except csv.Error as e:
        raise UsageError(f"{where}: row {reader.line_num} is not valid CSV ({e})") from None
    expect = ",".join(need) + ("[,split]" if "label" in need else "")
    if not rows:
        raise UsageError(f"{where}: the CSV lists no images (expected rows {expect})")
    base = path.parent

    def is_file(p: str) -> bool:
        return bool(p) and os.path.isfile(p if os.path.isabs(p) else base / p)

    first = [c.lower() for c in rows[0][1]]
    header = None
    notes: list[str] = []
    columns: dict[str, int] = {}
    if not any(is_file(c) or _is_image_name(c) for c in rows[0][1]):
        for role, names in CSV_COLUMNS.items():
            hit = next((k for k, c in enumerate(first) if c in names and k not in columns.values()), None)
            if hit is not None:
                columns[role] = hit
        header = "named" if columns else "unnamed"
    if header == "named":
        for role, k in (("path", 0), ("label", 1)):
            if role in need and role not in columns and k < len(first) and k not in columns.values():
                columns[role] = k
        missing = [r for r in need if r not in columns]
        if missing:
            raise UsageError(
                f"{where}: the header {','.join(rows[0][1])} names no {missing[0]} column; "
                f"call it one of {', '.join(CSV_COLUMNS[missing[0]][:4])}"
            )
    else:
        if header == "unnamed":
            notes.append(
                f"{where}: the first row ({','.join(rows[0][1])[:80]}) names no image file, so it was read "
                f"as a header (columns {expect} by position)"
            )
        width = len(rows[1][1]) if header and len(rows) > 1 else len(rows[0][1])
        columns = {"path": 0}
        if "label" in need:
            columns.update({"label": 1, **({"split": 2} if width >= 3 else {})})
    data = rows[1:] if header else rows
    if not data:
        raise UsageError(f"{where}: the CSV lists no images, only a header (expected rows {expect})")
    if header != "named" and "label" in need:  # by position: path,label or path,label,split throughout
        width = len(data[0][1])
        for line, r in data:
            if len(r) != width or len(r) not in (2, 3):
                raise UsageError(
                    f"{where}: row {line} has {len(r)} columns; every row must be path,label or path,label,split"
                )
    top = max(columns.values())
    out = []
    for line, r in data:
        if len(r) <= top:
            raise UsageError(f"{where}: row {line} has {len(r)} columns; the header has {len(first)}")
        out.append((line, {role: r[k] for role, k in columns.items()}))
    return CsvTable(columns, out, header, notes)


def _manifest(path: Path) -> _Raw:
    where = f"--data {path}"
    table = read_csv(path, where, need=("path", "label"))
    has_split, has_group = "split" in table.columns, "group" in table.columns
    group_split: dict[str, tuple[int, str | None]] = {}  # group -> (first row, its split)
    groups: list[str] = []
    base = path.parent
    seen: dict[str, tuple[int, str, str | None]] = {}  # normalized path -> (line, label, split)
    paths, labels_s, splits, dropped = [], [], [], []
    for line, rec in table.rows:
        p, lab = rec["path"], rec["label"]
        if not p or not lab:
            raise UsageError(f"{where}: row {line} has an empty path or label")
        split = None
        if has_split:
            split = _SPLIT_ALIASES.get(rec["split"].lower())
            if split is None:
                raise UsageError(f"{where}: row {line}: split {rec['split']!r} is not train, val or test")
        key = os.path.normcase(os.path.normpath(p if os.path.isabs(p) else base / p))
        if key in seen:
            first_line, first_lab, first_split = seen[key]
            if (first_lab, first_split) != (lab, split):
                was = "/".join(x for x in (first_lab, first_split) if x)
                now = "/".join(x for x in (lab, split) if x)
                raise UsageError(
                    f"{where}: {p} is listed twice with different labels or splits (row {first_line}: "
                    f"{was}, row {line}: {now}); keep one row per image"
                )
            dropped.append((p, first_line, line))
            continue
        if has_group:
            group = rec["group"] or f"\0row {line}"  # no group: the image is its own
            first = group_split.setdefault(group, (line, split))
            if has_split and first[1] != split:
                raise UsageError(
                    f"{where}: group {group!r} is in split {first[1]} (row {first[0]}) and {split} (row {line}); "
                    f"a group's images must share one split, or the test images leak into training"
                )
            groups.append(group)
        seen[key] = (line, lab, split)
        paths.append(p)
        labels_s.append(lab)
        splits.append(split)
    notes = list(table.notes)
    if dropped:
        p, a, b = dropped[0]
        notes.append(f"{where}: {len(dropped)} duplicate row(s) were dropped (first: {p}, rows {a} and {b})")
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
        fingerprint=h.hexdigest(), split_source="manifest" if has_split else "seeded", notes=notes,
        groups=np.array(groups, dtype=str) if has_group else None,
    )  # fmt: skip


def read_image_list(path: str) -> list[str]:
    """The image paths of a CSV given to `featx predict` (the path column; see `read_csv`),
    relative ones joined to the CSV's folder. Rows with an empty path are left out."""
    table = read_csv(path, str(path), need=("path",))
    for note in table.notes:
        log.warning(note)
    base = os.path.dirname(os.path.abspath(path))
    return [p if os.path.isabs(p) else os.path.join(base, p) for _, rec in table.rows if (p := rec["path"])]


class FileLoader:
    """Image files by index as RGB PIL images; `ids` name them in errors."""

    def __init__(self, paths: list[str], ids: list[str]):
        self.paths, self.ids = paths, ids

    def __call__(self, i: int):
        return decode_image(self.paths[i], self.ids[i])


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
    if not sum(len(x) for x in labels):
        raise UsageError(f"--data {root}: the idx label files hold no samples")
    # the classes are the label values present ({0, 255} is two classes, not 256)
    present, labels_all = np.unique(np.concatenate(labels), return_inverse=True)
    fashion = "fashion" in str(root).lower() and present.max() <= 9
    classes = [_FASHION_CLASSES[v] if fashion else str(v) for v in present.tolist()]
    notes = []
    if present.tolist() != list(range(len(present))):
        notes.append(f"{root}: the label files hold the values {_listing(present.tolist())}; each is a class")
    return _Raw(
        name="fashion-mnist" if fashion else root.name, spec=str(root), classes=classes, ids=ids,
        labels=labels_all.astype(np.int64), splits=np.array(splits, dtype="<U5"),
        loader=_ArrayLoader(np.concatenate(images)), fingerprint=h.hexdigest(), split_source="files", notes=notes,
    )  # fmt: skip


# -- torchvision datasets ------------------------------------------------------------------------


class _TorchvisionLoader:
    def __init__(self, parts: list, offsets: list[int]):
        self.parts, self.offsets = parts, offsets

    def __call__(self, i: int):
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        image = self.parts[k][i - self.offsets[k]][0]
        return to_rgb(image)


def _listing(values: list, k: int = 8) -> str:
    return ", ".join(map(str, values[:k])) + (f", ... ({len(values)} in all)" if len(values) > k else "")


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
    return _Raw(
        name=name.lower(), spec=f"torchvision:{name}", classes=[str(c) for c in classes], ids=ids,
        labels=labels_all, splits=np.array(splits, dtype="<U5"), loader=_TorchvisionLoader(parts, offsets),
        fingerprint=fp.hexdigest(), split_source="files",
    )  # fmt: skip
