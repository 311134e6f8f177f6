"""How fast featx's weighted k-NN predicts, against scikit-learn's closest equivalent, same data.

    python benchmarks/knn_speed.py                                  # 100,000 x 1,280 train, 10,000 queries
    python benchmarks/knn_speed.py --train 20000 --queries 2000     # a smaller run (seconds)
    python benchmarks/knn_speed.py --no-sklearn --no-float16        # featx's rows only

Synthetic codes with cluster structure: `--classes` class means in a 64-dimensional latent space,
rows scattered around them, sent through a fixed random linear map to `--dims` and rectified like
post-ReLU codes (as benchmarks/fit_speed.py makes them). Timed, on `--threads` BLAS and torch
threads:

- `products`: the floor, the blocked float32 similarity products alone (WeightedKNN's default blocks);
- `featx`: `WeightedKNN(k, T).fit(train)` then `.predict_proba(queries)` (predict is its argmax; fit
  is normalising the rows);
- `sklearn`: `KNeighborsClassifier(k, metric="cosine", algorithm="brute", weights=exp((1 - d) / T))`,
  cosine distance d = 1 - similarity, so the same neighbours and the same vote weights up to a
  constant factor: the same rule. `agree` is the fraction of queries both predict alike (ties and
  float rounding may differ), `ratio` sklearn's seconds over featx's (wall/cpu);
- `featx grid`: `grid_scores` over every (k, T) of `--ks` x `--temperatures` on the queries as
  validation rows (one neighbour search at max k), beside `cells x featx` (what fitting and
  predicting each cell separately would cost, estimated from the `featx` row at k);
- `float16`: the classifier saved with `to_arrays(codes_dtype="float16")` and loaded back, its
  predictions against the float32 classifier's (`agree`), and the saved codes' size.

Measured on this project's shared 2-core AMD EPYC CPU machine, with 4 other jobs running beside it,
so wall-clock seconds carry their noise and `cpu s` (this process's CPU seconds, both threads) is
the number to compare; `nice -n 19 python benchmarks/knn_speed.py`, run twice (same data, same
predictions):

    100,000 train x 1,280 dims, 10,000 queries, 100 classes, k=20, T=0.07, 2 threads
    method      wall s   cpu s       ratio   agree  test acc      (second run: wall s, cpu s, ratio)
    products      52.2    33.2           -       -         -      40.3  35.3
    featx         53.7    39.3           1  1.0000    0.6967      56.8  40.0  1
    sklearn       63.7    52.7   1.19/1.34  1.0000    0.6967     120.3  56.7  2.12/1.42
    float16       22.1    37.0           -  1.0000    0.6967      91.5  41.3
    float16: 244 MiB of codes saved against 488 MiB (float32); 0 of 10,000 predictions differ,
             probabilities by at most 4.3e-02 (both runs)
    featx grid: 12 cells (k 10,20,100,200 x T 0.02,0.07,0.2) in 32.1 s (43.3 cpu s), against ~472 cpu s
             for 12 x featx; best k=200 T=0.2 (val acc 0.7683)      (second run: 60.4 s, 44.6 cpu s)

(`ratio` is wall/cpu.) Reading: featx predicts 10,000 queries against 100,000 training rows in ~40
CPU seconds (so ~20 s of wall clock on 2 idle cores, an estimate), within 12-18% of the float32 matrix products
alone (`products`: 2.6e12 flops, ~75 GFLOP/s per core, near this CPU's peak): the product is the
floor and the top-k, tie check and votes add the rest. scikit-learn's brute cosine k-NN computes the
same products and is 1.3-1.4x featx's CPU time (its top-k is np.argpartition, sklearn/neighbors/
_base.py, measured 15x slower than torch.topk on a 256 x 100,000 block), with identical predictions on all 10,000 queries. The grid scores 12
(k, T) cells for about 1.1x one prediction's cost (one search at k = 200), ~11x cheaper than 12
separate fits. float16 copies: half the file, no prediction changed, probabilities within 0.043.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def synthetic(n: int, d: int, c: int, seed: int = 0, noise: float = 2.2) -> tuple[np.ndarray, np.ndarray]:
    """n rows of d post-ReLU-like float32 codes, c classes scattered around means in 64 latent dims."""
    rng = np.random.default_rng(seed)
    latent = 64
    y = rng.integers(0, c, n)
    means = np.random.default_rng(12345).normal(0, 1.0, (c, latent)).astype(np.float32)  # shared by all calls
    W = (np.random.default_rng(54321).normal(0, 1.0, (latent, d)) / np.sqrt(latent)).astype(np.float32)
    z = means[y] + rng.normal(0, noise, (n, latent)).astype(np.float32)
    X = z @ W
    X += rng.normal(0, 0.5, (n, d)).astype(np.float32)
    return np.maximum(X, 0.0, out=X), y


def timed(fn):
    """(wall seconds, CPU seconds of this process, all threads), fn()."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - t, time.process_time() - c), out


