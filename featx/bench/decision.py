"""One decision table per (dataset, train size): every way the bench measured to get a classifier
(probes and fine-tunes, of every model), with what each costs, and the answer.

Rows. Each model's chosen probe layer per classifier (featx.bench.analysis.best_layer: validation
only), and each fine-tune (freeze point, method), both aggregated over seeds (means of the
validation score, the test accuracy and the training seconds; the first seed's per-image
correctness for the paired test). The random-init controls' chosen layers and the raw-pixel
baseline appear as references below them: never candidates, never the answer.

The rule (validation only; the test split never chooses):
1. candidates: the rows that are neither references nor fine-tunes that had not converged (their
   validation was still improving when their epochs ran out: a budget measurement, shown and
   marked, never the answer);
2. the answer is the candidate with the highest validation score (a tie goes to the cheaper);
3. its noise band is the Wilson 95% interval of that score over its validation images (`n_val` of
   one cell; under cross-validation, its training images, each validated once); every candidate
   whose validation score reaches the band's lower end is within noise of it;
4. beside the answer, the cheapest candidate within noise (by trainable parameters, then training
   seconds, then inference milliseconds per image; a cost a row does not carry counts as the most
   expensive) is named when it is cheaper than the answer: the saving on offer, with its test
   evidence. It does not replace the answer: with the few validation images a small dataset
   leaves, the band is wide, and a row inside it may still be worse beyond noise on test (measured:
   docs/results/adaptation.md).

Each row's test accuracy carries its Wilson 95% interval over `n_test` images and the exact McNemar
p against the answer on the same test images ("not paired" when the images differ or were not
stored): evidence, never the choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from featx.bench.analysis import NOISE_P, best_layer, classifier_label
from featx.classifiers.cost import UNKNOWN, number_text, params_text
from featx.stats import mcnemar_exact, unpack_correct, wilson_interval


@dataclass(frozen=True)
class Option:
    """One row of a decision table: a probe at its chosen layer, a fine-tune (freeze point, method),
    or a reference (control, pixels), aggregated over seeds."""

    model: str
    where: str  # the layer, or the freeze point with its module
    method: str  # "probe (softmax)", "lora (rank 8)", "fine-tune (method –)"
    val: float
    acc: float
    n_test: int
    seeds: int
    n_val: int | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    train_seconds: float | None = None
    inference_ms: float | None = None
    converged: bool = True
    reference: str = ""  # "random-init control", "raw pixels": never a candidate
    correct: object = field(default=None, repr=False, compare=False)  # first seed's per-image correctness

    @property
    def candidate(self) -> bool:
        return not self.reference and self.converged

    @property
    def name(self) -> str:
        return f"{self.model} {self.where}, {self.method}"

    def ci(self) -> tuple[float, float]:
        return wilson_interval(int(round(self.acc * self.n_test)), self.n_test)

    def cost_key(self) -> tuple[float, float, float]:
        def known(v) -> float:
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.inf

        return (known(self.trainable_params), known(self.train_seconds), known(self.inference_ms))


@dataclass
class Decision:
    dataset: str
    size: str
    n_train: int
    options: list[Option]  # candidates by validation score, then not converged, then references
    answer: Option | None = None  # the best by validation
    cheaper: Option | None = None  # the cheapest candidate within the answer's noise band, when cheaper
    band: tuple[float, float] | None = None  # the best's validation Wilson interval
    words: list[str] = field(default_factory=list)

    @property
    def best(self) -> Option | None:
        """The best by validation: the answer."""
        return self.answer


def _mean(values) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return float(np.mean(vals)) if vals and len(vals) == len(values) else None


def _option(rs: list[dict], model: str, where: str, method: str, reference: str = "") -> Option:
    first = min(rs, key=lambda r: r["seed"])
    n_test = int(first.get("n_test") or 0)
    bits = first.get("test_correct")
    return Option(
        model,
        where,
        method,
        float(np.mean([r["val_score"] for r in rs])),
        float(np.mean([r["accuracy"] for r in rs])),
        n_test,
        len(rs),
        _n_val(first),
        first.get("trainable_params"),
        first.get("total_params"),
        _mean([r.get("train_seconds") for r in rs]),
        first.get("inference_ms_per_image"),
        all(r.get("converged", True) is not False for r in rs),
        reference,
        unpack_correct(bits, n_test) if bits else None,
    )


def _n_val(r: dict) -> int | None:
    """The validation images behind one cell's score: its hold-out, or under cross-validation its
    training images (each validated once across the folds)."""
    if r.get("n_val"):
        return int(r["n_val"])
    if "cv" in str(r.get("val_source") or "") and r.get("train_size"):
        return int(r["train_size"])
    return None


def _finetune_method(r: dict) -> str:
    m = r.get("method")
    if not m:
        return f"fine-tune (method {UNKNOWN})"
    if m == "lora" and r.get("lora_rank") is not None:
        return f"lora (rank {r['lora_rank']})"
    return str(m)


def decisions(analyses, rows: list[dict]) -> list[Decision]:
    """A Decision per (dataset, train size) of the bench, in the analyses' order."""
    out: dict[tuple[str, str], Decision] = {}
    for a in analyses:
        for size in a.sizes:
            d = out.setdefault((a.name, size), Decision(a.name, size, a.size_counts[size], []))
            layer = best_layer(a, size)
            rs = [
                r
                for r in rows
                if r.get("kind", "probe") == "probe"
                and not r.get("baseline")
                and (r["dataset"], r.get("model", ""), classifier_label(r), r["layer"], r["train_size_spec"])
                == (a.name, a.model, a.classifier, layer, size)
            ]
            if rs:
                ref = "random-init control" if a.control_of else ""
                d.options.append(
                    _option(rs, a.model, f"{layer} ({a.depth[layer]:.2f})", f"probe ({a.classifier})", ref)
                )
    for (name, size), d in out.items():
        pix: dict[str, list[dict]] = {}
        ft: dict[tuple, list[dict]] = {}
        for r in rows:
            if r["dataset"] != name or r["train_size_spec"] != size:
                continue
            if r.get("kind") == "finetune":
                ft.setdefault((r.get("model", ""), r["train_from"], _finetune_method(r)), []).append(r)
            elif r.get("baseline"):
                pix.setdefault(classifier_label(r), []).append(r)
        for (model, point, method), rs in ft.items():
            depth = rs[0].get("relative_depth")
            at = f", {depth:.2f}" if isinstance(depth, (int, float)) else ""
            module = "everything trains" if str(rs[0]["layer"]).startswith("input") else rs[0]["layer"]
            d.options.append(_option(rs, model, f"{point} ({module}{at})", method))
        for clf, rs in pix.items():
            d.options.append(_option(rs, "raw pixels", "pixels", f"probe ({clf})", "raw pixels"))
        _decide(d)
    return list(out.values())


