"""`--group-by auto[:T]`: groups of near-duplicate images found in their codes, and featx's own split
redone around them, so that copies of one image never sit on both sides of a split.

How the groups apply (the design): `--group-by auto` names no groups before extraction, because
groups come from codes and codes from extraction. Which side of a split an image lands on does not
change its codes, so featx extracts every image as usual and, just before the entry is finalized
(`engine.extract` calls `cutting.regroup_journal`), reads the deepest tapped layer (`deepest`: the largest relative depth up to
1.0, so not an ImageNet head added by `bench`) from the journal and joins rows whose codes have
cosine similarity >= T (default `DUP_SIMILARITY`) into groups, transitively (`auto_groups`). For
data without split folders, featx's seeded train/test split is then recomputed from these groups
(`cutting.seeded_split` with `--seed` and `--test-fraction`: whole groups held out, stratified as
closely as whole groups allow), and the entry stores `/groups` and that split. From there on the
entry is like one made with `--group-by REGEX`: fit and bench hold out whole groups and use
grouped CV folds. Given split folders stay as given; a warning says how many groups cross them.

- Deterministic: group ids depend only on the codes and T (numbered by first row), the split on the
  groups, labels, seed and test fraction; a crash before finalizing recomputes the same result.
- Cached: `auto:T` (T resolved, so `auto` and `auto:0.9` are one entry) enters the dataset
  fingerprint and thus the cache key; entries made without it keep their keys.
- Refused, one line each (exit 2): T outside (0, 1]; data where no class has two images; codes
  that make one group of every row (identical codes, or a T so low everything chains); a split
  with no test or no train image left; per-split `--per-class-limit` on data without split folders
  (those limits cut a split that only exists after extraction).

`auto_groups` lives here, below the engine that calls it; the pair search it runs (`similar_pairs`:
exact below `neighbours.EXACT_PAIR_ROWS` rows, an inverted file above) is in `featx.sources.neighbours`.
`featx.classifiers.neardup` re-exports them beside the leakage check, and its docstring and
docs/near-duplicates.md give the measurements behind `DUP_SIMILARITY`.
"""

from __future__ import annotations

import numpy as np

from featx.errors import UsageError
from featx.sources.neighbours import similar_pairs

DUP_SIMILARITY = 0.90  # `--group-by auto`'s default threshold, for the deepest layer: best mean pairwise F1 on generated copies
OPTION = "--group-by auto"  # how errors name the feature
AUTO = "auto"  # `--group-by auto` or `auto:T`


def check_threshold(threshold: float) -> float:
    """A similarity threshold in (0, 1], or a UsageError naming the option."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise UsageError(
            f"{OPTION}: threshold {threshold!r} is not a number; use a cosine similarity "
            f"in (0, 1], e.g. {DUP_SIMILARITY}"
        ) from None
    if not 0.0 < t <= 1.0:
        raise UsageError(
            f"{OPTION}: threshold {threshold!r} is outside (0, 1]; use a cosine similarity "
            f"such as {DUP_SIMILARITY}"
        )
    return t


def auto_groups(
    codes: np.ndarray, threshold: float = DUP_SIMILARITY, *, block: int | None = None, method: str = "auto"
) -> np.ndarray:
    """A group id per row: rows whose codes have cosine similarity >= `threshold` share a group,
    joined transitively. Ids count from 0 in order of each group's first row, so they depend only on
    the codes and the threshold. Errors (one line, naming `--group-by auto`): a threshold outside
    (0, 1], fewer than 2 rows, NaN codes, and codes that make one group of every row (identical
    codes, or a threshold so low that everything chains together: nothing could be split).

    Examples:
        >>> x = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
        >>> auto_groups(x, 0.99).tolist()
        [0, 0, 1, 1]
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    t = check_threshold(threshold)
    x = np.asarray(codes)
    if x.ndim != 2 or len(x) < 2:
        raise UsageError(
            f"{OPTION}: needs at least 2 rows of 2-D codes, got shape {x.shape}; check the data and the layer"
        )
    pairs = similar_pairs(x, t, block=block, method=method)
    n = len(x)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    # renumber by first appearance: connected_components' numbering is an implementation detail
    _, first, inverse = np.unique(comp, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    groups = order[inverse].astype(np.int64)
    if groups.max() == 0:
        same = bool(np.all(x == x[0]))
        why = "all rows have identical codes" if same else f"at threshold {t} every row chains into one group"
        fix = "check the layer and the images" if same else "raise the threshold"
        raise UsageError(f"{OPTION}: {why}, so there is nothing to split; {fix}")
    return groups


def threshold_of(group_by: str | None) -> float | None:
    """The similarity threshold of `--group-by auto[:T]` (`DUP_SIMILARITY` for plain `auto`), or
    None for a regex or no grouping."""
    if not group_by or (group_by != AUTO and not group_by.startswith(AUTO + ":")):
        return None
    return DUP_SIMILARITY if group_by == AUTO else check_threshold(group_by.partition(":")[2])


def fingerprint_part(threshold: float) -> bytes:
    """What `--group-by auto:T` adds to the dataset fingerprint (so to the cache key)."""
    return f"group_by\0auto:{float(threshold)!r}".encode()


def check_source(labels: np.ndarray, has_splits: bool, per_class_limit) -> None:
    """Refuse, before any extraction, what auto groups cannot work with."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    if len(labels) and counts.max() < 2:
        raise UsageError(
            f"{OPTION}: every class has a single image, so no split can test a class it trained "
            "on; give classes two or more images"
        )
    if isinstance(per_class_limit, dict) and not has_splits:
        raise UsageError(
            f"{OPTION}: --per-class-limit per split ({', '.join(per_class_limit)}) cuts featx's "
            "split, which auto groups only make after extraction; use one K per class or split folders"
        )


def deepest(depths: dict[str, float]) -> str:
    """The deepest layer whose relative depth is at most 1.0 (not an ImageNet head), else the deepest."""
    inside = {n: d for n, d in depths.items() if d <= 1.0}
    pool = inside or depths
    return max(pool, key=lambda n: (pool[n], list(depths).index(n)))


def describe(groups: np.ndarray) -> str:
    """`N images in G groups (K of 2+ images, holding M; largest L)` for notes and `featx info`."""
    _, sizes = np.unique(np.asarray(groups), return_counts=True)
    multi = sizes[sizes > 1]
    return (
        f"{len(groups)} images in {len(sizes)} groups ({len(multi)} of 2+ images, holding {int(multi.sum())}; "
        f"largest {int(sizes.max()) if len(sizes) else 0})"
    )
