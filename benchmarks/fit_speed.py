"""How long `featx fit` takes to choose C: the old path (every grid value fitted from scratch, one after
another) against the new one (warm starts along the C grid, chains and folds side by side), same run.

    python benchmarks/fit_speed.py                                    # 5,000 x 256 x 10 and 20,000 x 512 x 10
    python benchmarks/fit_speed.py --shapes 60000x1280x10 --jobs 2    # Fashion-MNIST's size
    python benchmarks/fit_speed.py --codes fmnist.h5 --layer global_pool --jobs 2   # real codes
    python benchmarks/fit_speed.py --solvers sklearn                  # without the torch solver's columns

Synthetic codes: images of each class scattered around a class mean in a 64-dimensional latent space,
sent through a fixed random linear map to `dims` and rectified like post-ReLU codes, with a test
split of one image in seven (Fashion-MNIST's 60,000 + 10,000). One layer, one seed, the default
protocol (softmax, standardized, the 8-value C grid, a 20% hold-out). Prints per shape: wall-clock
seconds of the old path (`warm=False, jobs=1`, featx's behaviour before) and the new one (`--jobs`),
their ratio, the CPU seconds of each (all threads; on a shared machine wall-clock also counts other
people's work), the new path's time on `--jobs` idle cores (`new idle s`: its serial CPU seconds,
plus the grid tasks' and the refit preprocessing's CPU seconds, each timed in its thread and
scheduled in featx's order on `--jobs` workers, plus a BlockSoftmax refit's CPU seconds over
`--jobs`) and the old path's CPU seconds over that (`idle ratio`: the old path runs on one
core, so its CPU seconds are its time on an idle machine), the chosen C and the test accuracy of both.

With `--solvers sklearn,torch` (default, softmax only) each shape also runs the new path with
`--solver torch` on `--device` (auto: CUDA when present, else this CPU, where torch uses its own
intra-op threads): `torch s`, `new/torch` (the sklearn new path's seconds over torch's: above 1,
torch is faster), and torch's chosen C and test accuracy; the device is in the header. The
headline numbers are the ratios; absolute seconds depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import featx.classifiers.grid as grid  # noqa: E402
from featx.classifiers.block_softmax import BlockSoftmax
from featx.classifiers.fit import fit
from featx.classifiers.protocol import Protocol
from featx.classifiers.torch_softmax import fit_device


def synthetic(n: int, d: int, c: int, seed: int = 0, noise: float = 2.2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = 64
    y = np.arange(n) % c
    rng.shuffle(y)
    z = rng.normal(0, 1.0, (c, latent))[y] + rng.normal(0, noise, (n, latent))
    W = rng.normal(0, 1.0, (latent, d)) / np.sqrt(latent)
    X = np.maximum(z @ W + rng.normal(0, 0.5, (n, d)), 0.0)
    return X.astype(np.float32), y


def write_codes(path: str, X: np.ndarray, y: np.ndarray, test_every: int = 7) -> str:
    """A codes file from arrays, written by featx's own journal + finalize (one layer, `L`)."""
    from featx.store.finalize import finalize
    from featx.store.journal import Journal

    n, d = X.shape
    splits = np.array(["train"] * n, dtype=object)
    splits[::test_every] = "test"
    meta = {"key": "bench", "layers": [["L", d]], "dtype": "float32", "samples": n, "batch_size": n}
    j = Journal.open(path + ".partial", meta)
    j.append([X], np.arange(n), n, [])
    attrs = {
        "model": "synthetic",
        "weights": "none",
        "weights_source": "random",
        "weights_ident": "x",
        "weights_sha256": "",
        "pool": "avg",
        "preprocessing": json.dumps(
            {
                "crop_size": 32,
                "resize_size": 32,
                "interpolation": "bilinear",
                "mean": [0.5] * 3,
                "std": [0.5] * 3,
                "crop_mode": "center",
            }
        ),
        "layers": np.array(["L"], dtype=object),
        "dataset": "synthetic",
        "samples": n,
    }
    finalize(
        path,
        j,
        classes=[f"c{i}" for i in range(int(y.max()) + 1)],
        labels=y.astype(np.int64),
        splits=splits,
        ids=[f"s{i}" for i in range(n)],
        layer_attrs={"L": {"activation": "none", "pool": "avg"}},
        attrs=attrs,
    )
    return path


TASK_CPU: list[float] = []  # CPU seconds of each grid task (one fold, one chain), in dispatch order


def _timed_chain(*args, **kwargs):
    t, slot = time.thread_time(), len(TASK_CPU)
    TASK_CPU.append(0.0)  # its place in the order tasks start
    try:
        return _real_chain(*args, **kwargs)
    finally:
        TASK_CPU[slot] = time.thread_time() - t


_real_chain, grid.run_chain = grid.run_chain, _timed_chain
SIDE_CPU: list[float] = []  # CPU seconds of the refit's preprocessing, run in the grid's pool after its tasks
REFIT_CPU: list[
    float
] = []  # CPU seconds (all its threads) of a BlockSoftmax refit, which spreads over --jobs


def _timed_prepare(*args, **kwargs):
    t = time.thread_time()
    try:
        return _real_prepare(*args, **kwargs)
    finally:
        if kwargs.get("steps_only"):
            SIDE_CPU.append(time.thread_time() - t)


def _timed_refit(self, *args, **kwargs):
    c = time.process_time()
    try:
        return _real_refit(self, *args, **kwargs)
    finally:
        REFIT_CPU.append(time.process_time() - c)


_real_prepare, grid.prepare_split = grid.prepare_split, _timed_prepare
_real_refit, BlockSoftmax.fit = BlockSoftmax.fit, _timed_refit