def _decide(d: Decision) -> None:
    """The answer of `d` by the module's rule, the rows in table order, and the words."""
    cands = [o for o in d.options if o.candidate]
    d.options.sort(key=lambda o: (o.reference != "", not o.converged, -o.val))
    if not cands:
        d.words = ["No candidate: every row is a reference or a fine-tune that had not converged."]
        return
    d.answer = max(cands, key=lambda o: (o.val, tuple(-c for c in o.cost_key())))
    n = d.answer.n_val
    d.band = wilson_interval(int(round(d.answer.val * n)), n) if n else None
    within = [o for o in cands if d.band is not None and o.val >= d.band[0]] or [d.answer]
    cheapest = min(within, key=lambda o: (o.cost_key(), -o.val))
    ans = d.answer
    d.cheaper = cheapest if cheapest is not ans and cheapest.cost_key() < ans.cost_key() else None
    lo, hi = ans.ci()
    words = [
        f"Use {ans.name}, the best by validation: {ans.val:.3f}"
        + (f" ({ans.n_val} images)" if ans.n_val else "")
        + f"; test accuracy {ans.acc:.3f} (95% CI {lo:.2f}-{hi:.2f}, {ans.n_test} test images); "
        f"trainable parameters {params_text(ans.trainable_params)}, training {number_text(ans.train_seconds)} s, "
        f"inference {number_text(ans.inference_ms)} ms/image."
    ]
    band = f"{d.band[0]:.3f}-{d.band[1]:.3f} over {ans.n_val} validation images" if d.band else ""
    if d.cheaper is None:
        words.append(
            f"No cheaper candidate reaches its validation interval ({band})."
            if d.band
            else "Its validation size is unknown, so no noise band is drawn around it."
        )
    else:
        c = d.cheaper
        t = _paired(c, ans)
        test = f"on test it differs from the answer by {(c.acc - ans.acc) * 100:+.1f} points" + (
            f" ({'beyond' if t.p < NOISE_P else 'within'} noise, exact McNemar p = {t.p:.2g})"
            if t
            else " (not paired)"
        )
        words.append(
            f"Cheaper within its validation noise: {c.name} (validation {c.val:.3f} reaches the interval {band}; "
            f"trainable parameters {params_text(c.trainable_params)}, training {number_text(c.train_seconds)} s, "
            f"inference {number_text(c.inference_ms)} ms/image); {test}: evidence for weighing the saving, not a "
            "choice made on test."
        )
    late = [o for o in d.options if not o.reference and not o.converged]
    if late:
        words.append(
            f"Not converged ({len(late)} fine-tune row{'s' if len(late) > 1 else ''}, marked): validation was "
            "still improving when the epochs ran out: a budget measurement, never the answer."
        )
    for o in d.options:
        t = _paired(o, ans) if o.reference else None
        if t and t.p < NOISE_P and t.a_only > t.b_only:
            words.append(
                f"The reference {o.name} beats the answer on test beyond noise (exact McNemar p = {t.p:.2g}): "
                "the pretrained network's codes do not pay here; see the per-dataset answer."
            )
    d.words = words


