"""Across the models of one bench: which model and which layer (by validation, never test), what
pretraining adds over the random-init control at each depth, and how well each transferability score
ranked the layers against the measured probes.

Which model, which layer. Each model's analysis (featx.bench.analysis) has already chosen its layer by
validation at the largest train size; among the pretrained models (a random-init control is a
reference, never a candidate) the model whose chosen layer has the best mean validation score wins
(ties: the continuous validation score, then the order of --model). Its lead over the runner-up model is tested with the exact McNemar test on the
same test images (first seed), where both files hold the same images in the same splits; the best
on test is shown, labelled as such, never used.

Pretraining gain. For each random-init control, per layer (the same architecture has the same
layers at the same relative depths): test accuracy of the pretrained model minus the control's, at
the largest train size, in points.

Score agreement. Per (model, dataset) and score: Kendall's tau-b between the score and the measured
test accuracy of each layer's probe (C chosen by validation) at the largest train size, across the
layers, and the layer each score would pick beside the layer validation picks. A score shows
agreement with the measurement; it never replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from featx.bench.analysis import NOISE_P, DatasetAnalysis
from featx.classifiers import selection
from featx.stats import mcnemar_exact


@dataclass
class ModelChoice:
    """One dataset (and classifier) of a several-model bench: every model's chosen layer, the pick."""

    dataset: str
    classifier: str
    size: str
    entries: list[DatasetAnalysis]  # one per model, in bench order
    chosen: DatasetAnalysis
    runner_up: DatasetAnalysis | None
    answer: str = ""
    evidence: list[str] = field(default_factory=list)


def _loglik(a: DatasetAnalysis, size: str) -> bool:
    """Was a's layer at `size` chosen by featx.classifiers.selection's cross-validated log-likelihood rule?"""
    c = a.candidates.get((a.best, size))
    return c is not None and c.rule == selection.LOGLIK


def _val_key(a: DatasetAnalysis, size: str):
    """Models are ranked by the score their layers were chosen by (val_score, or under CV the
    log-likelihood first), each at its chosen layer."""
    k = (a.best, size)
    val, tie = a.val[k].mean if k in a.val else -1.0, a.tie[k].mean if k in a.tie else 0.0
    return ((tie, val) if _loglik(a, size) else (val, tie)) + (not a.control_of,)


def _paired(a: DatasetAnalysis, b: DatasetAnalysis, size: str):
    """McNemar of a's and b's chosen layers on the same test images, when they are the same images."""
    if a.rows_digest and b.rows_digest and a.rows_digest != b.rows_digest:
        return None
    ca, cb = a.correct.get((a.best, size)), b.correct.get((b.best, size))
    return None if ca is None or cb is None or len(ca) != len(cb) else mcnemar_exact(ca, cb)


def model_choices(analyses: list[DatasetAnalysis]) -> list[ModelChoice]:
    """Per (dataset, classifier) with two or more models: which model, which layer, by validation."""
    groups: dict[tuple[str, str], list[DatasetAnalysis]] = {}
    for a in analyses:
        if not a.control_of:  # a random-init control is a reference (what pretraining adds), never an answer
            groups.setdefault((a.name, a.classifier), []).append(a)
    out = []
    for (name, clf), group in groups.items():
        if len(group) < 2:
            continue
        size = group[0].sizes[-1]
        ranked = sorted(group, key=lambda a: _val_key(a, size), reverse=True)  # stable: bench order on ties
        c = ModelChoice(name, clf, size, group, ranked[0], ranked[1])
        _explain(c)
        out.append(c)
    return out


