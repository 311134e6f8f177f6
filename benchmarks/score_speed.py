"""How long featx.classifiers.scores takes per layer, against the straightforward reference versions in the same run.

    python benchmarks/score_speed.py                          # 10,000 x 2,048, 10 classes
    python benchmarks/score_speed.py --shapes 10000x2048x10,5000x512x100 --threads 2

Codes are synthetic float32 (class means plus noise, rectified like post-ReLU codes), as a codes file
holds them. Prints one row per shape and metric: featx's wall-clock and CPU seconds (best of
--rounds), the reference's (one round; it is slow), the ratio of CPU seconds (reference / featx; CPU
time counts the work whatever else runs on the machine, but with several BLAS threads it also counts
their spinning, so compare with --threads 1), and the two values side by side. They agree to
rounding, except the H-score: the reference's cov(E[f|y]) is np.cov's 1/(N-1), featx's 1/N, so those
differ by N/(N-1). `shared` is the step every metric needs (centring, covariance, banded reduction);
the `all` row, every metric at once, is what `featx score` pays per layer.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reference_scores import REFERENCES  # noqa: E402

from featx.classifiers import scores


def synthetic(n: int, d: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    X = rng.standard_normal((n, d), dtype=np.float32) + 0.5 * rng.standard_normal((c, d), dtype=np.float32)[y]
    return np.maximum(X + 0.3, 0.0), y


def best_of(fn, rounds: int) -> tuple[float, float, object]:
    """Best wall-clock and best CPU seconds over `rounds` calls, and the last result. CPU time counts
    every thread of this process, so on a machine other jobs share it still measures the work."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(rounds):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu, out


def run_shape(
    n: int, d: int, c: int, metrics: list[str], rounds: int, reference: bool, precision: str
) -> None:
    X, y = synthetic(n, d, c)
    label = f"{n} x {d} x {c}"
    w, cpu, _ = best_of(lambda: scores._Spectrum(X.astype(precision)), rounds)
    print(f"{label:>22}  {'shared':<9} {w:8.3f} {cpu:8.3f}")
    w_all, cpu_all, values = best_of(lambda: scores.score(X, y, metrics, precision), rounds)
    ref_wall = ref_cpu = 0.0
    for m in metrics:
        w, cpu, _ = best_of(lambda m=m: scores.score(X, y, [m], precision), rounds)
        if not reference:
            print(f"{label:>22}  {m:<9} {w:8.3f} {cpu:8.3f} {'-':>8} {'-':>8} {'-':>7}  {values[m]:14.6g}")
            continue
        rw, rc, ref = best_of(lambda m=m: REFERENCES[m](X, y), 1)
        ref_wall, ref_cpu = ref_wall + rw, ref_cpu + rc
        ratio = f"{rc / cpu:6.1f}x"
        print(
            f"{label:>22}  {m:<9} {w:8.3f} {cpu:8.3f} {rw:8.3f} {rc:8.3f} {ratio}  {values[m]:14.6g} {ref:15.6g}"
        )
    ratio = f"{ref_cpu / cpu_all:6.1f}x" if ref_cpu else f"{'-':>7}"
    refs = f"{ref_wall:8.3f} {ref_cpu:8.3f}" if ref_cpu else f"{'-':>8} {'-':>8}"
    print(f"{label:>22}  {'all':<9} {w_all:8.3f} {cpu_all:8.3f} {refs} {ratio}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="10000x2048x10", help="comma list of ROWSxDIMSxCLASSES")
    p.add_argument("--metrics", default=",".join(scores.METRICS))
    p.add_argument("--rounds", type=int, default=3, help="featx timings: best of this many")
    p.add_argument("--threads", type=int, help="BLAS threads (threadpoolctl); default: the library's")
    p.add_argument(
        "--precision",
        default="float64",
        choices=["float64", "float32"],
        help="of the covariance product (featx.classifiers.scores.score's precision)",
    )
    p.add_argument("--no-reference", action="store_true", help="skip the slow reference versions")
    args = p.parse_args(argv)
    from threadpoolctl import threadpool_info, threadpool_limits

    metrics = scores.parse_metrics(args.metrics)
    blas = ", ".join(f"{i['internal_api']} {i['num_threads']} threads" for i in threadpool_info())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"precision {args.precision}, cpus {os.cpu_count()}, BLAS: {blas}{f', limited to {args.threads}' if args.threads else ''}, "
        f"load average {load:.1f}"
    )
    header = (
        f"{'rows x dims x classes':>22}  {'metric':<9} {'wall s':>8} {'cpu s':>8} {'ref wall':>8} "
        f"{'ref cpu':>8} {'ratio':>7}  {'featx value':>14} {'reference value':>15}"
    )
    print(header)
    print("-" * len(header))
    with threadpool_limits(args.threads) if args.threads else contextlib.nullcontext():
        for shape in args.shapes.split(","):
            n, d, c = (int(v) for v in shape.lower().split("x"))
            run_shape(n, d, c, metrics, args.rounds, not args.no_reference, args.precision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
