"""Cutting a source into train/val/test: given splits, seeded stratified splits, groups (`--group-by`), limits.

`--group-by auto[:T]` names no groups here: the split made here is redone from the codes' groups
just before the entry is finalized (`featx.sources.autogroups`); here it is checked and enters the
fingerprint.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from featx.errors import UsageError
from featx.settings import DataOptions
from featx.sources.autogroups import (
    OPTION,
    auto_groups,
    check_source,
    deepest,
    describe,
    fingerprint_part,
    threshold_of,
)
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
        raise UsageError(
            f"--group-by {pattern!r} matches nothing in {len(missing)} of {len(ids)} image paths "
            f"(first: {printable(missing[0])}); every image needs a group: adjust the pattern"
        )
    return np.array(out, dtype=str)


def group_notes(
    groups: np.ndarray, labels: np.ndarray, splits: np.ndarray, given: bool, classes: list[str] | None = None
) -> list[str]:
    names, inverse = np.unique(groups, return_inverse=True)
    notes = []
    if not given and len(names) == 1:
        notes.append(
            f"the groups (--group-by or the manifest's group column) put all {len(groups)} images in one "
            f"group ({names[0]!r}): a split that keeps groups whole holds none out, so there are no test "
            f"images; adjust the pattern so that it names subjects"
        )
    elif not given:
        test = splits == "test"
        empty = [int(c) for c in np.unique(labels) if not (test & (labels == c)).any()]
        if empty:
            said = ", ".join(classes[c] if classes else str(c) for c in empty[:5]) + (
                ", ..." if len(empty) > 5 else ""
            )
            notes.append(
                f"{len(empty)} class(es) have no test images ({said}): each of their groups would have "
                f"held out more than its share, so all stayed in train; their test accuracy cannot be "
                f"measured (a pattern that names smaller groups helps)"
            )
    mixed = sum(1 for g in range(len(names)) if len(set(labels[inverse == g].tolist())) > 1)
    if mixed:
        notes.append(
            f"{mixed} of {len(names)} groups hold images of more than one class (allowed: each group "
            f"stays whole on one side of every split)"
        )
    if given:
        both = sum(1 for g in range(len(names)) if len(set(splits[inverse == g].tolist())) > 1)
        if both:
            notes.append(
                f"{both} of {len(names)} groups have images in more than one of the data's own splits; "
                f"featx keeps those splits as given and groups only its hold-out and CV folds"
            )
    return notes


def cut(raw: RawSource, opts: DataOptions) -> Dataset:
    """Per-class limit and, for sources without splits, a seeded stratified train/test split.

    A single K limits each class (in each split of a source that has splits) before a seeded
    split; a per-split limit ({'train': K1, 'test': K2}) on a source without splits applies after
    the seeded split."""
    n = len(raw.ids)
    rng = np.random.default_rng(opts.seed)
    limit = opts.per_class_limit
    auto = threshold_of(opts.group_by)  # --group-by auto: groups (and featx's split) come from the codes
    if auto is not None:
        check_source(raw.labels, raw.splits is not None, limit)
    splits_all = raw.splits
    if splits_all is None and isinstance(limit, dict):
        splits_all = seeded_split(raw.labels, opts.test_fraction, rng, raw.groups)
    keep = np.ones(n, dtype=bool)
    notes = list(raw.notes)
    if limit is not None:
        groups = splits_all if splits_all is not None else np.full(n, "all")
        if isinstance(limit, dict) and (unused := [k for k in limit if k not in set(groups.tolist())]):
            have = ", ".join(s for s in SPLITS if s in set(groups.tolist()))
            notes.append(
                f"--per-class-limit {','.join(f'{k}={limit[k]}' for k in unused)}: the data has no "
                f"{' or '.join(unused)} split (its splits: {have}), so that limit does nothing"
            )
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
    if auto is not None:
        h.update(fingerprint_part(auto))
    if raw.splits is not None and raw.labelled:
        notes += _untrained_classes(raw, labels, splits)
    if groups is not None:
        notes += group_notes(groups, labels, splits, raw.splits is not None, list(raw.classes))
    train_after = int(np.sum(splits == "train"))
    return Dataset(
        name=raw.name,
        spec=raw.spec,
        classes=raw.classes,
        ids=ids,
        labels=labels.astype(np.int64),
        splits=splits.astype("<U5"),
        loader=loader,
        fingerprint=h.hexdigest(),
        split_source=split_source,
        notes=notes,
        uncapped_train=train_before if train_before is not None and train_before > train_after else None,
        groups=groups,
        labelled=raw.labelled,
    )


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


def regroup(
    codes: np.ndarray,
    labels: np.ndarray,
    splits: np.ndarray,
    given: bool,
    threshold: float,
    test_fraction: float,
    seed: int,
    layer: str = "",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Auto groups of the rows and their split: (splits, groups as strings, notes). `given`: the
    data has its own splits, which are kept; else featx's seeded split is redone around the groups.
    `layer` only names the codes' layer in the notes."""
    ids = auto_groups(codes, threshold)
    groups = ids.astype(str)
    labels = np.asarray(labels, dtype=np.int64)
    if not given:
        splits = seeded_split(labels, test_fraction, np.random.default_rng(seed), groups)
        n_test = int(np.sum(splits == "test"))
        if n_test == 0 or n_test == len(splits):
            raise UsageError(
                f"{OPTION}: at threshold {threshold} the {len(np.unique(ids))} groups leave "
                f"{'no test' if n_test == 0 else 'no training'} image in featx's split; raise the "
                "threshold or give more images"
            )
    notes = [
        f"{OPTION}:{threshold}{' on ' + layer if layer else ''}: {describe(groups)}"
        + (
            ""
            if given
            else f"; featx's train/test split made from them ({int(np.sum(splits == 'test'))} test)"
        )
    ]
    return splits, groups, notes + group_notes(groups, labels, np.asarray(splits), given)


def regroup_journal(
    journal, depths: dict[str, float], ds, threshold: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """`regroup` on a finished journal's rows (its deepest layer), returned per sample of `ds` as
    `finalize` wants them (skipped samples keep their split and get no group)."""
    index = journal.read_index()
    names = [spec.name for spec in journal.layers]
    layer = deepest({n: depths[n] for n in names})
    codes = journal.read_layer(names.index(layer), 0, len(index))
    row_splits, row_groups, notes = regroup(
        codes,
        ds.labels[index],
        ds.splits[index],
        ds.split_source != "seeded",
        threshold,
        test_fraction,
        seed,
        layer,
    )
    splits = np.array(ds.splits, dtype="<U5")
    splits[index] = row_splits
    groups = np.full(len(ds.labels), "", dtype=object)
    groups[index] = row_groups
    return splits, groups, notes
