"""Cutting a source into train/val/test: given splits, seeded stratified splits, groups (`--group-by`), limits.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from featx.errors import UsageError
from featx.settings import DataOptions
from featx.sources.dataset import SPLITS, Dataset, RawSource, Subset
from featx.sources.decode import (
    printable,
)


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


def _group_notes(groups: np.ndarray, labels: np.ndarray, splits: np.ndarray, given: bool,
                 classes: list[str] | None = None) -> list[str]:  # fmt: skip
    names, inverse = np.unique(groups, return_inverse=True)
    notes = []
    if not given and len(names) == 1:
        notes.append(f"the groups (--group-by or the manifest's group column) put all {len(groups)} images in one "
                     f"group ({names[0]!r}): a split that keeps groups whole holds none out, so there are no test "
                     f"images; adjust the pattern so that it names subjects")  # fmt: skip
    elif not given:
        test = splits == "test"
        empty = [int(c) for c in np.unique(labels) if not (test & (labels == c)).any()]
        if empty:
            said = ", ".join(classes[c] if classes else str(c) for c in empty[:5]) + (", ..." if len(empty) > 5 else "")
            notes.append(f"{len(empty)} class(es) have no test images ({said}): each of their groups would have "
                         f"held out more than its share, so all stayed in train; their test accuracy cannot be "
                         f"measured (a pattern that names smaller groups helps)")  # fmt: skip
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


def cut(raw: RawSource, opts: DataOptions) -> Dataset:
    """Per-class limit and, for sources without splits, a seeded stratified train/test split.

    A single K limits each class (in each split of a source that has splits) before a seeded
    split; a per-split limit ({'train': K1, 'test': K2}) on a source without splits applies after
    the seeded split."""
    n = len(raw.ids)
    rng = np.random.default_rng(opts.seed)
    limit = opts.per_class_limit
    splits_all = raw.splits
    if splits_all is None and isinstance(limit, dict):
        splits_all = seeded_split(raw.labels, opts.test_fraction, rng, raw.groups)
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
        splits = seeded_split(
            labels, opts.test_fraction, rng, None if raw.groups is None else raw.groups[sel]
        )
    split_source = raw.split_source if raw.splits is not None else "seeded"
    ids = [raw.ids[i] for i in sel]
    loader = raw.loader if len(sel) == n else Subset(raw.loader, sel)
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
    if raw.splits is not None and raw.labelled:
        notes += _untrained_classes(raw, labels, splits)
    if groups is not None:
        notes += _group_notes(groups, labels, splits, raw.splits is not None, list(raw.classes))
    train_after = int(np.sum(splits == "train"))
    return Dataset(
        name=raw.name, spec=raw.spec, classes=raw.classes, ids=ids, labels=labels.astype(np.int64),
        splits=splits.astype("<U5"), loader=loader, fingerprint=h.hexdigest(), split_source=split_source,
        notes=notes, uncapped_train=train_before if train_before is not None and train_before > train_after else None,
        groups=groups, labelled=raw.labelled,
    )  # fmt: skip


def _untrained_classes(raw: RawSource, labels: np.ndarray, splits: np.ndarray) -> list[str]:
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


def seeded_split(
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