def timed(
    path: str, layer: str, protocol: Protocol, jobs: int, warm: bool
) -> tuple[float, float, float, dict]:
    """Wall and CPU seconds of one fit, and its time on `jobs` idle cores (see the module docstring)."""
    for log in (TASK_CPU, SIDE_CPU, REFIT_CPU):
        log.clear()
    t, c = time.perf_counter(), time.process_time()
    report = fit(path, [layer], protocol, "all", (0,), jobs=jobs, warm=warm)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    workers = [0.0] * jobs  # joblib hands the next task to the first free worker
    for task in TASK_CPU + SIDE_CPU:
        workers[workers.index(min(workers))] += task
    pooled = sum(TASK_CPU) + sum(SIDE_CPU) + sum(REFIT_CPU)
    return wall, cpu, cpu - pooled + max(workers) + sum(REFIT_CPU) / jobs, report.results[0]


def row(name: str, path: str, layer: str, protocol: Protocol, jobs: int, device: str | None = None) -> dict:
    """Old path, new path, and (with `device`) the new path with the torch solver on `device`."""
    old_s, old_cpu, _, old = timed(path, layer, protocol, 1, warm=False)
    new_s, new_cpu, new_idle, new = timed(path, layer, protocol, jobs, warm=True)
    out = {
        "shape": name,
        "grid": len(protocol.Cs),
        "old_s": old_s,
        "new_s": new_s,
        "ratio": old_s / new_s,
        "old_cpu_s": old_cpu,
        "new_cpu_s": new_cpu,
        "new_idle_s": new_idle,
        "idle_ratio": old_cpu / new_idle,
        "C_old": old["C"],
        "C_new": new["C"],
        "acc_old": old["accuracy"],
        "acc_new": new["accuracy"],
    }
    if device is not None:
        torch_s, torch_cpu, _, t = timed(
            path, layer, replace(protocol, solver="torch", device=device), jobs, True
        )
        out.update(
            {
                "torch_s": torch_s,
                "torch_cpu_s": torch_cpu,
                "new_over_torch": new_s / torch_s,
                "old_over_torch": old_s / torch_s,
                "C_torch": t["C"],
                "acc_torch": t["accuracy"],
            }
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="5000x256x10,20000x512x10", help="ROWSxDIMSxCLASSES, comma-separated")
    ap.add_argument("--codes", help="a featx codes file to time instead of synthetic codes")
    ap.add_argument("--layer", help="the layer of --codes (default: its first)")
    ap.add_argument("--classifier", default="softmax", choices=("softmax", "svm"))
    ap.add_argument("--jobs", type=int, default=2, help="--jobs of the new path (2)")
    ap.add_argument("--solvers", default="sklearn,torch", help="softmax solvers to time (sklearn,torch)")
    ap.add_argument("--device", default="auto", help="where the torch solver runs (auto: cuda if present)")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args(argv)
    protocol = Protocol(classifier=args.classifier, solver="sklearn").validate()
    torch_on = "torch" in args.solvers.split(",") and args.classifier == "softmax"
    args.fit_device = fit_device(args.device) if torch_on else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.codes:
            from featx.store.codes import CodesFile

            with CodesFile(args.codes) as f:
                layer = args.layer or f.layers[0]
                n, d, c = int((f.split == "train").sum()), f.dim(layer), len(f.classes)
            name = f"{os.path.basename(args.codes)}:{layer} {n}x{d}x{c}"
            rows.append(row(name, args.codes, layer, protocol, args.jobs, args.fit_device))
        for shape in [s for s in args.shapes.split(",") if s] if not args.codes else []:
            n, d, c = (int(v) for v in shape.lower().split("x"))
            X, y = synthetic(n + n // 6, d, c)  # n training images, test images on top (1 in 7)
            path = write_codes(os.path.join(tmp, f"{shape}.h5"), X, y)
            rows.append(row(f"{n}x{d}x{c}", path, "L", protocol, args.jobs, args.fit_device))
            print_rows(rows[-1:], args, header=len(rows) == 1)
    if args.codes:
        print_rows(rows, args, header=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


def print_rows(rows: list[dict], args, header: bool) -> None:
    if header:
        print(
            f"{args.classifier}, new path --jobs {args.jobs}; old: every C from scratch, one after another"
            + (f"; torch: the new path with --solver torch on {args.fit_device}" if args.fit_device else "")
        )
        print(
            f"{'rows x dims x classes':<28} {'grid':>4} {'old s':>7} {'new s':>7} {'ratio':>6} {'old cpu':>7} "
            f"{'new cpu':>7} {'new idle s':>10} {'idle ratio':>10} {'C old':>7} {'C new':>7} {'acc old':>7} "
            f"{'acc new':>7}"
            + (f" {'torch s':>7} {'new/torch':>9} {'C torch':>7} {'acc torch':>9}" if args.fit_device else "")
        )
    for r in rows:
        print(
            f"{r['shape']:<28} {r['grid']:>4} {r['old_s']:>7.1f} {r['new_s']:>7.1f} {r['ratio']:>5.2f}x "
            f"{r['old_cpu_s']:>7.1f} {r['new_cpu_s']:>7.1f} {r['new_idle_s']:>10.1f} {r['idle_ratio']:>9.2f}x "
            f"{r['C_old']:>7g} {r['C_new']:>7g} {r['acc_old']:>7.4f} {r['acc_new']:>7.4f}"
            + (
                f" {r['torch_s']:>7.1f} {r['new_over_torch']:>8.2f}x {r['C_torch']:>7g} {r['acc_torch']:>9.4f}"
                if "torch_s" in r
                else ""
            ),
            flush=True,
        )


if __name__ == "__main__":
    raise SystemExit(main())
