"""Near-duplicate rows in codes: the nearest row, a leakage check for a split, groups made from them.

Real datasets hold near-copies (frames of one track, slices of one scan, re-encoded uploads). A
random split then puts one copy in training and another in validation or test, and the held-out
score measures recognising the copy. featx already has the codes, so it looks for this there:

- `nearest` (from `featx.sources.neighbours`): for each query row, the most similar reference row
  by cosine similarity (rows L2-normalised, float32 matrix products over blocks of queries); exact
  up to `EXACT_NEAREST_PRODUCTS` query x reference pairs, above that candidates found in a
  128-dim projection re-ranked exactly (the similarity returned is always exact).
- `leakage`: is a split's held-out side markedly closer to training than independent images are?
  The reference for "independent" is each training row's nearest training row *of another class*:
  near-copies share their source's class, so duplicates cannot inflate this reference, while a
  held-back part of the training rows (the other candidate) is itself full of copies when the data
  is. A held-out row is *markedly closer* when its nearest training row is at most half as far
  (1 - similarity) as the closest 1% of other-class neighbours are (`REF_QUANTILE`,
  `CLOSER_FACTOR`); same-class neighbours of independent images are closer than other-class ones,
  but rarely by a factor of two in distance on the sets measured. The split is `leaky` when at
  least `LEAK_FRACTION` of the held-out rows, and at least `LEAK_MIN_ROWS`, are markedly closer.
  Without labels the reference is unavailable and the cut is the fixed `DUP_SIMILARITY`.
- `auto_groups`: rows joined when their similarity is at least a threshold, transitively
  (connected components of the pair graph): the groups of `--group-by auto`, numbered by first
  appearance so the same codes always give the same ids. It lives in `featx.sources.autogroups`
  (with how the groups reach featx's split at extraction) and is re-exported here.
- `leak_check`: the check `featx fit` and `featx bench` run on an entry before fitting: the rows a
  fit validates and tests against its training rows, on the entry's deepest layer; a leaky entry
  gets one warning line naming an example pair of paths and the fix (`--group-by auto` or a regex).

Measured (`benchmarks/near_duplicates.py`, docs/near-duplicates.md; 2-core AMD EPYC CPU): generated
near-copies (crops, shifts, colour jitter, JPEG re-encoding; 60 sources x 6 images) among 300 other
images of flowers5_128 and of brain_tumor_mri, EfficientNet-Lite0 (ImageNet) codes at 112 px:

- Codes or a pixel hash: the ROC AUC of known copy pairs against all other pairs is 1.000 / 0.999
  (flowers / MRI) for the deepest codes' cosine, 0.977 / 0.841 for a 64-bit dHash of a grayscale
  thumbnail (Hamming similarity); best pairwise F1 0.95 / 0.84 against 0.68 / 0.17. The hash
  loses most on scans, where every image has the same layout, so it was not adopted (it lives in
  the benchmark only).
- Which layer: the deepest (`global_pool`). The mid layer's ReLU codes are all positive, so every
  cosine sits near 1 (median nearest neighbour 0.94 on flowers) and no threshold separates MRI
  copies (best mean F1 0.64 at 0.98, against 0.80 for `global_pool` at 0.90).
- `DUP_SIMILARITY` 0.90: the best mean pairwise F1 of `auto_groups` over the two sets among
  0.80-0.99 (precision 0.88, recall 0.77); 0.85 finds more copies on photos but over-joins scans.
- The leakage rule flagged every random split of the generated sets (10 of 10 per layer) and none
  of 15 random splits of flowers5_128, hymenoptera and Fashion-MNIST (per layer).

Cost: the leakage check samples at most `MAX_QUERIES` held-out rows (and as many reference rows), so
its two `nearest` searches grow linearly with the training rows; `auto_groups` is exact up to
`EXACT_PAIR_ROWS` rows and an inverted file above (rows^1.5). Measured exact against approximate
(`benchmarks/near_duplicates_speed.py`): docs/near-duplicates.md, "Speed".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featx.errors import UsageError
from featx.sources.autogroups import (  # the grouping math lives below the engine, which groups at extraction
    DUP_SIMILARITY,
    OPTION,
    auto_groups,
    check_threshold,
)
from featx.sources.neighbours import BLOCK_ELEMENTS, nearest, normalise, similar_pairs

__all__ = [
    "BLOCK_ELEMENTS",
    "DUP_SIMILARITY",
    "LeakageReport",
    "auto_groups",
    "check_threshold",
    "leakage",
    "nearest",
    "normalise",
    "pair_scores",
    "similar_pairs",
]
REF_QUANTILE = 0.99  # the reference cut: closer than 99% of training rows' other-class neighbours
CLOSER_FACTOR = 0.5  # markedly closer: at most half the reference cut's distance (1 - similarity)
LEAK_FRACTION = 0.05  # leaky: at least 5% of held-out rows markedly closer (independent sets: < 1%)
LEAK_MIN_ROWS = 5  # ... and at least 5 rows, so a couple of stray copies in a small set don't warn
MAX_QUERIES = 2000  # leakage samples this many held-out rows (and reference rows): a 5% fraction +/- 0.5%


@dataclass(frozen=True)
class LeakageReport:
    """What `leakage` found: held-out rows markedly closer to training than independent images are.

    `closer` rows of `checked` held-out rows (a sample of at most `MAX_QUERIES`) are within the cut
    (`cut`: a similarity; `reference`: "other-class" or "fixed"); `quantiles` are the held-out rows'
    nearest-training similarities at 5/50/95% and `reference_quantiles` the reference's;
    `example` is (held-out row, training row) of the closest pair, as indices into the codes."""

    checked: int
    closer: int
    fraction: float
    cut: float
    reference: str
    quantiles: tuple[float, float, float]
    reference_quantiles: tuple[float, float, float]
    example: tuple[int, int] | None
    leaky: bool

    def summary(self) -> str:
        """One line for a warning or a report."""
        verdict = "near-copies of training rows" if self.leaky else "no sign of near-copies"
        q = "/".join(f"{v:.3f}" for v in self.quantiles)
        rq = "/".join(f"{v:.3f}" for v in self.reference_quantiles)
        pair = f"; closest pair: rows {self.example[0]} and {self.example[1]}" if self.example else ""
        return (
            f"{verdict}: {self.closer} of {self.checked} held-out rows ({100 * self.fraction:.1f}%) are "
            f"within similarity {self.cut:.3f} of a training row ({self.reference} reference); nearest "
            f"similarity 5/50/95%: held-out {q}, reference {rq}{pair}"
        )


def _quantiles(v: np.ndarray) -> tuple[float, float, float]:
    v = v[np.isfinite(v)]
    if not len(v):
        return (float("nan"),) * 3
    return tuple(float(x) for x in np.quantile(v, (0.05, 0.5, 0.95)))


def _sample(rows: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return rows if len(rows) <= n else np.sort(rng.choice(rows, n, replace=False))


def reference_cut(ref_sims: np.ndarray) -> float:
    """The similarity a held-out row must reach to count as markedly closer (module docstring):
    half the distance of the `REF_QUANTILE` quantile of the reference similarities."""
    q = float(np.quantile(ref_sims, REF_QUANTILE))
    return 1.0 - CLOSER_FACTOR * (1.0 - q)


def is_leaky(closer: int, checked: int) -> bool:
    """The rule: at least `LEAK_FRACTION` of the checked rows and `LEAK_MIN_ROWS` rows are closer."""
    return checked > 0 and closer >= LEAK_MIN_ROWS and closer >= LEAK_FRACTION * checked


def leakage(
    codes: np.ndarray,
    train: np.ndarray,
    held_out: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    seed: int = 0,
) -> LeakageReport:
    """Check a split: are `held_out` rows (val or test) markedly closer to `train` rows than
    independent images are? `train` and `held_out` are boolean masks or index arrays into `codes`.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.standard_normal((400, 16)); y = np.arange(400) % 4
        >>> leakage(x, np.arange(300), np.arange(300, 400), y).leaky
        False
    """
    n = len(codes)
    tr, ho = (
        np.flatnonzero(m) if np.asarray(m).dtype == bool else np.asarray(m, dtype=np.int64)
        for m in (train, held_out)
    )
    if not len(tr) or not len(ho):
        raise UsageError(
            f"{OPTION}: the leakage check needs training and held-out rows "
            f"(got {len(tr)} and {len(ho)}); check the split"
        )
    rng = np.random.default_rng(seed)
    ho_s = _sample(ho, MAX_QUERIES, rng)
    x = codes if isinstance(codes, np.ndarray) else np.asarray(codes)
    idx, sim = nearest(x[ho_s], x[tr])
    if labels is not None:
        y = np.asarray(labels)
        if len(y) != n:
            raise ValueError(f"labels have {len(y)} rows, codes {n}")
        tr_s = _sample(tr, MAX_QUERIES, rng)
        _, ref = nearest(x[tr_s], x[tr], skip=(y[tr_s], y[tr]))
        ref = ref[np.isfinite(ref)]
    else:
        ref = np.empty(0, dtype=np.float32)
    if len(ref):
        cut, kind = reference_cut(ref), "other-class"
    else:
        cut, kind = DUP_SIMILARITY, "fixed"
    closer = int(np.sum(sim >= cut))
    best = int(np.argmax(sim)) if np.isfinite(sim).any() else -1
    return LeakageReport(
        checked=len(ho_s),
        closer=closer,
        fraction=closer / len(ho_s),
        cut=float(cut),
        reference=kind,
        quantiles=_quantiles(sim),
        reference_quantiles=_quantiles(ref),
        example=(int(ho_s[best]), int(tr[idx[best]])) if best >= 0 else None,
        leaky=is_leaky(closer, len(ho_s)),
    )


def pair_scores(groups: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Pairwise precision and recall of `groups` against `truth`: of the pairs put together, the share
    truly together; of the pairs truly together, the share put together (1.0 where there are none)."""
    g = np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
    t = np.unique(np.asarray(truth), return_inverse=True)[1].ravel()

    def pairs(counts: np.ndarray) -> float:
        return float(np.sum(counts * (counts - 1) / 2))

    both = pairs(np.unique(g * (t.max() + 1) + t, return_counts=True)[1])
    put, true = pairs(np.bincount(g)), pairs(np.bincount(t))
    return (both / put if put else 1.0), (both / true if true else 1.0)