def products_only(X: np.ndarray, Q: np.ndarray) -> None:
    """The floor: the blocked float32 similarity products alone, as WeightedKNN blocks them by default."""
    from featx.classifiers.knn import QUERY_BLOCK, TRAIN_BLOCK

    A = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-30)
    B = Q / np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), 1e-30)
    for a in range(0, len(B), QUERY_BLOCK):
        for b in range(0, len(A), TRAIN_BLOCK):
            B[a : a + QUERY_BLOCK] @ A[b : b + TRAIN_BLOCK].T


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dims", type=int, default=1280)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--ks", default="10,20,100,200", help="the grid's k values")
    p.add_argument("--temperatures", default="0.02,0.07,0.2", help="the grid's T values")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-sklearn", action="store_true", help="skip scikit-learn's row (the slowest)")
    p.add_argument("--no-grid", action="store_true")
    p.add_argument("--no-float16", action="store_true")
    args = p.parse_args(argv)

    import torch
    from sklearn.neighbors import KNeighborsClassifier
    from threadpoolctl import threadpool_limits

    from featx.classifiers.knn import WeightedKNN, grid_scores

    torch.set_num_threads(args.threads)
    X, y = synthetic(args.train, args.dims, args.classes, seed=0)
    Q, yq = synthetic(args.queries, args.dims, args.classes, seed=1)
    k, T = args.k, args.temperature
    print(
        f"{args.train:,} train x {args.dims:,} dims, {args.queries:,} queries, {args.classes} classes, "
        f"k={k}, T={T}, {args.threads} threads"
    )
    rows = []
    with threadpool_limits(limits=args.threads):
        t_floor, _ = timed(lambda: products_only(X, Q))
        rows.append(("products", t_floor, None, None, None))
        t_featx, (clf, proba) = timed(lambda: (c := WeightedKNN(k, T).fit(X, y), c.predict_proba(Q)))
        pred = clf.classes_[proba.argmax(axis=1)]
        rows.append(("featx", t_featx, 1.0, 1.0, np.mean(pred == yq)))
        if not args.no_sklearn:
            weights = lambda d: np.exp((1.0 - d) / T)  # noqa: E731
            sk = KNeighborsClassifier(k, metric="cosine", algorithm="brute", weights=weights)
            t_sk, sk_pred = timed(lambda: sk.fit(X, y).predict(Q))
            ratio = t_sk[0] / t_featx[0], t_sk[1] / t_featx[1]
            rows.append(("sklearn", t_sk, ratio, np.mean(sk_pred == pred), np.mean(sk_pred == yq)))
        if not args.no_float16:
            arrays, params = clf.to_arrays(codes_dtype="float16")
            half = WeightedKNN.from_arrays(arrays, params)
            t_half, half_proba = timed(lambda: half.predict_proba(Q))
            half_pred = half.classes_[half_proba.argmax(axis=1)]
            rows.append(("float16", t_half, None, np.mean(half_pred == pred), np.mean(half_pred == yq)))
            proba_diff = float(np.abs(half_proba - proba).max())
            size = (arrays["codes"].nbytes / 2**20, clf.to_arrays()[0]["codes"].nbytes / 2**20)
        if not args.no_grid:
            ks = [int(v) for v in args.ks.split(",")]
            Ts = [float(v) for v in args.temperatures.split(",")]
            t_grid, grid = timed(lambda: grid_scores(X, y, Q, yq, ks, Ts))
            best = max(grid, key=lambda g: (g.val_score, g.val_tiebreak))
            cells = len(grid)
    print(f"{'method':<10} {'wall s':>7} {'cpu s':>7} {'ratio':>11} {'agree':>7} {'test acc':>9}")
    for name, (wall, cpu), ratio, agree, acc in rows:
        r = f"{ratio[0]:.2f}/{ratio[1]:.2f}" if isinstance(ratio, tuple) else ("1" if ratio else "-")
        a, t = ("-", "-") if agree is None else (f"{agree:.4f}", f"{acc:.4f}")
        print(f"{name:<10} {wall:7.1f} {cpu:7.1f} {r:>11} {a:>7} {t:>9}")
    if not args.no_float16:
        print(
            f"float16: {size[0]:.0f} MiB of codes saved against {size[1]:.0f} MiB (float32); "
            f"{int(round((1 - rows[-1][3]) * args.queries))} of {args.queries:,} predictions differ, "
            f"probabilities by at most {proba_diff:.1e}"
        )
    if not args.no_grid:
        print(
            f"featx grid: {cells} cells (k {args.ks} x T {args.temperatures}) in {t_grid[0]:.1f} s "
            f"({t_grid[1]:.1f} cpu s), against ~{cells * t_featx[1]:.0f} cpu s for {cells} x featx; "
            f"best k={best.k} T={best.temperature} "
            f"(val acc {best.val_score:.4f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
