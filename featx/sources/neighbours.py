"""Similarity search for near-duplicates: the nearest row per query, and every pair above a threshold.

Both searches compare L2-normalised rows by cosine similarity and have two methods, chosen by size
(`method="auto"`; `"exact"` or `"approximate"` force one):

- **Exact**: float32 matrix products over blocks of rows (`BLOCK_ELEMENTS` similarities at a time).
  Costs queries x references x dims multiply-adds: fine up to a few thousand rows, minutes at 10^5.
- **Approximate, for the nearest row** (`nearest`, above `EXACT_NEAREST_PRODUCTS` query x reference
  products): rows are projected onto the top `PROJECT_DIMS` principal directions of (a sample of)
  the reference rows (a randomized SVD of the uncentred unit rows, so dot products are what it
  keeps), the `CANDIDATES` best references per query are taken in that space, and those candidates
  are re-ranked with exact full-dimension cosines. The similarity returned is always exact; only the
  choice of row can differ from the exact search, when the true nearest row is not among the
  candidates.
- **Approximate, for pairs above a threshold** (`similar_pairs`, above `EXACT_PAIR_ROWS` rows): an
  inverted file. The projected rows are clustered by spherical k-means (`CLUSTERS_PER_ROOT` x
  sqrt(rows) clusters, fitted on a sample); each row belongs to its closest cluster and searches its
  `PROBES` closest ones; there a pair whose cosine in the projection reaches the threshold less
  `MARGIN` is checked in full dimension. A pair is found when one row's cluster is among the
  other's probes and its projected cosine is within the margin, which near-copies (similar in every
  direction) almost always are; a found pair's similarity is exact, so there are no false pairs,
  only (rarely) missed ones. Cost: about rows x PROBES x (rows / clusters) x PROJECT_DIMS, i.e.
  rows^1.5, plus a full-dimension product per candidate pair.

Both approximate methods are deterministic: the same codes in the same order give the same result
(the samples and the k-means start are seeded). Measured recall and speed against the exact
methods: `benchmarks/near_duplicates_speed.py` and docs/near-duplicates.md.
"""

from __future__ import annotations

import numpy as np

from featx.errors import FeatxError, UsageError

BLOCK_ELEMENTS = 1 << 25  # similarities held at once per block (128 MiB of float32); bounds memory
EXACT_NEAREST_PRODUCTS = 1 << 26  # queries x references up to which `nearest` is exact (~0.5 s at 1,280 dims)
EXACT_PAIR_ROWS = 5_000  # rows up to which `similar_pairs` is exact (~1 s at 1,280 dims)
PROJECT_DIMS = 128  # dimensions of the projection the approximate methods search in
CANDIDATES = 16  # references per query re-ranked exactly by the approximate `nearest`
CLUSTERS_PER_ROOT = 2.0  # clusters of the approximate `similar_pairs`: this x sqrt(rows)
PROBES = 4  # clusters each row searches in the approximate `similar_pairs`
MARGIN = 0.05  # a pair is checked in full dimension when its projected cosine is >= threshold - this
SAMPLE_ROWS = 4_096  # rows the projection is fitted on
KMEANS_ITERATIONS = 8
METHODS = ("auto", "exact", "approximate")


def normalise(codes: np.ndarray) -> np.ndarray:
    """Rows as float32 unit vectors (an all-zero row stays zero: similarity 0 to everything).
    NaN or infinite codes are a FeatxError naming how many rows have them."""
    x = np.asarray(codes, dtype=np.float32)
    if x.ndim != 2:
        raise UsageError(
            f"codes: expected a 2-D array [rows, dims], got shape {x.shape}; pass one layer's codes"
        )
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise FeatxError(
            f"codes: {int(bad.sum())} of {len(x)} rows have NaN or infinite values "
            f"(first: row {int(np.argmax(bad))}); re-extract them or drop those rows"
        )
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


def projection(x: np.ndarray, dims: int = PROJECT_DIMS, seed: int = 0) -> np.ndarray:
    """A [D, dims] float32 basis of the top principal directions of unit rows `x` (uncentred, so
    dot products are what the projection keeps), by a randomized SVD of at most `SAMPLE_ROWS` rows.
    The identity when `x` has no more than `dims` dimensions."""
    n, d = x.shape
    if d <= dims:
        return np.eye(d, dtype=np.float32)
    rng = np.random.default_rng(seed)
    s = x if n <= SAMPLE_ROWS else x[np.sort(rng.choice(n, SAMPLE_ROWS, replace=False))]
    y = s.T @ (s @ rng.standard_normal((d, dims + 16)).astype(np.float32))  # [d, dims + 16]
    for _ in range(1):  # a power iteration sharpen the range
        y, _ = np.linalg.qr(y)
        y = s.T @ (s @ y)
    q, _ = np.linalg.qr(y)
    z = s @ q
    _, v = np.linalg.eigh((z.T @ z).astype(np.float64))  # the right singular vectors of s within q's range
    return np.ascontiguousarray(q @ v[:, ::-1][:, :dims].astype(np.float32))