def entry_layer(f) -> str:
    """The layer the checks use: the entry's deepest (not an ImageNet head added by bench)."""
    from featx.sources.autogroups import deepest

    return deepest({n: float(f.layer_meta(n).depth) for n in f.layers})


def check_rows(f, train: np.ndarray, held_out: np.ndarray, seed: int = 0) -> dict:
    """`leakage` on a codes file's (a `CodesFile`) deepest layer for these row indices, as a plain
    record: `leaky`, `leakage_fraction`, the counts, the cut, the layer, an example pair of paths
    with its similarity, and the seconds it took."""
    import time

    t0 = time.perf_counter()
    layer = entry_layer(f)
    rows = np.unique(np.concatenate([train, held_out]))  # one read of the rows involved
    X = f.codes(layer, rows)
    r = leakage(X, np.searchsorted(rows, train), np.searchsorted(rows, held_out), f.labels[rows], seed=seed)
    pair, sim = None, None
    if r.example is not None:
        a, b = r.example
        u = normalise(X[[a, b]])
        pair, sim = [f.paths[rows[a]], f.paths[rows[b]]], float(u[0] @ u[1])
    return {
        "leaky": r.leaky,
        "leakage_fraction": r.fraction,
        "leakage_rows": r.closer,
        "leakage_checked": r.checked,
        "leakage_cut": r.cut,
        "leakage_reference": r.reference,
        "leakage_layer": layer,
        "leakage_example": pair,
        "leakage_example_similarity": sim,
        "leakage_seconds": round(time.perf_counter() - t0, 3),
    }


