"""How far are bf16 codes from fp32 codes, and does it change what a linear classifier learns?

Extracts the same images and layers twice, at --precision fp32 and bf16 (into a temporary
cache), then prints per layer: the per-image relative L2 error of the bf16 codes, their smallest
cosine similarity to the fp32 codes, and the softmax test accuracy on each (mean ± std over seeds).

    python benchmarks/bf16_vs_fp32.py                      # hymenoptera, offline EfficientNet-Lite0
    python benchmarks/bf16_vs_fp32.py --data ../shared/datasets/flowers5_128 --per-class-limit 100
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "datasets", "hymenoptera"))
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--layers", default="depth:0.25,0.55,1.0")
    p.add_argument("--per-class-limit", type=int)
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args(argv)

    from featx import extract, fit
    from featx.classifiers.protocol import protocol_for
    from featx.settings import DataOptions
    from featx.store.codes import CodesFile

    seeds = [int(s) for s in args.seeds.split(",")]
    opts = DataOptions(per_class_limit=args.per_class_limit)
    with tempfile.TemporaryDirectory() as cache:
        paths = {
            prec: extract(
                args.model,
                args.data,
                args.layers,
                weights=args.weights,
                precision=prec,
                data_options=opts,
                cache_dir=cache,
                progress=False,
            ).path
            for prec in ("fp32", "bf16")
        }
        rows = []
        with CodesFile(paths["fp32"]) as a, CodesFile(paths["bf16"]) as b:
            layers = list(a.layers)
            for layer in layers:
                x, y = a.codes(layer), b.codes(layer)
                rel = np.linalg.norm(x - y, axis=1) / np.maximum(np.linalg.norm(x, axis=1), 1e-12)
                cos = (x * y).sum(1) / np.maximum(
                    np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-12
                )
                rows.append([layer, x.shape[1], np.median(rel), rel.max(), cos.min()])
        acc = {}
        for prec, path in paths.items():
            report = fit(path, layers=layers, protocol=protocol_for("softmax"), seeds=seeds)
            for s in report.summary():
                acc[(prec, s["layer"])] = f"{s['accuracy']:.3f} ± {s['accuracy_std']:.3f}"
    head = ["layer", "dim", "rel L2 median", "rel L2 max", "min cosine", "acc fp32", "acc bf16"]
    table = [
        [
            r[0],
            str(r[1]),
            f"{r[2]:.4f}",
            f"{r[3]:.4f}",
            f"{r[4]:.5f}",
            acc[("fp32", r[0])],
            acc[("bf16", r[0])],
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]
    print(f"{args.model} ({args.weights}) on {os.path.relpath(args.data)}; softmax over seeds {args.seeds}")
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
