"""What a bench's measurements say, per dataset: the accuracy table, the best layer, the
similarity signals, the size regime, and which of the four transfer-learning cases applies.

The four cases (the usual guidance):
  1. small, similar   -> linear classifier on the top (penultimate) codes
  2. large, similar   -> fine-tune through the network
  3. small, different -> linear classifier on codes from earlier in the network
  4. large, different -> fine-tune the whole network (pretrained initialisation still helps)

Similarity. The user's `:similar` / `:different` label, when given, decides; featx always
reports its own measurement next to it and says when they disagree. The measurement is the
*late-layer gain* at the largest train size: the share of the top layer's above-chance accuracy
that the second half of the network adds, G = (acc(top) - acc(mid)) / (acc(top) - 1/classes),
with `mid` the grid layer nearest depth 0.5 (at most `MID_MAX_DEPTH`, 0.75; without one, or
when the top layer is at chance, the data is taken as similar when the top layer is within 1 point
of the best). Late layers hold base-task-specific features, so they
add much on data like ImageNet and little on data unlike it (Yosinski et al. 2014). The data
behaves as *similar* when G >= `GAIN_THRESHOLD` (0.1). On featx's shared datasets with
EfficientNet-Lite0, G was 0.26 (hymenoptera) and 0.15 (flowers) against 0.06 (brain MRI) and
0.03 (Fashion-MNIST); README, "Measured: transferability". The best layer is the one with the
best mean validation score, never chosen on test data; its lead over the top layer is reported as
evidence. The ImageNet head's mean top-1 probability on the target images is reported too, but
not used: it does not separate the two kinds (scikit-learn digits 0.87, flowers 0.19), it measures
confidence, not similarity.

Size. `large` when the training split holds at least `LARGE_PER_CLASS` (1,000) images per class
on average (fine-tuning a full network on fewer tends to overfit), else `small`; the report adds
the learning curve's last step (accuracy gained from the second-largest to the largest train size)
as evidence of whether more data still pays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

GAIN_THRESHOLD = 0.1
MID_MAX_DEPTH = 0.75
TOP_TOLERANCE = 0.01  # the fallback without a gain: similar when the top layer is this close to the best
LARGE_PER_CLASS = 1000

CASES = {
    1: "small, similar: a linear classifier on the top (penultimate) codes",
    2: "large, similar: fine-tune through the network",
    3: "small, different: a linear classifier on codes from earlier in the network",
    4: "large, different: fine-tune the whole network (pretrained initialisation still helps)",
}


@dataclass
class Stat:
    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}" if self.n > 1 else f"{self.mean:.3f}"


@dataclass
class DatasetAnalysis:
    name: str
    label: str | None
    classifier: str
    layers: list[str]
    depth: dict[str, float]
    sizes: list[str]  # train size specs, smallest first
    size_counts: dict[str, int]  # spec -> training images used
    acc: dict[tuple[str, str], Stat]  # (layer, size) -> test accuracy over seeds
    val: dict[tuple[str, str], Stat]
    pixels: dict[str, Stat] = field(default_factory=dict)  # size -> raw-pixel baseline accuracy
    n_train: int = 0
    n_classes: int = 0
    head_confidence: float | None = None
    late_gain: float | None = None
    mid: str = ""
    best: str = ""
    top: str = ""
    measured: str = ""
    size: str = ""
    case: int = 0
    evidence: list[str] = field(default_factory=list)

    @property
    def similarity(self) -> str:
        return self.label or self.measured

    @property
    def disagrees(self) -> bool:
        return bool(self.label) and self.label != self.measured


def _stat(values) -> Stat:
    a = np.asarray(values, dtype=float)
    return Stat(float(a.mean()), float(a.std()), len(a))


def analyze(
    rows: list[dict], sources, head_confidence: dict[str, float] | None = None
) -> list[DatasetAnalysis]:
    """One analysis per (dataset, classifier) from the bench's result rows."""
    out = []
    head_confidence = head_confidence or {}
    for src in sources:
        mine = [r for r in rows if r["dataset"] == src.name]
        for clf in dict.fromkeys(
            f"{r['classifier']}{'/' + r['preset'] if r['preset'] else ''}" for r in mine
        ):
            rs = [r for r in mine if f"{r['classifier']}{'/' + r['preset'] if r['preset'] else ''}" == clf]
            cnn = [r for r in rs if not r["baseline"]]
            if not cnn:
                continue
            sizes = sorted(dict.fromkeys(r["train_size_spec"] for r in cnn),
                           key=lambda s: next(r["train_size"] for r in cnn if r["train_size_spec"] == s))  # fmt: skip
            layers = sorted(dict.fromkeys(r["layer"] for r in cnn), key=lambda n: src.depth[n])
            groups: dict[tuple[str, str], list[dict]] = {}
            for r in cnn:
                groups.setdefault((r["layer"], r["train_size_spec"]), []).append(r)
            a = DatasetAnalysis(
                name=src.name, label=src.data.label, classifier=clf, layers=layers, depth=dict(src.depth), sizes=sizes,
                size_counts={s: next(r["train_size"] for r in cnn if r["train_size_spec"] == s) for s in sizes},
                acc={k: _stat([r["accuracy"] for r in v]) for k, v in groups.items()},
                val={k: _stat([r["val_score"] for r in v]) for k, v in groups.items()},
                pixels={s: _stat([r["accuracy"] for r in rs if r["baseline"] and r["train_size_spec"] == s])
                        for s in sizes if any(r["baseline"] and r["train_size_spec"] == s for r in rs)},
                n_train=src.n_train, n_classes=src.n_classes, head_confidence=head_confidence.get(src.name),
            )  # fmt: skip
            _decide(a)
            out.append(a)
    return out


