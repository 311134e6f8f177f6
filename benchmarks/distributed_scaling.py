#!/usr/bin/env python
"""How does one `featx extract` scale with the number of torchrun ranks?

For each world size in `--nproc` (default 1,2) it runs, in a fresh cache directory,

    python -m torch.distributed.run --standalone --nproc-per-node N -m featx extract ...

on the same images, model and settings, and reports the job's rate as rank 0 logs it ("wrote
... (X images/s)": images computed / seconds from the first batch until every rank has committed
its rows and rank 0 holds them all, so it is the whole job's rate, not one rank's), the wall time
of the command (interpreter and torch start, model build, assembly included) and the ratio of each
rate to the first world size's.

On a CPU machine the ranks share the cores: each rank gets `--threads` torch threads (default:
cores // N, so every world size uses the whole machine once), so the ratio shows the cost of the
distributed path itself (start-up, per-rank model, smaller batches per core, assembly) rather than
a speed-up, which needs a device per rank:

    python benchmarks/distributed_scaling.py --limit 400                    # this CPU machine
    python benchmarks/distributed_scaling.py --nproc 1,2,4,8 --device cuda --batch-size 128 \\
        --model resnet50 --image-size 224 --limit 20000                   # a node with 8 GPUs
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = re.compile(r"wrote \S+: (\d+) rows .* \(([\d.]+) images/s\)")


def _subset(src: str, limit: int | None, dst: str) -> str:
    """A folder of symlinks to the first `limit` images of `src`, round-robin over its classes."""
    if not limit:
        return src
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    files = {c: sorted(os.listdir(os.path.join(src, c))) for c in classes}
    taken = 0
    for k in range(max(len(v) for v in files.values())):
        for c in classes:
            if taken < limit and k < len(files[c]):
                os.makedirs(os.path.join(dst, c), exist_ok=True)
                os.symlink(os.path.join(src, c, files[c][k]), os.path.join(dst, c, files[c][k]))
                taken += 1
    return dst


def run_one(args, data: str, nproc: int, cache: str) -> dict:
    threads = args.threads or max(1, (os.cpu_count() or 1) // nproc)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "featx",
        "extract",
        "--model",
        args.model,
        "--weights",
        args.weights,
        "--data",
        data,
        "--image-size",
        str(args.image_size),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--precision",
        args.precision,
        "--device",
        args.device,
        "--cache-dir",
        cache,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    m = RATE.search(r.stderr)
    if r.returncode != 0 or m is None:
        sys.exit(f"world size {nproc} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return {
        "nproc": nproc,
        "threads": threads,
        "rows": int(m.group(1)),
        "rate": float(m.group(2)),
        "wall": wall,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "datasets", "flowers5_128"))
    p.add_argument("--limit", type=int, default=400, help="the first N images (0: all)")
    p.add_argument("--nproc", default="1,2", help="world sizes to compare, e.g. 1,2,4,8")
    p.add_argument("--model", default="resnet18")
    p.add_argument(
        "--weights", default="none", help="none: random init (speed does not depend on the values)"
    )
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", default="0", help="data-loader workers per rank")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores // world size)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (each rank takes cuda:LOCAL_RANK)")
    p.add_argument(
        "--repeats", type=int, default=1, help="runs per world size, interleaved; the best is kept"
    )
    args = p.parse_args(argv)
    nprocs = [int(x) for x in args.nproc.split(",")]
    with tempfile.TemporaryDirectory(prefix="featx-dist-") as tmp:
        data = _subset(os.path.abspath(args.data), args.limit, os.path.join(tmp, "data"))
        best: dict[int, dict] = {}
        for rep in range(args.repeats):
            for n in nprocs:
                res = run_one(args, data, n, os.path.join(tmp, f"cache-{n}-{rep}"))
                if n not in best or res["rate"] > best[n]["rate"]:
                    best[n] = res
    print(
        f"{args.model} {args.image_size}px batch {args.batch_size} {args.precision} on {args.device}, "
        f"{best[nprocs[0]]['rows']} images, {os.cpu_count()} cores"
    )
    print(f"{'ranks':>5} {'threads/rank':>12} {'images/s':>9} {'wall s':>7} {'ratio':>6}")
    for n in nprocs:
        b = best[n]
        print(
            f"{n:>5} {b['threads']:>12} {b['rate']:>9.1f} {b['wall']:>7.1f} {b['rate'] / best[nprocs[0]]['rate']:>6.2f}"
        )


if __name__ == "__main__":
    main()