def nearest(
    queries: np.ndarray,
    refs: np.ndarray | None = None,
    *,
    skip: tuple[np.ndarray, np.ndarray] | None = None,
    block: int | None = None,
    method: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the index of the most similar `refs` row and that cosine similarity.

    `refs=None` searches the queries themselves with each row's own match skipped. `skip=(q_keys,
    r_keys)` skips every ref whose key equals the query's (labels: the nearest row of another class;
    groups: the nearest row of another group). A query with no candidate gets index -1 and
    similarity NaN. Ties go to the lowest index. `block` queries per matrix product (default: as
    many as keep `BLOCK_ELEMENTS` similarities). `method`: "exact" (equal to the brute-force
    product), "approximate" (projected candidates re-ranked exactly: module docstring) or "auto"
    (exact up to `EXACT_NEAREST_PRODUCTS` query x reference pairs).

    Examples:
        >>> x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> nearest(x)[0].tolist()
        [1, 0, 1]
    """
    self_search = refs is None
    q = normalise(queries)
    r = q if self_search else normalise(refs)
    if q.shape[1] != r.shape[1]:
        raise UsageError(
            f"codes: queries have {q.shape[1]} dims, references {r.shape[1]}; use one layer for both"
        )
    nq, nr = len(q), len(r)
    qk = rk = None
    if skip is not None:
        qk, rk = (np.asarray(k) for k in skip)
        if len(qk) != nq or len(rk) != nr:
            raise ValueError("skip keys must have one entry per query and per reference row")
    index = np.full(nq, -1, dtype=np.int64)
    sim = np.full(nq, np.nan, dtype=np.float32)
    if nr == 0:
        return index, sim
    how = _method(method)
    if how == "auto":
        how = "exact" if nq * nr <= EXACT_NEAREST_PRODUCTS or r.shape[1] <= PROJECT_DIMS else "approximate"
    if how == "approximate":
        return _projected_nearest(q, r, qk, rk, self_search, index, sim)
    step = max(1, block or BLOCK_ELEMENTS // max(nr, 1))
    for start in range(0, nq, step):
        stop = min(start + step, nq)
        s = q[start:stop] @ r.T  # [b, nr] float32
        if self_search:
            rows = np.arange(stop - start)
            s[rows, rows + start] = -np.inf
        if qk is not None:
            s[qk[start:stop, None] == rk[None, :]] = -np.inf
        best = np.argmax(s, axis=1)
        top = s[np.arange(stop - start), best]
        ok = np.isfinite(top)
        index[start:stop] = np.where(ok, best, -1)
        sim[start:stop] = np.where(ok, top, np.nan)
    return index, sim


def _top_k(s: np.ndarray, k: int, chunk: int = 64) -> np.ndarray:
    """The column indices of the `k` largest values of each row of `s` [b, n] (in no order). Rows are
    cut into chunks of `chunk` columns; the k largest values lie in the k chunks with the largest
    maxima, so only those chunks' k x chunk columns are partitioned (a max over the block is a much
    cheaper pass than a partition of it)."""
    b, n = s.shape
    if n <= k:
        return np.broadcast_to(np.arange(n), (b, n)).copy()
    if n < 4 * k * chunk:
        return np.argpartition(s, n - k, axis=1)[:, n - k :]
    whole = n // chunk * chunk
    maxima = s[:, :whole].reshape(b, -1, chunk).max(axis=2)
    if whole < n:
        maxima = np.concatenate([maxima, s[:, whole:].max(axis=1, keepdims=True)], axis=1)
    best = np.argpartition(maxima, maxima.shape[1] - k, axis=1)[:, -k:]  # [b, k] chunk numbers
    cols = (best[:, :, None] * chunk + np.arange(chunk)).reshape(b, -1)
    cols = np.minimum(cols, n - 1)  # the short last chunk repeats its last column: harmless
    vals = np.take_along_axis(s, cols, 1)
    return np.take_along_axis(cols, np.argpartition(vals, vals.shape[1] - k, axis=1)[:, -k:], 1)


def _projected_nearest(q, r, qk, rk, self_search, index, sim):
    """`nearest` by candidates in the projection, re-ranked in full dimension (module docstring)."""
    basis = projection(r)
    rp = r @ basis
    qp = rp if self_search else q @ basis
    nq, nr = len(q), len(r)
    k = min(CANDIDATES, nr)
    step = max(1, BLOCK_ELEMENTS // nr)
    for start in range(0, nq, step):
        stop = min(start + step, nq)
        rows = np.arange(stop - start)
        s = qp[start:stop] @ rp.T
        if self_search:
            s[rows, rows + start] = -np.inf
        if qk is not None:
            s[qk[start:stop, None] == rk[None, :]] = -np.inf
        cand = np.sort(_top_k(s, k), axis=1)  # ties of the exact cosine go to the lowest index
        valid = np.isfinite(np.take_along_axis(s, cand, 1))  # masked: fewer than k valid refs exist
        exact = np.einsum("bd,bkd->bk", q[start:stop], r[cand])
        exact[~valid] = -np.inf
        best = np.argmax(exact, axis=1)
        top = exact[rows, best]
        ok = np.isfinite(top)
        index[start:stop] = np.where(ok, cand[rows, best], -1)
        sim[start:stop] = np.where(ok, top, np.nan)
    return index, sim


def similar_pairs(
    codes: np.ndarray, threshold: float, *, block: int | None = None, method: str = "auto"
) -> np.ndarray:
    """Every pair (i < j) of rows with cosine similarity >= `threshold`, as an int64 [P, 2] array in
    row order. `method`: "exact" (the upper triangle in blocks like `nearest`), "approximate" (an
    inverted file: module docstring; every pair it returns is above the threshold, a few may be
    missed) or "auto" (exact up to `EXACT_PAIR_ROWS` rows)."""
    x = normalise(codes)
    n = len(x)
    how = _method(method)
    if how == "auto":
        how = "exact" if n <= EXACT_PAIR_ROWS else "approximate"
    if how == "approximate" and n > 1:
        return _ivf_pairs(x, threshold)
    step = max(1, block or BLOCK_ELEMENTS // max(n, 1))
    found = []
    for start in range(0, n, step):
        stop = min(start + step, n)
        s = x[start:stop] @ x[start:].T  # [b, n - start]: this block against itself and later rows
        i, j = np.nonzero(s >= threshold)
        keep = j > i  # the strict upper triangle (j is relative to start, as i is)
        found.append(np.stack([i[keep] + start, j[keep] + start], axis=1))
    return np.concatenate(found).astype(np.int64) if found else np.empty((0, 2), dtype=np.int64)


def _kmeans(xp: np.ndarray, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """Spherical k-means centroids [clusters, d] of unit rows `xp`, fitted on a sample."""
    n = len(xp)
    fit = xp if n <= 40 * clusters else xp[np.sort(rng.choice(n, 40 * clusters, replace=False))]
    cent = fit[np.sort(rng.choice(len(fit), clusters, replace=False))].copy()
    for _ in range(KMEANS_ITERATIONS):
        assign = _top_clusters(fit, cent, 1)[:, 0]
        sums = np.zeros_like(cent)
        np.add.at(sums, assign, fit)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        cent = np.where(norms > 0, sums / np.where(norms > 0, norms, 1.0), cent)  # an empty cluster stays
    return cent


def _top_clusters(xp: np.ndarray, cent: np.ndarray, p: int) -> np.ndarray:
    """The `p` most similar centroids of each row, most similar first, [rows, p]."""
    out = np.empty((len(xp), p), dtype=np.int64)
    step = max(1, BLOCK_ELEMENTS // max(len(cent), 1))
    for start in range(0, len(xp), step):
        s = xp[start : start + step] @ cent.T
        if p == 1:
            out[start : start + step, 0] = np.argmax(s, axis=1)
            continue
        part = np.argpartition(-s, p - 1, axis=1)[:, :p]
        order = np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable")
        out[start : start + step] = np.take_along_axis(part, order, 1)
    return out


def _ivf_pairs(x: np.ndarray, threshold: float, seed: int = 0) -> np.ndarray:
    """`similar_pairs` by an inverted file (module docstring): exact similarities within probed clusters."""
    n = len(x)
    rng = np.random.default_rng(seed)
    xp = normalise(x @ projection(x, seed=seed))
    clusters = int(min(n, max(1, round(CLUSTERS_PER_ROOT * np.sqrt(n)))))
    p = min(PROBES, clusters)
    probes = _top_clusters(xp, _kmeans(xp, clusters, rng), p)
    home = probes[:, 0]
    members = np.argsort(home, kind="stable")
    m_bounds = np.concatenate([[0], np.cumsum(np.bincount(home, minlength=clusters))])
    flat = probes.ravel()
    probers = np.argsort(flat, kind="stable") // p  # the rows probing each cluster, in row order
    q_bounds = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=clusters))])
    found = []
    for c in range(clusters):
        mem = members[m_bounds[c] : m_bounds[c + 1]]
        qs = probers[q_bounds[c] : q_bounds[c + 1]]
        if not len(mem) or not len(qs):
            continue
        xm = xp[mem]
        step = max(1, BLOCK_ELEMENTS // len(mem))
        for start in range(0, len(qs), step):
            qb = qs[start : start + step]
            i, j = np.nonzero(xp[qb] @ xm.T >= threshold - MARGIN)  # candidates, in the projection
            a, b = qb[i], mem[j]
            keep = a != b
            a, b = np.minimum(a, b)[keep], np.maximum(a, b)[keep]  # duplicates go at the end
            exact = np.einsum("ij,ij->i", x[a], x[b]) >= threshold  # the full-dimension check
            found.append(np.stack([a[exact], b[exact]], axis=1))
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(found).astype(np.int64)
    codes = np.unique(pairs[:, 0] * n + pairs[:, 1])  # each pair once, in row order
    return np.stack([codes // n, codes % n], axis=1)