def best_layer(a: DatasetAnalysis, size: str) -> str:
    """The layer with the best mean validation score at `size` (ties: the deeper layer)."""
    return max(
        a.layers, key=lambda n: (a.val[(n, size)].mean, a.depth[n]) if (n, size) in a.val else (-1.0, 0.0)
    )


def _decide(a: DatasetAnalysis) -> None:
    size = a.sizes[-1]
    a.best = best_layer(a, size)
    a.top = max(a.layers, key=lambda n: (a.depth[n] <= 1.0 + 1e-9, a.depth[n]))
    best, top = a.acc[(a.best, size)], a.acc[(a.top, size)]
    gap = best.mean - top.mean
    # the gain needs a layer from the middle of the network, not one just below the top
    others = [n for n in a.layers if n != a.top and (n, size) in a.acc and a.depth[n] <= MID_MAX_DEPTH]
    chance = 1.0 / max(a.n_classes, 2)
    ev = [
        f"at train size {size} ({a.size_counts[size]} images), the best layer by validation is {a.best} "
        f"(depth {a.depth[a.best]:.2f}): test accuracy {best}; the top layer {a.top} (depth {a.depth[a.top]:.2f}): {top}"
        + (f"; the best layer leads by {gap * 100:.1f} points" if a.best != a.top else ""),
    ]
    if others and top.mean > chance:
        a.mid = min(others, key=lambda n: (abs(a.depth[n] - 0.5), a.depth[n]))
        mid = a.acc[(a.mid, size)]
        a.late_gain = (top.mean - mid.mean) / (top.mean - chance)
        a.measured = "similar" if a.late_gain >= GAIN_THRESHOLD else "different"
        ev.append(f"late-layer gain {a.late_gain:.2f}: from {a.mid} (depth {a.depth[a.mid]:.2f}, {mid.mean:.3f}) to {a.top} "
                  f"({top.mean:.3f}) over chance {chance:.3f} -> behaves as {a.measured} "
                  f"(similar from {GAIN_THRESHOLD})")  # fmt: skip
    else:  # no gain to measure: fall back on whether an earlier layer beats the top one
        a.measured = "similar" if gap <= TOP_TOLERANCE else "different"
        why = (f"the top layer is at chance ({top.mean:.3f})" if others
               else f"no layer at depth <= {MID_MAX_DEPTH} to measure the late-layer gain from")  # fmt: skip
        ev.append(
            f"{why}: the data is taken as {a.measured} "
            f"(similar when the top layer is within {TOP_TOLERANCE * 100:g} point of the best)"
        )
    per_class = a.n_train / max(a.n_classes, 1)
    a.size = "large" if per_class >= LARGE_PER_CLASS else "small"
    a.case = {
        ("small", "similar"): 1,
        ("large", "similar"): 2,
        ("small", "different"): 3,
        ("large", "different"): 4,
    }[(a.size, a.similarity)]
    ev.append(
        f"{a.n_train} training images, {per_class:.0f} per class -> {a.size} (large from {LARGE_PER_CLASS} per class)"
    )
    if len(a.sizes) > 1:
        prev = a.sizes[-2]
        step = best.mean - a.acc[(a.best, prev)].mean
        ev.append(f"learning curve of {a.best}: {a.acc[(a.best, prev)].mean:.3f} at {prev} -> {best.mean:.3f} at {size} "
                  f"({step * 100:+.1f} points)")  # fmt: skip
    if a.pixels.get(size):
        ev.append(f"raw-pixel baseline at {size}: {a.pixels[size]}")
    if a.head_confidence is not None:
        ev.append(
            f"ImageNet head mean top-1 probability on these images: {a.head_confidence:.2f} (reported, not used)"
        )
    if a.label:
        ev.append(
            f"labelled {a.label} by the user"
            + (f"; the measurement says {a.measured}" if a.disagrees else "; the measurement agrees")
        )
    a.evidence = ev


def head_confidence(path: str, head: str) -> float:
    """Mean top-1 softmax probability of the ImageNet head over all images of a codes file."""
    from featx.store import CodesFile

    with CodesFile(path) as f:
        total, n = 0.0, 0
        rows = np.arange(len(f))
        for _, z in f.iter_codes(head, rows):
            z = z - z.max(axis=1, keepdims=True)
            p = np.exp(z)
            total += float((p.max(axis=1) / p.sum(axis=1)).sum())
            n += len(z)
    return total / max(n, 1)
