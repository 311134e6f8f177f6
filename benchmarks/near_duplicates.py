"""Near-duplicate detection on codes (featx.classifiers.neardup), measured on data with known groups.

1. Generated near-copies: sources drawn from real sets (flowers5_128: photos; brain_tumor_mri:
   scans that all look alike), each saved as the original plus `--copies - 1` augmented copies
   (a small crop or shift, colour jitter, a JPEG re-encode at quality 50-90); the group is the
   source. Mixed with `--singletons` other images of the same set (each its own group).
2. Codes: `featx.extract`, efficientnet_lite0 with ImageNet weights at 112 px, a mid layer
   (depth:0.5) and the deepest (global_pool), into a temporary cache.
3. Tables: pairwise precision/recall of `auto_groups` against the true groups at several
   thresholds, per layer, against a 64-bit dHash of pixels (Hamming similarity); the leakage rule
   on random and grouped splits of the generated sets and on random splits of sets without
   generated copies (the false-warning rate); the test accuracy of a logistic regression under a
   random split, a split grouped by the true groups and one grouped by the auto groups.

    python benchmarks/near_duplicates.py                       # ~5 minutes on 2 CPU cores
    python benchmarks/near_duplicates.py --sources 200 --singletons 1000 --seeds 10   # larger
    python benchmarks/near_duplicates.py --fm-limit 1000 --thresholds 0.9,0.95,0.98

Nothing is written into the repository: images and cache go to a temporary folder (`--keep` keeps it).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageEnhance
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupShuffleSplit, StratifiedShuffleSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import featx  # noqa: E402
from featx.classifiers import neardup  # noqa: E402
from featx.settings import CodeSettings, DataOptions, ModelSettings, RunSettings  # noqa: E402

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets")
FASHION = "/usr/share/datasets/fashion-mnist"
IMAGE_EXT = (".jpg", ".jpeg", ".png")


# ---- generated near-copies -------------------------------------------------------------------


def augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One near-copy: a small crop (3-10% off the sides) or shift (up to 6% with edge fill), colour
    jitter (brightness, contrast, saturation x0.85-1.15) and a JPEG re-encode at quality 50-90."""
    w, h = img.size
    if rng.random() < 0.5:
        f = rng.uniform(0.90, 0.97)
        cw, ch = int(w * f), int(h * f)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR)
    else:
        dx, dy = (int(v) for v in rng.integers(-int(0.06 * w), int(0.06 * w) + 1, size=2))
        a = np.asarray(img)
        a = np.roll(a, (dy, dx), axis=(0, 1))
        if dy > 0:
            a[:dy] = a[dy]
        elif dy < 0:
            a[dy:] = a[dy - 1]
        if dx > 0:
            a[:, :dx] = a[:, dx : dx + 1]
        elif dx < 0:
            a[:, dx:] = a[:, dx - 1 : dx]
        img = Image.fromarray(a)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(float(rng.uniform(0.85, 1.15)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(50, 91)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def image_files(root: str) -> list[tuple[str, str]]:
    """(class, path) of every image under root's class folders (split folders looked through)."""
    out = []
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXT):
                out.append((os.path.basename(dirpath), os.path.join(dirpath, name)))
    return sorted(out)


def make_set(src: str, out: str, sources: int, copies: int, singletons: int, seed: int) -> None:
    """`out/CLASS/gNNNNN_cK.jpg` (copies of source NNNNN) and `out/CLASS/sNNNNN.jpg` (singletons)."""
    rng = np.random.default_rng(seed)
    files = image_files(src)
    pick = rng.permutation(len(files))[: sources + singletons]
    for n, i in enumerate(pick):
        cls, path = files[i]
        os.makedirs(os.path.join(out, cls), exist_ok=True)
        img = Image.open(path).convert("RGB")
        if n < sources:
            img.save(os.path.join(out, cls, f"g{n:05d}_c0.jpg"), quality=95)
            for k in range(1, copies):
                augment(img, rng).save(os.path.join(out, cls, f"g{n:05d}_c{k}.jpg"), quality=95)
        else:
            img.save(os.path.join(out, cls, f"s{n:05d}.jpg"), quality=95)


def true_groups(paths) -> np.ndarray:
    """The source of each generated image (its `gNNNNN` prefix; a singleton is its own group)."""
    keys = [os.path.basename(p).split("_")[0] for p in paths]
    return np.unique(keys, return_inverse=True)[1].ravel()


# ---- the pixel hash (for the comparison only) -----------------------------------------------


def dhash(gray: np.ndarray) -> np.ndarray:
    """64-bit difference hash of one grayscale image: area-average to 8 x 9, compare neighbours."""
    h, w = gray.shape
    rows = np.linspace(0, h, 9).astype(int)
    cols = np.linspace(0, w, 10).astype(int)
    small = np.array(
        [[gray[rows[i] : rows[i + 1], cols[j] : cols[j + 1]].mean() for j in range(9)] for i in range(8)]
    )
    return (small[:, 1:] > small[:, :-1]).ravel()


def hash_similarity(bits: np.ndarray) -> np.ndarray:
    """1 - Hamming distance / 64 for every pair of hashes [N, 64] -> [N, N]."""
    b = bits.astype(np.float32)
    same = b @ b.T + (1 - b) @ (1 - b).T
    return same / bits.shape[1]


# ---- measures --------------------------------------------------------------------------------


def pair_table(sims: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upper-triangle pair similarities and whether each pair is one true group."""
    i, j = np.triu_indices(len(truth), 1)
    return sims[i, j], truth[i] == truth[j]


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC (rank-based, ties halved)."""
    from scipy.stats import rankdata

    r = rankdata(scores)
    npos, nneg = positive.sum(), (~positive).sum()
    return float((r[positive].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def best_f1(scores: np.ndarray, positive: np.ndarray, grid) -> tuple[float, float]:
    """The best pairwise F1 of `score >= t` over t in grid (on pairs, not transitive groups)."""
    best = (0.0, float("nan"))
    for t in grid:
        pred = scores >= t
        tp = float(np.sum(pred & positive))
        f1 = 2 * tp / (pred.sum() + positive.sum()) if tp else 0.0
        best = max(best, (f1, float(t)))
    return best


def groups_or_one(codes: np.ndarray, threshold: float) -> np.ndarray:
    """auto_groups, or one group of every row where it refuses to make that (a measured outcome)."""
    try:
        return neardup.auto_groups(codes, threshold)
    except featx.UsageError:
        return np.zeros(len(codes), dtype=np.int64)


def split_acc(X, y, train, test) -> float:
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=300))
    return float(pipe.fit(X[train], y[train]).score(X[test], y[test]))


def splits(kind: str, y, groups, seed: int, frac: float = 0.2):
    if kind == "random":
        return next(StratifiedShuffleSplit(1, test_size=frac, random_state=seed).split(y, y))
    return next(GroupShuffleSplit(1, test_size=frac, random_state=seed).split(y, y, groups))


def extract(data: str, cache: str, args, limit: str | None = None) -> str:
    res = featx.extract(
        ModelSettings("efficientnet_lite0", weights="imagenet", image_size=args.image_size),
        data,
        CodeSettings("depth:0.5,1.0"),
        run=RunSettings(device="cpu", workers=args.workers, precision="fp32"),
        data_options=DataOptions(per_class_limit=limit, seed=0),
        cache_dir=cache,
    )
    return res.path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", type=int, default=60, help="sources per generated set (60)")
    ap.add_argument("--copies", type=int, default=6, help="images per source, the original included (6)")
    ap.add_argument("--singletons", type=int, default=300, help="unduplicated images per generated set (300)")
    ap.add_argument("--sets", default="flowers5_128,brain_tumor_mri", help="shared sets to draw sources from")
    ap.add_argument(
        "--real", default="flowers5_128,hymenoptera,fashion-mnist", help="sets for false warnings"
    )
    ap.add_argument("--fm-limit", default="200", help="Fashion-MNIST images per class and split (200)")
    ap.add_argument("--thresholds", default="0.8,0.85,0.9,0.92,0.94,0.95,0.96,0.97,0.98,0.99")
    ap.add_argument("--seeds", type=int, default=5, help="random splits per set (5)")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--workers", default="0")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument(
        "--cache-dir", help="reuse this featx cache for the codes (default: in the temporary folder)"
    )
    args = ap.parse_args()
    args.workers = int(args.workers) if args.workers.isdigit() else args.workers
    thresholds = [float(t) for t in args.thresholds.split(",")]
    tmp = tempfile.mkdtemp(prefix="featx-neardup-")
    cache = args.cache_dir or os.path.join(tmp, "cache")
    t0 = time.perf_counter()
    try:
        generated = {}
        for k, name in enumerate(args.sets.split(",")):
            out = os.path.join(tmp, f"dup-{name}")
            make_set(os.path.join(SHARED, name), out, args.sources, args.copies, args.singletons, seed=k)
            generated[name] = (out, extract(out, cache, args))
        print(f"# generated sets and codes: {time.perf_counter() - t0:.0f}s")

        layers = None
        print("\n## Pairwise precision / recall of auto_groups against the true groups\n")
        f1s: dict[str, list[tuple[float, float, float]]] = {}
        hash_rows = []
        for name, (folder, path) in generated.items():
            with featx.open_codes(path) as f:
                layers = list(f.layers)
                truth = true_groups(f.paths)
                codes = {layer: f.codes(layer) for layer in layers}
                paths = list(f.paths)
            for layer in layers:
                row = []
                for t in thresholds:
                    p, r = neardup.pair_scores(groups_or_one(codes[layer], t), truth)
                    f1 = 2 * p * r / (p + r) if p + r else 0.0
                    f1s.setdefault(layer, []).append((t, f1, p))
                    row.append(f"{p:.2f}/{r:.2f}")
                print(f"{name:16s} {layer:12s} " + "  ".join(f"{t}:{c}" for t, c in zip(thresholds, row)))
            # separation of known duplicate pairs: codes cosine vs pixel dHash
            grays = [
                np.asarray(Image.open(os.path.join(folder, p)).convert("L"), dtype=np.float32) for p in paths
            ]
            bits = np.stack([dhash(g) for g in grays])
            sims = {"dhash": hash_similarity(bits)}
            for layer in layers:
                x = neardup.normalise(codes[layer])
                sims[layer] = x @ x.T
            for method, s in sims.items():
                sc, pos = pair_table(s, truth)
                grid = np.unique(sc[pos]) if method == "dhash" else np.linspace(0.7, 1.0, 61)
                f1, t = best_f1(sc, pos, grid)
                hash_rows.append((name, method, auc(sc, pos), f1, t))
        print("\n## Separating known duplicate pairs: codes cosine vs 64-bit dHash of pixels\n")
        print(f"{'set':16s} {'method':12s} {'AUC':>6s} {'best F1':>8s} {'at':>6s}")
        for name, method, a, f1, t in hash_rows:
            print(f"{name:16s} {method:12s} {a:6.3f} {f1:8.3f} {t:6.3f}")

        print("\n## Mean pairwise F1 (precision) over the generated sets, per threshold\n")
        for layer, rows in f1s.items():
            by_t = {t: [(f, p) for tt, f, p in rows if tt == t] for t in thresholds}
            cells = [
                f"{t}:{np.mean([f for f, _ in v]):.3f}({np.mean([p for _, p in v]):.2f})"
                for t, v in by_t.items()
            ]
            print(f"{layer:12s} " + "  ".join(cells))

        print("\n## Leakage rule (featx.classifiers.neardup.leakage), 20% held out\n")
        print(
            f"{'set':16s} {'layer':12s} {'split':8s} {'flagged':>8s} {'closer%':>8s} {'held-out q50':>12s} {'ref q50':>8s}"
        )
        real = {}
        for name in args.real.split(","):
            if name == "fashion-mnist":
                if not os.path.isdir(FASHION):
                    continue
                real[name] = extract(FASHION, cache, args, limit=args.fm_limit)
            else:
                real[name] = extract(os.path.join(SHARED, name), cache, args)
        cases = [(n, p, True) for n, (_, p) in generated.items()] + [(n, p, False) for n, p in real.items()]
        false_warn = {layer: [0, 0] for layer in layers}
        for name, path, is_gen in cases:
            with featx.open_codes(path) as f:
                y = f.labels[:]
                truth = true_groups(f.paths) if is_gen else np.arange(len(y))
                for layer in layers:
                    X = f.codes(layer)
                    for kind in ("random", "grouped") if is_gen else ("random",):
                        reps = [
                            neardup.leakage(X, *splits(kind, y, truth, s), y, seed=s)
                            for s in range(args.seeds)
                        ]
                        flagged = sum(r.leaky for r in reps)
                        if not is_gen:
                            false_warn[layer][0] += flagged
                            false_warn[layer][1] += len(reps)
                        label = ("gen-" if is_gen else "") + name
                        print(
                            f"{label[:16]:16s} {layer:12s} {kind:8s} {flagged:4d}/{len(reps):<3d} "
                            f"{100 * np.mean([r.fraction for r in reps]):8.1f} "
                            f"{np.mean([r.quantiles[1] for r in reps]):12.3f} "
                            f"{np.mean([r.reference_quantiles[1] for r in reps]):8.3f}"
                        )
        for layer, (k, n) in false_warn.items():
            print(f"false-warning rate, {layer}: {k}/{n} random splits of sets without generated copies")

        print("\n## Test accuracy (logistic regression on the codes), 20% test, mean over seeds\n")
        print(
            f"{'set':16s} {'layer':12s} {'random':>8s} {'true groups':>12s} {'auto groups':>12s} {'inflation':>10s}"
        )
        for name, (_, path) in generated.items():
            with featx.open_codes(path) as f:
                y, truth = f.labels[:], true_groups(f.paths)
                for layer in layers:
                    X = f.codes(layer)
                    auto = neardup.auto_groups(X, neardup.DUP_SIMILARITY)
                    acc = {
                        k: np.mean(
                            [
                                split_acc(X, y, *splits("random" if k == "random" else "grouped", y, g, s))
                                for s in range(args.seeds)
                            ]
                        )
                        for k, g in (("random", None), ("true", truth), ("auto", auto))
                    }
                    print(
                        f"gen-{name[:12]:12s} {layer:12s} {acc['random']:8.3f} {acc['true']:12.3f} "
                        f"{acc['auto']:12.3f} {100 * (acc['random'] - acc['true']):+9.1f}pt"
                    )
        print(f"\n# total {time.perf_counter() - t0:.0f}s; auto threshold {neardup.DUP_SIMILARITY}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
