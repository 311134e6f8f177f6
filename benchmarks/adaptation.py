#!/usr/bin/env python
"""Every way featx adapts a pretrained network, side by side with its cost, on real data.

For each dataset it runs one `featx bench` (resumable: rerun the same command to finish a killed
run) with EfficientNet-Lite0's ImageNet weights: a softmax probe and a k-NN probe on two layers,
and fine-tune cells from `--train-from` with every method (`full`, `lp-ft`, `bitfit`, `lora`), at a
CPU-sized budget (a train size per class, a capped test split, small images, epochs until
validation stops improving with a cap). Then it prints, per dataset, the report's decision table:
each probe's best layer (chosen on validation) and each method, with test accuracy, its Wilson 95%
interval, exact McNemar p against the answer, trainable parameters, training seconds and inference
milliseconds per image, and the answer (featx.bench.decision says the rule).

    python benchmarks/adaptation.py                       # four datasets, about an hour on 2 CPU cores
    python benchmarks/adaptation.py --datasets hymenoptera --max-epochs 6   # one, shorter

Budgets (`SETS`) are documented in docs/results/adaptation.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared", "datasets"))
FASHION = "/usr/share/datasets/fashion-mnist"

# name -> (--data, image size, train size, --per-class-limit)
SETS = {
    "hymenoptera": (f"{SHARED}/hymenoptera:similar", 96, "30/class", "train=60"),
    "flowers5_128": (f"{SHARED}/flowers5_128:similar", 96, "20/class", "train=40,test=60"),
    "brain_tumor_mri": (f"{SHARED}/brain_tumor_mri:different", 96, "20/class", "train=40,test=60"),
    "fashion-mnist": (f"{FASHION}:different", 32, "50/class", "train=70,test=60"),
}
METHODS = "full,lp-ft,bitfit,lora"


def run_bench(name: str, args) -> str:
    data, size, train_size, limit = SETS[name]
    out = os.path.join(args.out, name)
    cmd = [
        sys.executable, "-m", "featx", "bench",
        "--model", "efficientnet_lite0", "--weights", "imagenet", "--image-size", str(size),
        "--data", data, "--per-class-limit", limit, "--train-sizes", train_size, "--seeds", "0",
        "--layers", "depth:0.7,1.0", "--classifier", "softmax,knn",
        "--finetune", args.train_from, "--finetune-method", args.methods,
        "--finetune-max-epochs", str(args.max_epochs), "--finetune-batch-size", "16",
        "--finetune-lr", str(args.lr), "--finetune-threads", "1",
        "--device", "cpu", "--workers", "0", "--batch-size", "32",
        "--cache-dir", os.path.join(args.out, "cache"), "--out", out, "-q",
    ]  # fmt: skip
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def table(out: str) -> list[str]:
    """The bench report's decision section (featx.bench.decision): the same table and words."""
    lines = open(os.path.join(out, "report.md")).read().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("## Decision"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return [ln for ln in lines[start + 1 : end] if not ln.startswith("## ")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default=",".join(SETS), help=f"comma list of {', '.join(SETS)}")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--train-from", default="depth:0", help="the fine-tunes' freeze point (depth:0)")
    ap.add_argument(
        "--max-epochs", type=int, default=10, help="cap of the epochs-until-validation-stops rule (10)"
    )
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "adaptation"))
    ap.add_argument("--report-only", action="store_true", help="print the tables of finished benches")
    args = ap.parse_args()
    names = [n for n in args.datasets.split(",") if n]
    for n in names:
        if n not in SETS:
            ap.error(f"--datasets: unknown {n!r}; use {', '.join(SETS)}")
    for n in names:
        out = os.path.join(args.out, n) if args.report_only else run_bench(n, args)
        print(f"\n## {n} ({SETS[n][2]}, {SETS[n][1]} px; --per-class-limit {SETS[n][3]})")
        print("\n".join(table(out)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