def _explain(c: ModelChoice) -> None:
    a, b, size = c.chosen, c.runner_up, c.size
    lo, hi = a.ci(a.best, size)
    score = (
        f"the best cross-validated log-likelihood ({a.tie[(a.best, size)].mean:.3f})"
        if _loglik(a, size)
        else f"the best validation score ({a.val[(a.best, size)].mean:.3f})"
    )
    c.answer = (
        f"Use {a.model}, layer {a.best} (depth {a.depth[a.best]:.2f}): {score} "
        f"of {len(c.entries)} models at train size {size}; test accuracy "
        f"{a.acc[(a.best, size)].mean:.3f} (95% CI {lo:.2f}-{hi:.2f}, {a.n_test} test images)."
    )
    d = (a.acc[(a.best, size)].mean - b.acc[(b.best, size)].mean) * 100
    rel = (
        "level with"
        if abs(d) < 0.05
        else f"{d:.1f} points above"
        if d > 0
        else f"{-d:.1f} points below (validation and test disagree)"
    )
    line = f"the chosen {a.model} {a.best} is {rel} the runner-up by validation, {b.model} {b.best}, on test"
    t = _paired(a, b, size)
    if t is not None:
        verdict = "beyond noise" if t.p < NOISE_P else "within noise: this test cannot tell them apart"
        line += f" ({verdict}; exact McNemar p = {t.p:.2g} on {a.n_test} test images)"
    c.evidence.append(line)
    best_test = max(c.entries, key=lambda e: e.acc[(e.best_on_test, size)].mean)
    if best_test.acc[(best_test.best_on_test, size)].mean > a.acc[(a.best, size)].mean:
        c.evidence.append(
            f"best on test (not used for the choice): {best_test.model} {best_test.best_on_test}, "
            f"{best_test.acc_text(best_test.best_on_test, size)}"
        )


@dataclass
class PretrainingGain:
    """Pretrained minus random-init test accuracy per layer, at the largest train size."""

    dataset: str
    classifier: str
    model: str  # the pretrained model's label
    control: str
    size: str
    by_layer: list[tuple[str, float, float, float, float]]  # (layer, depth, pretrained, random, gain)
    sentence: str = ""


def pretraining_gains(analyses: list[DatasetAnalysis]) -> list[PretrainingGain]:
    out = []
    for ctl in (a for a in analyses if a.control_of):
        pre = next(
            (
                a
                for a in analyses
                if a.model == ctl.control_of and a.name == ctl.name and a.classifier == ctl.classifier
            ),
            None,
        )
        if pre is None:
            continue
        size = pre.sizes[-1]
        rows = [
            (
                n,
                pre.depth[n],
                pre.acc[(n, size)].mean,
                ctl.acc[(n, size)].mean,
                pre.acc[(n, size)].mean - ctl.acc[(n, size)].mean,
            )
            for n in pre.layers
            if (n, size) in pre.acc and (n, size) in ctl.acc
        ]
        if not rows:
            continue
        g = PretrainingGain(pre.name, pre.classifier, pre.model, ctl.model, size, rows)
        top, low = max(rows, key=lambda r: r[4]), min(rows, key=lambda r: r[4])
        first, last = rows[0], rows[-1]
        g.sentence = (
            f"On {pre.name}, {pre.model}'s pretraining adds {first[4] * 100:+.1f} points over random init "
            f"at depth {first[1]:.2f} and {last[4] * 100:+.1f} at depth {last[1]:.2f}; most at depth "
            f"{top[1]:.2f} ({top[0]}, {top[4] * 100:+.1f}), least at depth {low[1]:.2f} ({low[0]}, "
            f"{low[4] * 100:+.1f}), at train size {size}; the random control's own best layer by "
            f"validation is {ctl.best} (depth {ctl.depth[ctl.best]:.2f})."
        )
        out.append(g)
    return out


@dataclass
class ScoreAgreement:
    metric: str
    tau: float | None  # Kendall's tau-b across layers; None with fewer than 3 layers or a constant side
    p: float | None
    n_layers: int
    pick: str  # the layer the score ranks first
    measured: str  # the layer validation chose


def score_agreement(a: DatasetAnalysis) -> list[ScoreAgreement]:
    """Per score: Kendall's tau between score and measured test accuracy across a's layers, at the
    largest train size, and the layer each picks."""
    from scipy.stats import kendalltau

    size = a.sizes[-1]
    layers = [n for n in a.layers if n in a.scores and (n, size) in a.acc]
    metrics = list(dict.fromkeys(m for n in layers for m in a.scores[n]))
    out = []
    for m in metrics:
        have = [n for n in layers if m in a.scores[n]]
        x = np.array([a.scores[n][m] for n in have])
        y = np.array([a.acc[(n, size)].mean for n in have])
        tau = p = None
        if len(have) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
            res = kendalltau(x, y)
            tau, p = float(res.statistic), float(res.pvalue)
        pick = max(have, key=lambda n: a.scores[n][m]) if have else ""
        out.append(ScoreAgreement(m, tau, p, len(have), pick, a.best))
    return out
