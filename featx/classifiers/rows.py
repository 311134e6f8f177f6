"""Which rows a cell trains, validates and tests on (seeded, per class, group-aware), and reading their codes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from featx.classifiers.protocol import MAX_AUTO_FOLDS, Protocol, TrainSize
from featx.errors import UsageError
from featx.sources.cutting import group_holdout, stratified_holdout
from featx.store.codes import CodesFile


@dataclass
class Rows:
    """Row indices of one cell, all sorted."""

    train: np.ndarray  # images the classifier learns from (after subsampling), hold-out excluded
    val: np.ndarray  # validation images (empty with cv)
    test: np.ndarray
    val_source: str  # 'val split' | 'hold-out 20% of train' | '5-fold cv'
    test_split: str  # 'test' | 'val'
    train_size: int  # training-split images used, hold-out included
    folds: int | None = None  # C chosen by this many CV folds on `train` (val is then empty)
    groups: np.ndarray | None = (
        None  # the groups of `train` (files made with --group-by): folds keep them whole
    )


def select_rows(f: CodesFile, protocol: Protocol, train_size: TrainSize, seed: int) -> Rows:
    """Which rows train, validate and test a cell; the errors a user can cause, stated plainly."""
    present = [s for s in ("train", "val", "test") if (f.split == s).any()]
    if "train" not in present:
        raise UsageError(
            f"{f.path} has no train split (splits: {', '.join(present) or 'none'}); extract "
            f"data with a train split, or data without splits so featx makes one"
        )
    test_split = "test" if "test" in present else "val" if "val" in present else None
    if test_split is None:
        raise UsageError(
            f"{f.path} has only a train split; there is nothing to test on (give test images, or --test-fraction at extract)"
        )
    if seed < 0:
        raise UsageError(f"--seed {seed}: seeds must be non-negative integers")
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(f.split == "train")
    train = subsample(train, f.labels, train_size, rng, f.classes)
    classes = np.unique(f.labels[train])
    if len(classes) < 2:
        name = f.classes[int(classes[0])] if len(classes) else "none"
        raise UsageError(
            f"the training images of {f.path} hold a single class ({name}); a classifier needs two or more"
        )
    test = np.flatnonzero(f.split == test_split)
    n_train = len(train)
    g = getattr(f, "groups", None)
    grouped = "grouped " if g is not None else ""
    if test_split == "test" and "val" in present:
        val, source = np.flatnonzero(f.split == "val"), "val split"
        if protocol.cv or protocol.per_class:  # CV uses every labelled non-test image
            train, val = np.sort(np.concatenate([train, val])), np.empty(0, np.int64)
            source = f"{protocol.cv or 3}-fold cv on train+val"
    elif protocol.cv or protocol.per_class:
        val, source = np.empty(0, np.int64), f"{protocol.cv or 3}-fold {grouped}cv"
    elif (folds := _auto_folds(f.labels[train], protocol, None if g is None else g[train])) is not None:
        return Rows(
            train,
            np.empty(0, np.int64),
            test,
            f"{folds}-fold {grouped}cv",
            test_split,
            n_train,
            folds,
            None if g is None else g[train],
        )
    else:
        held = (
            stratified_holdout(f.labels[train], protocol.val_fraction, rng)
            if g is None
            else group_holdout(f.labels[train], g[train], protocol.val_fraction, rng)
        )
        train, val = train[~held], train[held]
        source = f"{grouped}hold-out {protocol.val_fraction:.0%} of train"
        if len(val) == 0:
            raise UsageError(
                f"--train-size {train_size} leaves no images to validate on; use a larger train size or --cv"
            )
    folds = protocol.cv if protocol.cv and not protocol.per_class else None
    train, val = np.sort(train), np.sort(val)
    return Rows(train, val, test, source, test_split, n_train, folds, None if g is None else g[train])


def _auto_folds(labels: np.ndarray, protocol: Protocol, groups: np.ndarray | None = None) -> int | None:
    """k for cross-validation when a hold-out would keep fewer than `min_val_per_class` images of
    some class (the same count `stratified_holdout` takes), else None: keep the hold-out. With
    groups, k is at most the number of groups."""
    if protocol.classifier == "sgd" or not protocol.min_val_per_class:
        return None
    smallest = int(np.bincount(labels)[np.unique(labels)].min())
    held = max(1, int(round(smallest * protocol.val_fraction)))
    k = min(MAX_AUTO_FOLDS, smallest, len(np.unique(groups)) if groups is not None else smallest)
    if held >= protocol.min_val_per_class or k < 2:
        return None
    return k


def subsample(rows: np.ndarray, labels: np.ndarray, size: TrainSize, rng, classes: list[str]) -> np.ndarray:
    if size.kind == "all":
        return rows
    y = labels[rows]
    present = np.unique(y)
    if size.kind == "per_class":
        out = []
        for c in present:
            idx = rows[y == c]
            if len(idx) < size.n:
                raise UsageError(
                    f"--train-size {size}: class {classes[int(c)]!r} has only {len(idx)} training images"
                )
            out.append(rng.choice(idx, size.n, replace=False))
        return np.sort(np.concatenate(out))
    if size.n > len(rows):
        raise UsageError(f"--train-size {size.n} is larger than the {len(rows)} training images")
    if size.n < len(present):
        raise UsageError(f"--train-size {size.n} is smaller than the number of classes ({len(present)})")
    from sklearn.model_selection import train_test_split

    if size.n == len(rows):
        return rows
    picked, _ = train_test_split(rows, train_size=size.n, stratify=y, random_state=int(rng.integers(2**31)))
    return np.sort(picked)


def load_codes(f: CodesFile, layers: Sequence[str], rows: np.ndarray) -> np.ndarray:
    return (
        np.hstack([f.codes(layer, rows) for layer in layers]) if len(layers) > 1 else f.codes(layers[0], rows)
    )


def load_parts(f: CodesFile, layers: Sequence[str], parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    """`load_codes` of several disjoint row sets in one read of their union (a cell's train, val and
    test rows together are often the whole file, which reads faster in one pass than in three)."""
    union = np.sort(np.concatenate(parts))
    X = load_codes(f, layers, union)
    return [X[np.searchsorted(union, p)] for p in parts]
