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
0.03 (Fashion-MNIST); docs/results/transferability.md. The best layer is the one with the
best mean validation score, never chosen on test data; its lead over the top layer is reported as
evidence. The ImageNet head's mean top-1 probability on the target images is reported too, but
not used: it does not separate the two kinds (scikit-learn digits 0.87, flowers 0.19), it measures
confidence, not similarity.

Selection and uncertainty. The chosen ("best") layer is featx.classifiers.selection.choose_layer's: the best
mean validation score, ties broken by the continuous validation score (`val_tiebreak`), never by
position; under cross-validation (softmax), the deepest layer within one paired standard error of
the best cross-validated log-likelihood. It is the one meaning of "best" in the tables, the summary and the plots (the best layer *on test* is
shown too, labelled as such). Every test accuracy carries its Wilson 95% interval over the test
images. When the chosen layer and another candidate (the top layer, the runner-up by validation)
differ, the exact McNemar test on the same test images (the first seed's cells) says whether the
difference is beyond noise (p < 0.05) or not.

Size. `large` when the training split holds at least `LARGE_PER_CLASS` (1,000) images per class
on average (fine-tuning a full network on fewer tends to overfit), else `small`; the report adds
the learning curve's last step (accuracy gained from the second-largest to the largest train size)
as evidence of whether more data still pays.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from featx.classifiers import selection
from featx.stats import Paired, mcnemar_exact, unpack_correct, wilson_interval

GAIN_THRESHOLD = 0.1
MID_MAX_DEPTH = 0.75
TOP_TOLERANCE = 0.01  # the fallback without a gain: similar when the top layer is this close to the best
LARGE_PER_CLASS = 1000
NOISE_P = 0.05  # a paired difference with a larger McNemar p is "within noise"

RULES = {  # what the rule of thumb recommends, per case
    1: "a linear classifier on the top (penultimate) codes",
    2: "fine-tuning through the network",
    3: "a linear classifier on codes from earlier in the network",
    4: "fine-tuning the whole network",
}


def rule_text(case: int, classifier: str) -> str:
    """What the rule of thumb recommends for `case`, naming the probe this analysis measured: the rule
    speaks of a linear classifier, a k-NN analysis measured a k-NN classifier."""
    text = RULES[case]
    return text.replace("a linear classifier", probe_words(classifier))


def classifier_label(row: dict) -> str:
    """A probe row's classifier as analyses name it: 'softmax', or with its preset 'svm/kornblith'."""
    return f"{row['classifier']}{'/' + row['preset'] if row.get('preset') else ''}"


def probe_words(classifier: str) -> str:
    """'a linear classifier', or 'a k-NN classifier' for the k-NN probe (classifier 'knn')."""
    return "a k-NN classifier" if classifier.split("/")[0] == "knn" else "a linear classifier"


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
    tie: dict[tuple[str, str], Stat] = field(default_factory=dict)  # continuous validation tie-break
    correct: dict[tuple[str, str], np.ndarray] = field(
        default_factory=dict
    )  # first seed's per-image correctness
    val_source: dict[str, str] = field(default_factory=dict)  # size -> how validation was done
    candidates: dict[tuple[str, str], selection.Candidate] = field(default_factory=dict)  # for choose_layer
    n_test: int = 0
    n_train: int = 0
    n_classes: int = 0
    uncapped_train: int | None = None  # the training images the data holds, when a cap removed some
    cap: str = ""
    head_confidence: float | None = None
    late_gain: float | None = None
    mid: str = ""
    best: str = ""
    top: str = ""
    measured: str = ""
    size: str = ""
    case: int = 0
    evidence: list[str] = field(default_factory=list)
    best_on_test: str = ""
    gain_by_size: dict[str, float] = field(default_factory=dict)
    answer: str = ""
    rule_check: str = ""
    size_text: str = ""  # the size regime, and what capped it
    model: str = ""  # the model's label in a bench of several models ("" in older results)
    control_of: str = ""  # a random-init control: the label of the pretrained model it controls
    rows_digest: str = ""  # equal digests: the same images in the same splits (test images pair up)
    scores: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # layer -> metric -> score (largest size)
    finetuned: bool = False  # the bench has fine-tune cells for this dataset (bench --finetune)
    pixels_correct: dict[str, np.ndarray] = field(
        default_factory=dict
    )  # size -> raw pixels' first-seed correctness
    baseline_wins: str = ""  # set by apply_baselines: which baseline beat what, beyond noise

    def ci(self, layer: str, size: str) -> tuple[float, float]:
        """Wilson 95% interval of the (seed-mean) test accuracy over the n test images."""
        acc = self.acc[(layer, size)].mean
        return wilson_interval(int(round(acc * self.n_test)), self.n_test)

    def acc_text(self, layer: str, size: str) -> str:
        lo, hi = self.ci(layer, size)
        return f"{self.acc[(layer, size)].mean:.3f} (95% CI {lo:.2f}-{hi:.2f})"

    def paired(self, a: str, b: str, size: str) -> Paired | None:
        """McNemar of layers a and b on the same test images (first seed), when both were stored."""
        ca, cb = self.correct.get((a, size)), self.correct.get((b, size))
        return None if ca is None or cb is None or len(ca) != len(cb) else mcnemar_exact(ca, cb)

    @property
    def similarity_text(self) -> str:
        """'labelled similar' or 'measured different': who decided, in the words."""
        return f"labelled {self.label}" if self.label else f"measured {self.measured}"

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
        model = getattr(src, "model", "")
        # the raw-pixel baseline belongs to the dataset, whichever model's sources it came with
        mine = [
            r
            for r in rows
            if r["dataset"] == src.name
            and r.get("kind", "probe") == "probe"
            and (r["baseline"] or r.get("model", "") == model)
        ]  # fine-tune rows: featx.bench.finetune_cells.compare
        for clf in dict.fromkeys(classifier_label(r) for r in mine):
            rs = [r for r in mine if classifier_label(r) == clf]
            cnn = [r for r in rs if not r["baseline"]]
            if not cnn:
                continue
            sizes = sorted(
                dict.fromkeys(r["train_size_spec"] for r in cnn),
                key=lambda s: next(r["train_size"] for r in cnn if r["train_size_spec"] == s),
            )
            layers = sorted(dict.fromkeys(r["layer"] for r in cnn), key=lambda n: src.depth[n])
            groups: dict[tuple[str, str], list[dict]] = {}
            for r in cnn:
                groups.setdefault((r["layer"], r["train_size_spec"]), []).append(r)
            first = {k: min(v, key=lambda r: r["seed"]) for k, v in groups.items()}
            a = DatasetAnalysis(
                name=src.name,
                label=src.data.label,
                classifier=clf,
                layers=layers,
                depth=dict(src.depth),
                sizes=sizes,
                size_counts={
                    s: next(r["train_size"] for r in cnn if r["train_size_spec"] == s) for s in sizes
                },
                acc={k: _stat([r["accuracy"] for r in v]) for k, v in groups.items()},
                val={k: _stat([r["val_score"] for r in v]) for k, v in groups.items()},
                pixels={
                    s: _stat([r["accuracy"] for r in rs if r["baseline"] and r["train_size_spec"] == s])
                    for s in sizes
                    if any(r["baseline"] and r["train_size_spec"] == s for r in rs)
                },
                n_train=src.n_train,
                n_classes=src.n_classes,
                head_confidence=head_confidence.get((model, src.name), head_confidence.get(src.name)),
                uncapped_train=getattr(src, "uncapped_train", None),
                cap=getattr(src, "cap", ""),
                tie={k: _stat([r.get("val_tiebreak") or 0.0 for r in v]) for k, v in groups.items()},
                correct={
                    k: unpack_correct(r["test_correct"], r["n_test"])
                    for k, r in first.items()
                    if r.get("test_correct")
                },
                val_source={
                    s: next(r.get("val_source", "") for r in cnn if r["train_size_spec"] == s) for s in sizes
                },
                pixels_correct={
                    s: unpack_correct(r["test_correct"], r["n_test"])
                    for s in sizes
                    for r in [
                        min(
                            (r for r in rs if r["baseline"] and r["train_size_spec"] == s),
                            key=lambda r: r["seed"],
                            default={},
                        )
                    ]
                    if r.get("test_correct")
                },
                candidates={
                    k: replace(selection.candidate(k[0], v), depth=src.depth[k[0]]) for k, v in groups.items()
                },
                n_test=int(cnn[0].get("n_test") or 0),
                model=model,
                control_of=getattr(src, "control_of", ""),
                rows_digest=getattr(src, "rows_digest", ""),
                scores={
                    r["layer"]: {
                        k[len("score_") :]: v
                        for k, v in r.items()
                        if k.startswith("score_") and v is not None
                    }
                    for r in cnn
                    if r["train_size_spec"] == sizes[-1]
                    and any(k.startswith("score_") and v is not None for k, v in r.items())
                },
            )
            a.finetuned = any(
                r.get("kind") == "finetune" and r["dataset"] == src.name and r.get("model", "") == model
                for r in rows
            )
            _decide(a)
            out.append(a)
    return out


def best_layer(a: DatasetAnalysis, size: str, among: list[str] | None = None) -> str:
    """The layer featx.classifiers.selection.choose_layer picks at `size` (validation only), among `among`."""
    among = list(a.layers if among is None else among)
    fitted = [a.candidates[(n, size)] for n in among if (n, size) in a.candidates]
    return selection.choose_layer(fitted) if fitted else among[0]


def _how(a: DatasetAnalysis, size: str) -> str:
    """How the layer at `size` was chosen, in words: the validation used and the rule."""
    rules = {c.rule for (n, s), c in a.candidates.items() if s == size}
    rule = rules.pop() if len(rules) == 1 else selection.SCORE
    return f"{a.val_source.get(size) or 'validation'}: {selection.RULE_TEXT[rule]}"


def _noise(a: DatasetAnalysis, x: str, y: str, size: str) -> str:
    """', beyond noise (McNemar p = ...)' or ', within noise (p = ...)' for layers x and y."""
    t = a.paired(x, y, size)
    if t is None:
        return ""
    verdict = "beyond noise" if t.p < NOISE_P else "within noise"
    return f", {verdict} (exact McNemar p = {t.p:.2g} on {a.n_test} test images)"


def _within_noise(a: DatasetAnalysis, x: str, y: str, size: str) -> bool:
    t = a.paired(x, y, size)
    return t is not None and t.p >= NOISE_P


def _compare(a: DatasetAnalysis, size: str) -> list[str]:
    """The chosen layer against the top layer and the runner-up, in words that never contradict."""
    best, out = a.best, []
    for other, what in ((a.top, "the top layer"), (_runner_up(a, size), "the runner-up by validation")):
        if not other or other == best or (what != "the top layer" and other == a.top):
            continue
        d = (a.acc[(best, size)].mean - a.acc[(other, size)].mean) * 100
        if abs(d) < 0.05:
            rel = f"is level with {what} {other} on test"
        elif d > 0:
            rel = f"beats {what} {other} by {d:.1f} points on test"
        else:
            rel = f"is {-d:.1f} points below {what} {other} on test (validation and test disagree)"
        line = f"the chosen layer {best} {rel}{_noise(a, best, other, size)}"
        if _within_noise(a, best, other, size):
            shallow = min((best, other), key=lambda n: a.depth[n])
            line += (
                f"; this test cannot tell them apart (not shown equal), so the cheaper one to extract, "
                f"{shallow}, is a sound choice (the forward stops earlier)"
            )
        out.append(line)
    return out


def _runner_up(a: DatasetAnalysis, size: str) -> str:
    rest = [n for n in a.layers if n != a.best and (n, size) in a.val]
    return best_layer(a, size, among=rest) if rest else ""


def _rule_check(a: DatasetAnalysis, size: str) -> str:
    """One sentence: what the rule of thumb says for this case and whether this data confirmed it."""
    rule = f"rule of thumb for {a.size} + {a.similarity} data: {rule_text(a.case, a.classifier)}"
    if a.case in (2, 4):
        if a.finetuned:
            return f'{rule}; measured by this bench\'s fine-tune cells: see "Fine-tuning beside probing"'
        return f"{rule}; this bench measured linear probes only (bench --finetune adds fine-tune cells)"
    earlier = [n for n in a.layers if n != a.top and (n, size) in a.acc]
    if a.best == a.top:
        measured = "the top layer"
        if earlier:
            e = max(earlier, key=lambda n: a.acc[(n, size)].mean)
            loss = (a.acc[(a.top, size)].mean - a.acc[(e, size)].mean) * 100
            measured += (
                f"; the best earlier layer on test, {e}, is {loss:.1f} points lower"
                if loss > 0
                else f"; the earlier layer {e} is {-loss:.1f} points higher on test, but validation chose the top"
            )
    else:
        measured = f"{a.best} (depth {a.depth[a.best]:.2f}), an earlier layer"
    noise = _within_noise(a, a.best, a.top, size) if a.best != a.top else False
    if a.case == 1:
        ok = a.best == a.top or noise
    else:
        ok = a.best != a.top and not noise and a.acc[(a.best, size)].mean > a.acc[(a.top, size)].mean
    verdict = "confirmed" if ok else "not confirmed"
    if a.best != a.top and noise:
        verdict = (
            "consistent with it: the chosen earlier layer and the top layer are within noise, so this test "
            "cannot tell them apart (unresolved, not shown equal)"
            if a.case == 1
            else "not confirmed: the chosen earlier layer and the top layer are within noise"
        )
    return f"{rule}; measured here: {measured}: {verdict}"


def _decide(a: DatasetAnalysis) -> None:
    size = a.sizes[-1]
    a.best = best_layer(a, size)
    a.top = max(a.layers, key=lambda n: (a.depth[n] <= 1.0 + 1e-9, a.depth[n]))
    best, top = a.acc[(a.best, size)], a.acc[(a.top, size)]
    gap = best.mean - top.mean
    # the gain needs a layer from the middle of the network, not one just below the top
    others = [n for n in a.layers if n != a.top and (n, size) in a.acc and a.depth[n] <= MID_MAX_DEPTH]
    chance = 1.0 / max(a.n_classes, 2)
    a.best_on_test = max((n for n in a.layers if (n, size) in a.acc), key=lambda n: a.acc[(n, size)].mean)
    ev = [
        f"at train size {size} ({a.size_counts[size]} images), the chosen layer ({_how(a, size)}) is {a.best} (depth {a.depth[a.best]:.2f}): test accuracy "
        f"{a.acc_text(a.best, size)}; the top layer {a.top} (depth {a.depth[a.top]:.2f}): {a.acc_text(a.top, size)}",
        *_compare(a, size),
    ]
    if a.best_on_test != a.best:
        ev.append(
            f"best on test (not used for the choice): {a.best_on_test} (depth {a.depth[a.best_on_test]:.2f}), "
            f"{a.acc_text(a.best_on_test, size)}"
        )
    if others and top.mean > chance:
        a.mid = min(others, key=lambda n: (abs(a.depth[n] - 0.5), a.depth[n]))
        mid = a.acc[(a.mid, size)]
        a.late_gain = (top.mean - mid.mean) / (top.mean - chance)
        a.measured = "similar" if a.late_gain >= GAIN_THRESHOLD else "different"
        ev.append(
            f"late-layer gain {a.late_gain:.2f} (the verdict, taken at train size {size}): from {a.mid} "
            f"(depth {a.depth[a.mid]:.2f}, {mid.mean:.3f}) to {a.top} ({top.mean:.3f}) over chance {chance:.3f} "
            f"-> behaves as {a.measured} (similar from {GAIN_THRESHOLD})"
        )
        for s in a.sizes:
            if (a.mid, s) in a.acc and (a.top, s) in a.acc and a.acc[(a.top, s)].mean > chance:
                t = a.acc[(a.top, s)].mean
                a.gain_by_size[s] = (t - a.acc[(a.mid, s)].mean) / (t - chance)
        if len(a.gain_by_size) > 1:
            ev.append(
                "late-layer gain by train size: "
                + ", ".join(f"{s} {g:.2f}" for s, g in a.gain_by_size.items())
            )
    else:  # no gain to measure: fall back on whether an earlier layer beats the top one
        a.measured = "similar" if gap <= TOP_TOLERANCE else "different"
        why = (
            f"the top layer is at chance ({top.mean:.3f})"
            if others
            else f"no layer at depth <= {MID_MAX_DEPTH} to measure the late-layer gain from"
        )
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
    capped = ""
    if a.uncapped_train:
        full = a.uncapped_train / max(a.n_classes, 1)
        capped = (
            f" (as capped by --per-class-limit {a.cap}; the data holds {a.uncapped_train} training images, "
            f"{full:.0f} per class"
            + (", which would be large" if full >= LARGE_PER_CLASS and a.size == "small" else "")
            + ")"
        )
    a.size_text = a.size + capped
    ev.append(
        f"{a.n_train} training images, {per_class:.0f} per class -> {a.size_text} (large from {LARGE_PER_CLASS} per class)"
    )
    lo, hi = a.ci(a.best, size)
    a.answer = (
        f"Use {a.best} (depth {a.depth[a.best]:.2f}): test accuracy {a.acc[(a.best, size)].mean:.3f} "
        f"(95% CI {lo:.2f}-{hi:.2f}, {a.n_test} test images) at train size {size} ({a.size_counts[size]} "
        f"images), chosen on validation ({_how(a, size)})."
    )
    a.rule_check = _rule_check(a, size)
    if len(a.sizes) > 1:
        prev = a.sizes[-2]
        step = best.mean - a.acc[(a.best, prev)].mean
        ev.append(
            f"learning curve of {a.best}: {a.acc[(a.best, prev)].mean:.3f} at {prev} -> {best.mean:.3f} at {size} "
            f"({step * 100:+.1f} points)"
        )
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


def apply_baselines(analyses: list[DatasetAnalysis], finetune=()) -> None:
    """Where a baseline (raw pixels, the random-init control's chosen layer) beats what featx would
    recommend (the chosen layer; the chosen fine-tune where there is one) beyond noise (exact
    McNemar on the same test images, first seeds, p < NOISE_P), the answer's first sentence says
    so and what to use, and the rule-of-thumb line takes it into account (`baseline_wins`)."""
    for a in analyses:
        if a.control_of:
            continue
        size = a.sizes[-1]
        ours = [(f"the chosen layer {a.best}", a.acc[(a.best, size)].mean, a.correct.get((a.best, size)))]
        c = next(
            (
                c
                for c in finetune
                if (c.dataset, c.size, c.model, c.classifier) == (a.name, size, a.model, a.classifier)
            ),
            None,
        )
        if c is not None:
            ours.append((f"fine-tuning from {c.point}", c.ft_acc, c.ft_correct))
        bases = []
        if size in a.pixels and size in a.pixels_correct:
            bases.append(
                (
                    "raw pixels (logistic regression)",
                    "the raw-pixel baseline",
                    a.pixels[size].mean,
                    a.pixels_correct[size],
                )
            )
        for b in analyses:
            if (
                b.control_of
                and b.control_of == a.model
                and (b.name, b.classifier) == (a.name, a.classifier)
                and (b.best, size) in b.acc
            ):
                bases.append(
                    (
                        f"the random-init control's {b.best}",
                        f"{b.model}'s {b.best} codes (random init)",
                        b.acc[(b.best, size)].mean,
                        b.correct.get((b.best, size)),
                    )
                )
        for name, use, acc, bits in sorted(bases, key=lambda x: -x[2]):
            beaten = []
            for what, mine, theirs in ours:
                if bits is None or theirs is None or len(bits) != len(theirs) or acc <= mine:
                    continue
                t = mcnemar_exact(bits, theirs)
                if t.p < NOISE_P and t.a_only > t.b_only:
                    beaten.append(f"{what} ({acc:.3f} against {mine:.3f}, exact McNemar p = {t.p:.2g})")
            if not beaten:
                continue
            a.baseline_wins = f"{name} beat {' and '.join(beaten)} beyond noise"
            if len(beaten) == len(ours):
                lead = f"Use {use}: {a.baseline_wins}; the pretrained network does not pay on this data."
            else:
                lead = (
                    f"{a.baseline_wins[0].upper()}{a.baseline_wins[1:]}; fine-tuning from {c.point} is not beaten "
                    f"by it: use the fine-tuned network."
                )
            a.answer = f"{lead} Among the network's layers: {a.answer[0].lower()}{a.answer[1:]}"
            a.rule_check += (
                f"; but {a.baseline_wins}, so the rule's recommendation is not the one to use here"
            )
            break


def head_confidence(path: str, head: str) -> float:
    """Mean top-1 softmax probability of the ImageNet head over all images of a codes file."""
    from featx.store.codes import CodesFile

    with CodesFile(path) as f:
        total, n = 0.0, 0
        rows = np.arange(len(f))
        for _, z in f.iter_codes(head, rows):
            z = z - z.max(axis=1, keepdims=True)
            p = np.exp(z)
            total += float((p.max(axis=1) / p.sum(axis=1)).sum())
            n += len(z)
    return total / max(n, 1)
