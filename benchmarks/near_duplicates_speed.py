"""Speed and recall of the near-duplicate searches (featx.sources.neighbours): exact against approximate.

Synthetic codes shaped like a deep layer's: 20 classes in a 64-dim latent space mapped to `--dims`
(1,280) dims, per-dimension noise, ReLU'd (all positive, as after a ReLU: unrelated rows reach
cosine ~0.7 within a class). `--copy-fraction` (30%) of the rows are near-copies of another row
(noise added before the ReLU; cosine to their source 0.8-0.997, so many pairs sit near 0.9).

For each size, both methods of:

- `similar_pairs` at T (0.90) and the groups `auto_groups` makes of them (what `--group-by auto`
  runs at the end of extraction): seconds, the recall of the exact pairs (the approximate method
  returns no false pairs: every pair's similarity is exact), and the pairwise precision / recall
  of the approximate groups against the exact groups;
- `nearest` as the leakage check runs it (`MAX_QUERIES` held-out rows against the 80% training
  rows, and training rows against training rows of another class): seconds, the share of queries
  given the same row as the exact search, and the largest similarity shortfall.

    python benchmarks/near_duplicates_speed.py                         # 10^4, 3x10^4, 10^5 rows
    python benchmarks/near_duplicates_speed.py --rows 10000 --exact-max 10000
    python benchmarks/near_duplicates_speed.py --exact-max 30000       # exact at 10^5 projected (rows^2)

Without `--exact-max` the exact method runs at every size (several minutes at 10^5 rows on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from featx.classifiers.neardup import MAX_QUERIES, pair_scores  # noqa: E402
from featx.sources.autogroups import DUP_SIMILARITY, auto_groups  # noqa: E402
from featx.sources.neighbours import nearest, similar_pairs  # noqa: E402


def planted(n: int, dims: int = 1280, seed: int = 0, copy_fraction: float = 0.3, classes: int = 20):
    """Synthetic ReLU codes [n, dims] with labels and each row's source (its own index, or the row
    it is a near-copy of)."""
    rng = np.random.default_rng(seed)
    latent = 64
    w = rng.standard_normal((latent, dims)).astype(np.float32) / np.sqrt(latent)
    means = rng.standard_normal((classes, latent)).astype(np.float32)
    y = rng.integers(0, classes, n)
    pre = (means[y] + rng.standard_normal((n, latent)).astype(np.float32)) @ w
    pre += 0.7 * rng.standard_normal((n, dims)).astype(np.float32)
    source = np.arange(n)
    k = int(copy_fraction * n)
    copies = rng.choice(n, k, replace=False)
    src = rng.choice(np.setdiff1d(np.arange(n), copies), k)
    scale = rng.uniform(0.15, 1.0, k).astype(np.float32)[:, None]
    pre[copies] = pre[src] + scale * rng.standard_normal((k, dims)).astype(np.float32)
    y[copies], source[copies] = y[src], src
    return np.maximum(pre, 0), y, source


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def components(pairs: np.ndarray, n: int) -> np.ndarray:
    """Connected components of the pair graph (what `auto_groups` makes of the pairs)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def run_size(n: int, args) -> dict:
    x, y, _ = planted(n, args.dims, args.seed)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(n)
    tr, ho = np.sort(perm[: int(0.8 * n)]), perm[int(0.8 * n) :]
    q = np.sort(ho if len(ho) <= MAX_QUERIES else rng.choice(ho, MAX_QUERIES, replace=False))
    qr = np.sort(rng.choice(tr, min(MAX_QUERIES, len(tr)), replace=False))
    xt = x[tr]
    rec = {"rows": n}
    ga, ta = timed(lambda: auto_groups(x, args.threshold, method="approximate"))
    pa, tpa = timed(lambda: similar_pairs(x, args.threshold, method="approximate"))
    (ia, sa), tna = timed(lambda: nearest(x[q], xt, method="approximate"))
    (ira, sra), tra = timed(lambda: nearest(x[qr], xt, skip=(y[qr], y[tr]), method="approximate"))
    rec.update(
        groups_new=ta, pairs_new=tpa, nearest_new=tna + tra, n_pairs_new=len(pa), n_groups=int(ga.max()) + 1
    )
    if n <= args.exact_max:
        (pe, ge), te = timed(
            lambda: (p := similar_pairs(x, args.threshold, method="exact"), components(p, n))
        )
        (ie, se), tne = timed(lambda: nearest(x[q], xt, method="exact"))
        (ire, sre), tre = timed(lambda: nearest(x[qr], xt, skip=(y[qr], y[tr]), method="exact"))
        e = set(map(tuple, pe.tolist()))
        a = set(map(tuple, pa.tolist()))
        prec, rec_g = pair_scores(ga, ge)
        rec.update(
            groups_exact=te,
            nearest_exact=tne + tre,
            n_pairs_exact=len(pe),
            pair_recall=len(e & a) / max(1, len(e)),
            false_pairs=len(a - e),
            group_precision=prec,
            group_recall=rec_g,
            nn_same=float(np.mean(np.concatenate([ia == ie, ira == ire]))),
            nn_shortfall=float(np.nanmax(np.concatenate([se - sa, sre - sra]))),
            projected=False,
        )
    return rec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="10000,30000,100000")
    ap.add_argument("--dims", type=int, default=1280)
    ap.add_argument("--threshold", type=float, default=DUP_SIMILARITY)
    ap.add_argument("--exact-max", type=int, default=10**9, help="largest size the exact methods run at")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.rows.split(",")]
    recs = []
    for n in sizes:
        recs.append(run_size(n, args))
        print(recs[-1], file=sys.stderr, flush=True)
    measured = [r for r in recs if "groups_exact" in r]
    for r in recs:  # exact seconds beyond --exact-max: the largest measured size, scaled
        if "groups_exact" not in r and measured:
            m = measured[-1]
            r.update(
                groups_exact=m["groups_exact"] * (r["rows"] / m["rows"]) ** 2,
                nearest_exact=m["nearest_exact"] * r["rows"] / m["rows"],
                projected=True,
            )
    print(
        f"\n{args.dims} dims, T = {args.threshold}; seconds (exact / new / ratio); * = projected, not run\n"
    )
    print(
        "| rows | auto groups exact | auto groups new | ratio | pair recall | false pairs | group P / R "
        "| leakage nearest exact | new | ratio | same nearest row | largest shortfall |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in recs:
        star = "*" if r.get("projected") else ""
        ge, ne = r.get("groups_exact"), r.get("nearest_exact")
        cells = [
            f"{r['rows']:,}",
            f"{ge:.1f}{star}" if ge else "-",
            f"{r['groups_new']:.2f}",
            f"{ge / r['groups_new']:.0f}x" if ge else "-",
            f"{r['pair_recall']:.5f} ({r['n_pairs_exact']:,})" if "pair_recall" in r else "-",
            str(r.get("false_pairs", "-")),
            f"{r['group_precision']:.4f} / {r['group_recall']:.4f}" if "group_recall" in r else "-",
            f"{ne:.2f}{star}" if ne else "-",
            f"{r['nearest_new']:.2f}",
            f"{ne / r['nearest_new']:.1f}x" if ne else "-",
            f"{r['nn_same']:.4f}" if "nn_same" in r else "-",
            f"{r['nn_shortfall']:.4f}" if "nn_shortfall" in r else "-",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
