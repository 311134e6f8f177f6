"""`--group-by auto` through the real CLI: the accuracy inflation it removes, its false warnings.

1. Generated near-copies (benchmarks/near_duplicates.py's `make_set`: sources x copies, crops,
   shifts, colour jitter, JPEG re-encoding, among singletons) of flowers5_128 and brain_tumor_mri
   (its train split), no split folders. For each split seed: `featx extract` plain, with
   `--group-by auto` and with the true groups (`--group-by '(g\\d+|s\\d+)'`), then `featx fit
   --layer global_pool`; the table gives featx's own test accuracy and whether the leakage
   check warned.
2. False warnings: `featx fit` (its leakage check) on flowers5_128 (a per-class limit, seeded
   split) and hymenoptera (its own train/val split) for several fit seeds (other hold-outs).
3. The check's added seconds on the full flowers5_128 entry (4,317 rows).

    python benchmarks/near_duplicates_cli.py   # ~20 minutes on a shared 2-core AMD EPYC CPU (21 extractions)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
DATA = os.path.join(HERE, "..", "..", "shared", "datasets")
MODEL = [
    "--model",
    "efficientnet_lite0",
    "--weights",
    "imagenet",
    "--image-size",
    "112",
    "--layers",
    "depth:0.5,1.0",
    "--device",
    "cpu",
    "--precision",
    "fp32",
]


def featx(*args: str) -> str:
    """`python -m featx ARGS`: its stdout; stderr's featx lines are echoed."""
    p = subprocess.run([sys.executable, "-m", "featx", *args], capture_output=True, text=True)
    for line in p.stderr.splitlines():
        if line.startswith("featx:") and "wrote" not in line:
            print("   ", line[:220], flush=True)
    if p.returncode:
        raise SystemExit(f"featx {' '.join(args)} failed ({p.returncode}): {p.stderr[-500:]}")
    return p.stdout


def extract(data: str, cache: str, *extra: str) -> str:
    return featx("extract", *MODEL, "--data", data, "--cache-dir", cache, *extra).strip().splitlines()[-1]


def fit(path: str, tmp: str, seed: int = 0) -> dict:
    out = os.path.join(tmp, "fit.json")
    t0 = time.perf_counter()
    featx("fit", path, "--layer", "global_pool", "--seed", str(seed), "--results", out)
    r = json.load(open(out))
    r["wall"] = time.perf_counter() - t0
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", type=int, default=60)
    ap.add_argument("--copies", type=int, default=6)
    ap.add_argument("--singletons", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    from near_duplicates import make_set

    tmp = tempfile.mkdtemp(prefix="featx-dupcli-")
    cache = args.cache_dir or os.path.join(tmp, "cache")
    t_all = time.perf_counter()
    print("| set | split | test accuracy (mean of seeds) | leaky warnings | groups |")
    print("|---|---|---|---|---|")
    table = []
    for name, src in (("flowers", "flowers5_128"), ("brain MRI", "brain_tumor_mri/train")):
        gen = os.path.join(tmp, name.replace(" ", "_"))
        make_set(os.path.join(DATA, src), gen, args.sources, args.copies, args.singletons, seed=0)
        for label, extra in (
            ("random (plain)", []),
            ("--group-by auto", ["--group-by", "auto"]),
            ("true sources (regex)", ["--group-by", r"(g\d+|s\d+)"]),
        ):
            accs, leaky, groups = [], 0, ""
            for seed in range(args.seeds):
                path = extract(gen, cache, "--seed", str(seed), *extra)
                r = fit(path, tmp)
                accs.append(r["summary"][0]["accuracy"])
                leaky += bool(r["leakage"] and r["leakage"]["leaky"])
                if extra and seed == 0:
                    groups = json.loads(featx("info", path, "--json"))["groups"]["count"]
            row = f"| {name} | {label} | {sum(accs) / len(accs):.3f} ({', '.join(f'{a:.3f}' for a in accs)}) | {leaky} / {args.seeds} | {groups} |"
            table.append(row)
            print(row, flush=True)
    print()
    print("| data | fit seed | leaky | markedly closer | check seconds |")
    print("|---|---|---|---|---|")
    flowers = extract(os.path.join(DATA, "flowers5_128"), cache, "--per-class-limit", "300")
    hymen = extract(os.path.join(DATA, "hymenoptera"), cache)
    for name, path in (("flowers5_128 (300/class)", flowers), ("hymenoptera", hymen)):
        for seed in range(5):
            leak = fit(path, tmp, seed)["leakage"]
            print(
                f"| {name} | {seed} | {leak['leaky']} | {100 * leak['leakage_fraction']:.1f}% "
                f"({leak['leakage_rows']} of {leak['leakage_checked']}) | {leak['leakage_seconds']:.2f} |",
                flush=True,
            )
    full = extract(os.path.join(DATA, "flowers5_128"), cache)
    leak = fit(full, tmp)["leakage"]
    print(
        f"\nfull flowers5_128 entry: leakage check {leak['leakage_seconds']:.2f} s "
        f"({leak['leakage_checked']} held-out rows; leaky {leak['leaky']})"
    )
    print(f"total {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
