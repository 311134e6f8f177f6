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

`--assembly-only` times only the step after the ranks are done, offline and without torch: it
writes synthetic rank shards (journals of `--rows` x `--dim` float16 codes, ReLU'd Gaussian, so
about half are zeros as in real codes) and assembles them both ways: `copy` (rank 0 copies every
row into one gzip'ed HDF5 file, featx's assembly before part files) and `virtual` (each rank
seals its shards into a part file, the W ranks as W processes at once, then rank 0 writes the
entry whose codes are virtual datasets over the parts). Both entries are then checked equal:

    python benchmarks/distributed_scaling.py --assembly-only --rows 100000,1000000 --nproc 2
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


def _synthetic_shards(entry: str, rows: int, dim: int, world: int, seed: int = 0) -> dict:
    """W journal shards of `rows` synthetic float16 codes, as W ranks leave them; the journal meta."""
    import numpy as np

    from featx.engine.distributed import row_slice, shard_dir, shard_meta
    from featx.store.journal import Journal

    meta = {"key": "synthetic", "layers": [["codes", dim]], "dtype": "float16", "samples": rows}
    meta.update(batch_size=4096, featx="bench")
    rng = np.random.default_rng(seed)
    for r in range(world):
        a, b = row_slice(rows, world, r)
        j = Journal.open(shard_dir(entry, a), shard_meta(meta, a, b))
        for start in range(a, b, 4096):
            stop = min(b, start + 4096)
            x = np.maximum(rng.standard_normal((stop - start, dim), dtype=np.float32), 0).astype(np.float16)
            j.append([x], np.arange(start, stop), stop, [])
        j.close()
    return meta


def _seal_one(args) -> tuple[int, list]:
    from featx.engine.distributed import committed_shards, seal

    entry, meta, mine = args
    t = time.perf_counter()
    committed_shards(entry, meta)  # what rank 0 does first: every shard validated
    return time.perf_counter() - t, seal(entry, meta, mine)


def _assemble(entry: str, meta: dict, rows: int, world: int, mode: str) -> dict:
    """Assemble the shards of `entry` as the job does (copy: rank 0 alone; virtual: W sealing
    processes, then rank 0's entry); seconds of each step."""
    import multiprocessing

    import numpy as np

    from featx.engine.distributed import ShardSet, committed_shards, ordered_parts, seal_plan
    from featx.store.finalize import finalize

    t0 = time.perf_counter()
    shards = ShardSet(entry, meta, committed_shards(entry, meta), rows)
    kw = dict(
        classes=["a", "b"],
        labels=np.arange(rows) % 2,
        splits=np.array(["train"] * rows),
        ids=[f"img/{i:09d}.jpg" for i in range(rows)],
        layer_attrs={},
        attrs={"layers": ["codes"]},
    )
    seal_s = 0.0
    parts = None
    if mode == "virtual":
        plan = seal_plan(shards.shards, [[[s.start, s.stop]] for s in shards.shards], world)
        t = time.perf_counter()
        with multiprocessing.get_context("fork").Pool(world) as pool:
            sealed = [p for _, p in pool.map(_seal_one, [(entry, meta, mine) for mine in plan])]
        seal_s = time.perf_counter() - t
        parts = ordered_parts(sealed, shards.shards)
    t = time.perf_counter()
    finalize(entry, shards, parts=parts, **kw)
    entry_s = time.perf_counter() - t
    return {"seal": seal_s, "entry": entry_s, "total": time.perf_counter() - t0}


def assembly_only(args) -> None:
    import numpy as np

    from featx.store.parts import parts_path

    world = int(args.nproc.split(",")[-1])
    rows_list = [int(float(x)) for x in args.rows.split(",")]
    base = args.tmp or tempfile.gettempdir()
    print(
        f"assembly of {world} rank shards, {args.dim} float16 codes per row, {os.cpu_count()} cores, in {base}"
    )
    print(
        f"{'rows':>9} {'GB':>5} {'copy s':>7} {'seal s':>7} {'entry s':>8} {'virtual s':>9} {'ratio':>6} {'entry MB':>9}"
    )
    for rows in rows_list:
        with tempfile.TemporaryDirectory(prefix="featx-assembly-", dir=base) as tmp:
            res, sizes = {}, {}
            for mode in ("copy", "virtual"):
                entry = os.path.join(tmp, mode, "e.h5")
                os.makedirs(os.path.dirname(entry))
                meta = _synthetic_shards(entry, rows, args.dim, world)
                res[mode] = _assemble(entry, meta, rows, world, mode)
                sizes[mode] = os.path.getsize(entry)
            import h5py

            with (
                h5py.File(os.path.join(tmp, "copy", "e.h5")) as a,
                h5py.File(os.path.join(tmp, "virtual", "e.h5")) as b,
            ):
                for k in range(0, rows, max(1, rows // 7)):
                    assert np.array_equal(a["codes/codes"][k : k + 100], b["codes/codes"][k : k + 100]), k
            assert os.path.isdir(parts_path(os.path.join(tmp, "virtual", "e.h5")))
        c, v = res["copy"]["total"], res["virtual"]
        print(
            f"{rows:>9} {rows * args.dim * 2 / 1e9:>5.2f} {c:>7.1f} {v['seal']:>7.1f} {v['entry']:>8.2f} "
            f"{v['total']:>9.1f} {c / v['total']:>6.2f} {sizes['virtual'] / 2**20:>9.1f}"
        )


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
    p.add_argument("--assembly-only", action="store_true", help="time only the assembly, copy vs virtual")
    p.add_argument("--rows", default="100000", help="--assembly-only: synthetic rows, e.g. 100000,1000000")
    p.add_argument("--dim", type=int, default=1280, help="--assembly-only: codes per row")
    p.add_argument(
        "--tmp", default=None, help="--assembly-only: folder for the shards (default: the temp dir)"
    )
    args = p.parse_args(argv)
    if args.assembly_only:
        sys.path.insert(0, ROOT)
        return assembly_only(args)
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
