"""Regret of featx's choices (layer and C) on small training sets: the old rule against the new.

For every dataset, train size and seed, both rules fit every layer exactly as `featx fit` does
(`featx.classifiers.fit.fit_cell`): the *old* rule validates on a 20% hold-out whatever its size
(`min_val_per_class=0`); the *new* rule switches to stratified k-fold CV when the hold-out would keep
fewer than 10 images per class (`--min-val-per-class`), where softmax then chooses C by the cross-validated log-likelihood
and the layer by featx.classifiers.selection.choose_layer (the deepest within one paired standard error of the
best), and breaks accuracy ties with a continuous score elsewhere. Then, for the
same training images, every (layer, C) is refitted on all of them and scored on the test split (the
"oracle" table, never seen by either rule). Regrets, in accuracy points (mean over seeds):

- layer: test accuracy of the best-on-test layer (at each layer's chosen C) minus the chosen layer's;
- C: mean over layers of (test accuracy at the best-on-test C minus at the chosen C);
- total: the best (layer, C) on test minus the chosen pair.

    python benchmarks/selection_regret.py                        # shared datasets + digits, 10 seeds
    python benchmarks/selection_regret.py --data sklearn:digits --seeds 3   # a quick look
    python benchmarks/selection_regret.py --seeds 10 --first-seed 10        # seeds 10-19

Where both rules select on the same rows (a hold-out of >= 10 per class: 50/class and up) their
numbers are the same by construction; the table shows them anyway.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from featx.classifiers.estimators import make_pipeline
from featx.classifiers.fit import fit_cell
from featx.classifiers.protocol import parse_train_size, protocol_for
from featx.classifiers.rows import select_rows
from featx.classifiers.selection import candidate, choose_layer
from featx.cli.tables import format_table
from featx.engine.extract import extract
from featx.settings import DataOptions, parse_per_class_limit  # noqa: E402
from featx.store.codes import CodesFile

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets")
DEFAULT_DATA = [
    "sklearn:digits",
    f"{SHARED}/hymenoptera",
    f"{SHARED}/flowers5_128",
    f"{SHARED}/brain_tumor_mri",
    "/usr/share/datasets/fashion-mnist",
]


def oracle(
    f: CodesFile, layer: str, parts, test: np.ndarray, C: float, proto, seed: int, memo: dict
) -> float:
    """Per test image, whether `layer` at `C` refitted on the row sets `parts` (train, then val:
    exactly the rows and order fit_cell refits on; lbfgs sums in row order) classifies it right."""
    # lbfgs ignores the seed, so softmax refits of the same rows are shared across seeds
    key = (layer, C, tuple(p.tobytes() for p in parts), None if proto.classifier == "softmax" else seed)
    if key not in memo:
        X = np.vstack([f.codes(layer, p) for p in parts if len(p)])
        y = np.concatenate([f.labels[p] for p in parts])
        with threadpool_limits(limits=1, user_api="blas"):  # as fit_cell does: the same bits
            pipe = make_pipeline(proto, C, seed, len(y), X.shape[1]).fit(X, y)
        memo[key] = pipe.predict(f.codes(layer, test)) == f.labels[test]
    return memo[key]


def noise_floor(correct: dict, seed: int) -> float:
    """The regret a selector with a perfect view of the truth still shows under this measure,
    because the best-on-test pair is itself picked on noisy test images: choose the pair on one
    random half of the test images, measure its regret on the other half, both ways round. Halves
    are noisier than the whole test set, so this overstates the floor of the full-test regret
    somewhat (by up to ~sqrt(2) in standard-error terms): a gauge, not a bound."""
    n = len(next(iter(correct.values())))
    half = np.random.default_rng(1000 + seed).permutation(n) < n // 2
    out = []
    for a, b in ((half, ~half), (~half, half)):
        on_b = {k: float(np.mean(v[b])) for k, v in correct.items()}
        pick = max(correct, key=lambda k: float(np.mean(correct[k][a])))
        out.append(max(on_b.values()) - on_b[pick])
    return float(np.mean(out))


def regrets(
    path: str,
    layers: list[str],
    size: str,
    seed: int,
    Cs,
    classifier: str,
    memo: dict,
    min_val: int | None = None,
) -> dict:
    out = {}
    new = {} if min_val is None else {"min_val_per_class": min_val}
    for rule, extra in (("old", {"min_val_per_class": 0}), ("new", new)):
        proto = protocol_for(classifier, Cs=Cs, **extra)
        cells = {n: fit_cell(path, [n], proto, size, seed, warm=False) for n in layers}  # cold: as the oracle
        with CodesFile(path) as f:
            rows = select_rows(f, proto, parse_train_size(size), seed)
            parts = (rows.train, rows.val)
            correct = {
                (n, C): oracle(f, n, parts, rows.test, C, proto, seed, memo) for n in layers for C in Cs
            }
            table = {k: float(np.mean(v)) for k, v in correct.items()}
        for n, c in cells.items():  # the oracle refits exactly what fit_cell refitted
            assert abs(table[(n, c["C"])] - c["accuracy"]) < 1e-9, (
                n,
                c["C"],
                table[(n, c["C"])],
                c["accuracy"],
            )
        pick = choose_layer([candidate(n, [cells[n]]) for n in layers])  # as `featx fit` and the bench choose
        at_chosen = {n: cells[n]["accuracy"] for n in layers}
        out[rule] = {
            "layer": max(at_chosen.values()) - at_chosen[pick],
            "C": float(np.mean([max(table[(n, C)] for C in Cs) - at_chosen[n] for n in layers])),
            "total": max(table.values()) - at_chosen[pick],
            "source": cells[layers[0]]["val_source"],
            "floor": noise_floor(correct, seed),
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", help="data specs (default: the shared datasets and digits)")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--layers", default="depth:0.25,0.55,0.85,1.0")
    ap.add_argument("--sizes", default="5/class,10/class,50/class,all")
    ap.add_argument("--seeds", type=int, default=10, help="how many seeds")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds FIRST .. FIRST + SEEDS - 1")
    ap.add_argument("--C", default="0.001,0.01,0.1,1,10")
    ap.add_argument("--classifier", default="softmax")
    ap.add_argument(
        "--min-val-per-class",
        type=int,
        default=None,
        help="the new rule's threshold (default: featx's, classify.MIN_VAL_PER_CLASS)",
    )
    ap.add_argument("--per-class-limit", default="train=200,test=100")
    ap.add_argument("--cache-dir", default=None)
    a = ap.parse_args(argv)
    data = [d for d in (a.data or DEFAULT_DATA) if ":" in d.split("/")[0] or os.path.exists(d)]
    Cs = tuple(float(c) for c in a.C.split(","))
    sizes = a.sizes.split(",")
    opts = DataOptions(per_class_limit=parse_per_class_limit(a.per_class_limit))
    rows, t0 = [], time.perf_counter()
    for spec in data:
        r = extract(
            a.model,
            spec,
            a.layers,
            weights=a.weights,
            image_size=a.image_size,
            data_options=opts,
            cache_dir=a.cache_dir,
            precision="fp32",
            progress=False,
        )
        name = os.path.basename(spec.rstrip("/")) if ":" not in spec else spec.split(":", 1)[1]
        memo: dict = {}
        for size in sizes:
            runs = []
            for seed in range(a.first_seed, a.first_seed + a.seeds):
                try:
                    runs.append(
                        regrets(r.path, r.layers, size, seed, Cs, a.classifier, memo, a.min_val_per_class)
                    )
                except Exception as e:  # noqa: BLE001 - a size the data cannot support is a row, not a crash
                    print(f"{name} {size} seed {seed}: {str(e).splitlines()[0]}", file=sys.stderr)
                    break
            if not runs:
                continue
            row = [name, size, runs[0]["old"]["source"], runs[0]["new"]["source"]]
            for what in ("layer", "C", "total"):
                old = 100 * np.mean([x["old"][what] for x in runs])
                new = 100 * np.mean([x["new"][what] for x in runs])
                row += [f"{old:.2f}", f"{new:.2f}"]
            floor = 100 * np.mean([x["new"]["floor"] for x in runs])
            rows.append(row + [f"{floor:.2f}", len(runs)])
            print(f"{name} {size}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    headers = [
        "dataset",
        "size",
        "old: validation",
        "new: validation",
        "layer old",
        "layer new",
        "C old",
        "C new",
        "total old",
        "total new",
        "floor",
        "seeds",
    ]
    print(format_table(rows, headers))
    print(
        f"\nregret in accuracy points (test accuracy of the best-on-test choice minus featx's), mean over seeds; "
        f"{a.model} @ {a.weights}, {a.image_size} px, layers {a.layers}, {a.classifier}, C in {a.C}; floor: the "
        f"total regret of picking the pair on one half of the test images, measured on the other half "
        f"(the measure's own noise)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