def _paired(x: Option, y: Option):
    """McNemar of x against y on the same test images (None: not paired)."""
    if x.correct is None or y.correct is None or len(x.correct) != len(y.correct):
        return None
    return mcnemar_exact(x.correct, y.correct)


RULE_TEXT = (
    "Per dataset and train size, every way this bench measured to get a classifier: each model's chosen probe "
    "layer per classifier and each fine-tune (freeze point, method), seed means. The answer is chosen on "
    "validation, never on test: the best validation score. Beside it, the cheapest candidate (trainable "
    "parameters, then training seconds, then inference ms per image; an unknown cost counts as the most "
    "expensive) whose validation score lies within the answer's Wilson 95% interval over its validation "
    "images is named when it is cheaper: the saving on offer, with its test evidence. Fine-tunes that "
    "had not converged and the references (random-init controls, raw pixels) are never the answer. Test "
    "accuracy (Wilson 95% interval, n test images) and the exact McNemar p against the answer on the same test "
    f"images are evidence. {UNKNOWN}: not measured. Inference: the forward pass a prediction needs, on this "
    "bench's device; k-NN trains no parameters (it keeps its training codes)."
)


def decision_section(decs: list[Decision], table) -> list[str]:
    """report.md's lines for the decision tables (`table`: report.markdown_table)."""
    if not decs:
        return []
    lines = ["## Decision: what to use, with its cost", "", RULE_TEXT, ""]
    for d in decs:
        rows = []
        for o in d.options:
            mark = (
                "**answer** (best by validation)"
                if o is d.answer
                else "cheaper within noise"
                if o is d.cheaper
                else "reference"
                if o.reference
                else "not converged (budget)"
                if not o.converged
                else ""
            )
            lo, hi = o.ci()
            t = _paired(o, d.answer) if d.answer is not None and o is not d.answer else None
            p = "" if o is d.answer else (f"{t.p:.2g}" if t else "not paired")
            rows.append(
                [
                    mark,
                    o.model,
                    o.where,
                    o.method,
                    f"{o.val:.3f}" + (f" ({o.n_val})" if o.n_val else ""),
                    f"{o.acc:.3f} ({lo:.2f}-{hi:.2f}, {o.n_test})",
                    p,
                    params_text(o.trainable_params),
                    number_text(o.train_seconds),
                    number_text(o.inference_ms),
                ]
            )
        lines += [f"### {d.dataset}, train size {d.size} ({d.n_train} images)", ""]
        lines += [f"**{d.words[0]}**", "", *[f"- {w}" for w in d.words[1:]], ""]
        lines += [
            table(
                rows,
                [
                    "",
                    "model",
                    "layer / freeze point (depth)",
                    "method",
                    "val score (n)",
                    "test acc (95% CI, n)",
                    "McNemar p vs answer",
                    "trainable params",
                    "train s",
                    "inference ms/img",
                ],
            ),
            "",
        ]
    return lines