def leak_check(path: str, protocol, train_size, seed: int = 0) -> dict | None:
    """`check_rows` for the rows a fit of `path` with this protocol, train size and seed validates
    and tests (val and test rows against its training rows); None when no rows can be selected
    (the fit reports why)."""
    from featx.classifiers.rows import select_rows
    from featx.errors import FeatxError
    from featx.store.codes import CodesFile

    with CodesFile(path) as f:
        try:
            rows = select_rows(f, protocol, train_size, seed)
            return check_rows(f, rows.train, np.concatenate([rows.val, rows.test]), seed)
        except (FeatxError, MemoryError):  # a check that cannot run never stops the fit: the fit says why
            return None


def leak_warning(record: dict, where: str) -> str:
    """The one warning line for a leaky record of `check_rows`."""
    pct = 100 * record["leakage_fraction"]
    pair = record["leakage_example"]
    example = (
        f"; e.g. {pair[1]} (train) and {pair[0]} (held out) at {record['leakage_example_similarity']:.3f}"
        if pair
        else ""
    )
    return (
        f"{where}: {record['leakage_rows']} of {record['leakage_checked']} validation/test rows ({pct:.1f}%) are "
        f"near-copies of training rows (cosine >= {record['leakage_cut']:.3f} on {record['leakage_layer']}{example}); "
        f"held-out scores are inflated: extract with --group-by auto, or --group-by REGEX naming what copies share"
    )
