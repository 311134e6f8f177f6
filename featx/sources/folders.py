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

import hashlib
import os
from pathlib import Path

import numpy as np

from featx.errors import UsageError
from featx.settings import SPLIT_ALIASES
from featx.sources.dataset import IMAGE_EXTENSIONS, FileLoader, RawSource, unlabelled
from featx.sources.decode import (
    printable,
)


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
                if is_image_name(f) and not os.path.isdir(path):
                    found.append(path)
        return sorted(found)

    def note_loose(self, folder: str) -> None:
        try:
            names = sorted(e.name for e in os.scandir(folder) if is_image_name(e.name) and not e.is_dir())
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


def is_image_name(name: str) -> bool:
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


def stat_key(path: str) -> bytes:
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


def folder_source(root: Path) -> RawSource:
    """An ImageFolder. Top-level folders named like splits (train/, test/, ...) are splits when
    at least one of them holds subfolders (class folders); otherwise they are classes like any."""
    walk = _Walk(str(root))
    top = walk.subdirs(str(root))
    named = [d for d in top if d.lower() in SPLIT_ALIASES]
    split_dirs = [d for d in named if walk.subdirs(os.path.join(str(root), d))]
    notes = []
    if split_dirs:
        ignored = [d for d in top if d not in split_dirs]
        if ignored:
            notes.append(
                f"{root}: folders {', '.join(ignored)} are not split folders holding class folders "
                f"(train/CLASS, test/CLASS) and were ignored"
            )
        layout = [(SPLIT_ALIASES[d.lower()], os.path.join(str(root), d)) for d in split_dirs]
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
    if not files and not split_dirs and walk.loose:  # images, none in a class folder: unlabelled data
        loose, walk.loose = walk.loose, []
        return _flat_source(root, loose, walk.notes(str(root)))
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
        h.update(rel.encode() + b"\0" + stat_key(p) + b"\n")
    splits = np.array([s for s, _, _ in files], dtype="<U5") if split_dirs else None
    return RawSource(
        name=root.name,
        spec=str(root),
        classes=classes,
        ids=ids,
        labels=np.array([index[c] for _, c, _ in files], dtype=np.int64),
        splits=splits,
        loader=FileLoader([p for _, _, p in files], ids),
        fingerprint=h.hexdigest(),
        split_source="folders" if split_dirs else "seeded",
        notes=notes,
    )


def _flat_source(root: Path, paths: list[str], notes: list[str]) -> RawSource:
    """A folder whose images all lie directly in it (no class folders): unlabelled data, one row
    per image in sorted order, with featx's seeded split."""
    files = _unique_files([(None, None, p) for p in paths], str(root), notes)
    paths = [p for _, _, p in files]
    ids = [printable(os.path.relpath(p, root)) for p in paths]
    h = hashlib.sha256(b"unlabelled folder\n")
    for rel, p in zip(ids, paths):
        h.update(rel.encode() + b"\0" + stat_key(p) + b"\n")
    classes, labels = unlabelled(len(ids))
    notes.append(
        f"{root}: {len(ids)} image(s) and no class folders: read as unlabelled data "
        f"(extract, export and predict work; fit, score and bench need labels)"
    )
    return RawSource(
        name=root.name,
        spec=str(root),
        classes=classes,
        ids=ids,
        labels=labels,
        splits=None,
        loader=FileLoader(paths, ids),
        fingerprint=h.hexdigest(),
        split_source="seeded",
        notes=notes,
        labelled=False,
    )
