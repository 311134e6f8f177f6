#!/usr/bin/env python
"""Every way featx adapts a pretrained network, side by side with its cost, on real data.

For each dataset it runs one `featx bench` (resumable: rerun the same command to finish a killed
run) with EfficientNet-Lite0's ImageNet weights: a softmax probe and a k-NN probe on two layers,
and fine-tune cells from `--train-from` with every method (`full`, `lp-ft`, `bitfit`, `lora`), at a
CPU-sized budget (a train size per class, a capped test split, small images, epochs until
validation stops improving with a cap). Then it prints, per dataset, one table: each probe's best
layer (chosen on validation) and each method, with test accuracy, its Wilson 95% interval, exact
McNemar p against the row validation chose, trainable parameters, training seconds and inference
milliseconds per image, plus the row validation chose and the cheapest row within its noise.

    python benchmarks/adaptation.py                       # four datasets, about an hour on 2 CPU cores
    python benchmarks/adaptation.py --datasets hymenoptera --max-epochs 6   # one, shorter

The table reads the bench's results.json; the bench's report.md (same folder) holds the same
decision table with its words. Budgets (`SETS`) are documented in docs/results/adaptation.md.
"""

from __future__ import annotations

import argparse
import json
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
    """The decision table of one bench's results.json (probe rows: each classifier's best layer by
    validation; every fine-tune method)."""
    from featx.stats import mcnemar_exact, unpack_correct, wilson_interval

    with open(os.path.join(out, "results.json")) as f:
        rows = [r for r in json.load(f) if not r.get("control_of") and not r.get("baseline")]
    cands = []
    for clf in dict.fromkeys(r["classifier"] for r in rows if r["kind"] == "probe"):
        mine = [r for r in rows if r["kind"] == "probe" and r["classifier"] == clf]
        cands.append(max(mine, key=lambda r: (r["val_score"], -r["relative_depth"])))
    cands += [r for r in rows if r["kind"] == "finetune"]
    best = max(
        cands,
        key=lambda r: (r["val_score"] if r.get("converged", True) else -1, -(r.get("trainable_params") or 0)),
    )
    n_val = best.get("n_val") or (best["train_size"] if "cv" in str(best.get("val_source")) else 0)
    low = wilson_interval(int(round(best["val_score"] * n_val)), n_val)[0] if n_val else best["val_score"]
    close = [r for r in cands if r["val_score"] >= low and r.get("converged", True)]

    def cost(r):
        return (
            r.get("trainable_params") or 0,
            r.get("train_seconds") or 0,
            r.get("inference_ms_per_image") or 0,
        )

    cheap = min(close, key=cost)
    bits = {id(r): unpack_correct(r["test_correct"], r["n_test"]) for r in cands if r.get("test_correct")}
    lines = [
        f"{'row':34} {'val':>6} {'test acc':>8} {'95% CI':>13} {'n':>5} {'p vs chosen':>11} {'trainable':>10} "
        f"{'train s':>8} {'ms/img':>7}"
    ]
    for r in cands:
        what = (
            f"probe {r['classifier']} @ {r['layer']}"
            if r["kind"] == "probe"
            else f"{r['method']} from {r['train_from']}"
            + ("" if r.get("converged", True) else " (not conv.)")
        )
        lo, hi = wilson_interval(int(round(r["accuracy"] * r["n_test"])), r["n_test"])
        p = "chosen" if r is best else (
            f"{mcnemar_exact(bits[id(r)], bits[id(best)]).p:.3g}" if id(r) in bits and id(best) in bits and len(bits[id(r)]) == len(bits[id(best)]) else "-"
        )  # fmt: skip
        tp = r.get("trainable_params")
        lines.append(
            f"{what[:34]:34} {r['val_score']:6.3f} {r['accuracy']:8.3f} {lo:6.3f}-{hi:6.3f} {r['n_test']:5d} {p:>11} "
            f"{'-' if tp is None else f'{tp:,}':>10} {r.get('train_seconds') or r.get('fit_seconds') or 0:8.1f} "
            f"{'-' if r.get('inference_ms_per_image') is None else format(r['inference_ms_per_image'], '.2f'):>7}"
        )
    name = lambda r: r["classifier"] if r["kind"] == "probe" else r["method"]  # noqa: E731
    lines.append(
        f"chosen on validation: {name(best)}; cheapest within its validation noise (val >= {low:.3f}, the lower "
        f"Wilson bound, n_val {n_val}): {name(cheap)}"
    )
    return lines


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
