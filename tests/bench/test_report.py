"""The bench report's words against its own numbers: constructed results where validation and test
disagree, ties, noise, labels."""

import numpy as np

from featx.bench.analysis import analyze
from featx.bench.config import BenchData
from featx.bench.report import markdown_report
from featx.stats import pack_correct

N_TEST = 200


class _Src:
    def __init__(self, name, depth, label=None, n_train=100, n_classes=2):
        self.name, self.depth, self.n_train, self.n_classes = name, depth, n_train, n_classes
        self.data = BenchData(name, label)


def _correct(n_right: int, offset: int = 0) -> np.ndarray:
    """n_right of N_TEST images right, the wrong ones starting at `offset` (so two vectors overlap)."""
    c = np.ones(N_TEST, bool)
    wrong = (np.arange(N_TEST - n_right) + offset) % N_TEST
    c[wrong] = False
    return c


def _rows(name, cells):
    """cells: layer -> (val_score, correct vector)."""
    rows = []
    for layer, (val, correct) in cells.items():
        for seed in (0, 1):
            rows.append(
                {
                    "dataset": name,
                    "layer": layer,
                    "classifier": "softmax",
                    "preset": "",
                    "baseline": "",
                    "train_size_spec": "all",
                    "train_size": 100,
                    "accuracy": float(correct.mean()),
                    "val_score": val,
                    "val_tiebreak": -0.5,
                    "seed": seed,
                    "n_test": N_TEST,
                    "val_source": "5-fold cv",
                    "test_correct": pack_correct(correct),
                }
            )
    return rows


def _report(rows, srcs) -> tuple[list, str]:
    analyses = analyze(rows, srcs)
    return analyses, markdown_report(analyses, title="t", command=None, plots=[], notes=[])


def test_validation_and_test_disagree_reads_correctly():
    """Validation picks `mid`, which is 6 points below the top layer on test: no negative lead,
    the disagreement said in words, the best-on-test layer labelled as such, one meaning of best."""
    depth = {"early": 0.3, "mid": 0.6, "top": 1.0}
    cells = {"early": (0.7, _correct(120)), "mid": (0.95, _correct(150)), "top": (0.9, _correct(162))}
    (a,), md = _report(_rows("x", cells), [_Src("x", depth, "different")])
    assert a.best == "mid" and a.best_on_test == "top"
    assert "leads by -" not in md and "by -" not in md
    assert "is 6.0 points below the top layer top on test (validation and test disagree)" in md
    assert "beyond noise" in md  # 12 images the top layer alone gets right, none the other way
    assert "best on test (not used for the choice): top" in md
    assert md.index("**Use mid (depth 0.60)") < md.index("Test accuracy (mean")  # the answer comes first
    assert "95% CI" in md and "chosen on validation (5-fold cv: the best validation score)" in md
    assert "labelled different" in md
    assert "rule of thumb for small + different data: a linear classifier on codes from earlier" in md.lower()
    assert "not confirmed" in md  # the earlier layer was chosen but loses on test


def test_a_top_layer_choice_is_never_headed_as_earlier_layers():
    depth = {"early": 0.3, "mid": 0.5, "top": 1.0}
    cells = {"early": (0.7, _correct(140)), "mid": (0.86, _correct(176)), "top": (0.9, _correct(180))}
    (a,), md = _report(_rows("y", cells), [_Src("y", depth)])
    assert a.best == "top" and a.measured == "different" and a.case == 3
    heading = next(line for line in md.splitlines() if line.startswith("## y"))
    assert "earlier in the network" not in heading and "measured different" in heading
    assert (
        "measured here: the top layer; the best earlier layer on test, mid, is 2.0 points lower: not confirmed"
        in md
    )


def test_differences_within_noise_say_either_will_do():
    depth = {"early": 0.3, "mid": 0.5, "late": 0.86, "top": 1.0}
    # late and top differ by 2 images out of 200 and disagree on 10 (6 vs 4): far from significant
    cells = {
        "early": (0.6, _correct(120)),
        "mid": (0.7, _correct(150)),
        "late": (0.92, _correct(184, offset=0)),
        "top": (0.91, _correct(182, offset=4)),
    }
    (a,), md = _report(_rows("z", cells), [_Src("z", depth, "similar")])
    assert a.best == "late"
    t = a.paired("late", "top", "all")
    assert t.p > 0.05 and (t.a_only, t.b_only) == (6, 4)
    assert "within noise (exact McNemar p = " in md
    assert "this test cannot tell them apart (not shown equal), so the cheaper one to extract, late" in md
    assert "either will do" not in md and "do as well" not in md  # within noise is unresolved, never equal
    # small + similar: the rule says top codes; an earlier pick within noise of the top is consistent with it
    assert (
        "consistent with it: the chosen earlier layer and the top layer are within noise, so this test cannot "
        "tell them apart (unresolved, not shown equal)"
    ) in md


def test_a_cap_that_decides_the_size_regime_is_named():
    depth = {"early": 0.3, "mid": 0.5, "top": 1.0}
    cells = {"early": (0.7, _correct(140)), "mid": (0.8, _correct(160)), "top": (0.9, _correct(180))}
    src = _Src("big", depth, "similar", n_train=4000, n_classes=10)
    src.uncapped_train, src.cap = 20760, "train=400"
    (a,), md = _report(_rows("big", cells), [src])
    assert a.size == "small" and a.case == 1
    text = (
        "small (as capped by --per-class-limit train=400; the data holds 20760 training images, 2076 per class, "
        "which would be large)"
    )
    assert a.size_text == text and text in md


def test_fine_tune_cells_decide_the_large_data_words():
    """Case 2/4 text points at the measured fine-tune cells when the bench has them (and says they
    are missing when it has not); the fine-tune section's verdict follows its own intervals."""
    from featx.bench.finetune_cells import compare

    depth = {"mid": 0.5, "top": 1.0}
    cells = {"mid": (0.80, _correct(160)), "top": (0.90, _correct(180))}
    src = _Src("big", depth, "similar", n_train=4000, n_classes=2)
    (a,), md = _report(_rows("big", cells), [src])
    assert (
        a.case == 2 and "this bench measured linear probes only (bench --finetune adds fine-tune cells)" in md
    )
    ft = _ft_rows((("depth:0", 0.0, _correct(197), 0.99), ("depth:1.0", 1.0, _correct(180), 0.91)))
    rows = _rows("big", cells) + ft
    (a,) = analyze(rows, [src])
    (c,) = compare([a], rows)
    assert (c.point, c.probe_layer, round(c.gain, 1), c.verdict) == ("depth:0", "top", 8.5, "pays")
    md = markdown_report([a], title="t", command=None, plots=[], notes=[], finetune=[c])
    assert 'measured by this bench\'s fine-tune cells: see "Fine-tuning beside probing"' in md
    assert (
        f"fine-tuning from depth:0 pays (+8.5 points against top, exact McNemar p = {c.p_text}), which confirms it"
        in md
    )


def _ft_rows(points, converged=True):
    """Fine-tune rows: (freeze point, depth, correct vector, val score) for seeds 0 and 1."""
    return [
        {
            "kind": "finetune",
            "model": "",
            "dataset": "big",
            "train_size_spec": "all",
            "train_from": p,
            "layer": p,
            "relative_depth": d,
            "accuracy": float(c.mean()),
            "val_score": val,
            "n_test": N_TEST,
            "epoch": 3,
            "seed": seed,
            "test_correct": pack_correct(c),
            "converged": converged,
            "epochs_run": 3,
            "augment": "none",
            "lr": 0.01,
        }
        for p, d, c, val in points
        for seed in (0, 1)
    ]


def test_fine_tune_verdict_is_mcnemar_like_layers():
    """-2 points on 200 images, every disagreement against the fine-tune: the Wilson intervals
    overlap, but the paired test (the rule layers and models use) says it does not pay."""
    from featx.bench.finetune_cells import compare

    depth = {"mid": 0.5, "top": 1.0}
    cells = {"mid": (0.80, _correct(160)), "top": (0.90, _correct(180))}
    src = _Src("big", depth, "similar", n_train=4000, n_classes=2)
    rows = _rows("big", cells) + _ft_rows((("depth:0", 0.0, _correct(172), 0.95),))
    (a,) = analyze(rows, [src])
    (c,) = compare([a], rows)
    assert c.ft_ci[1] > c.probe_ci[0]  # the intervals overlap
    assert c.paired.p < 0.05 and c.verdict == "does not pay"
    md = markdown_report([a], title="t", command=None, plots=[], notes=[], finetune=[c])
    assert "fine-tuning from depth:0 does not pay (-4.0 points against top" in md and "contradicts it" in md


def test_not_converged_is_a_budget_measurement_not_a_verdict():
    from featx.bench.finetune_cells import compare

    depth = {"mid": 0.5, "top": 1.0}
    cells = {"mid": (0.80, _correct(160)), "top": (0.90, _correct(180))}
    src = _Src("big", depth, "similar", n_train=4000, n_classes=2)
    rows = _rows("big", cells) + _ft_rows((("depth:0", 0.0, _correct(150), 0.95),), converged=False)
    (a,) = analyze(rows, [src])
    (c,) = compare([a], rows)
    assert c.verdict == "does not pay" and not c.converged
    md = markdown_report([a], title="t", command=None, plots=[], notes=[], finetune=[c])
    assert (
        "not converged (validation had not stopped improving when its 3 epochs ran out): a budget measurement, not a verdict"
        in md
    )
    assert "confirms it" not in md and "contradicts it" not in md
    assert "does not pay; not converged" in md


def test_a_baseline_that_beats_everything_leads_the_answer():
    """Raw pixels beat the chosen layer and the fine-tune beyond noise: the first sentence says so
    and what to use; the rule-of-thumb lines take it into account."""
    from featx.bench.analysis import apply_baselines
    from featx.bench.finetune_cells import compare

    depth = {"mid": 0.5, "top": 1.0}
    cells = {"mid": (0.80, _correct(140)), "top": (0.90, _correct(160))}
    src = _Src("big", depth, "different", n_train=40000, n_classes=2)
    pix = [
        {**r, "layer": "pixels", "baseline": "pixels", "model": "pixels"}
        for r in _rows("big", {"pixels": (0.9, _correct(190))})
    ]
    rows = _rows("big", cells) + pix + _ft_rows((("depth:0", 0.0, _correct(170), 0.95),))
    (a,) = analyze(rows, [src])
    (c,) = compare([a], rows)
    apply_baselines([a], [c])
    md = markdown_report([a], title="t", command=None, plots=[], notes=[], finetune=[c])
    assert a.answer.startswith(
        "Use the raw-pixel baseline: raw pixels (logistic regression) beat the chosen layer top"
    )
    assert "and fine-tuning from depth:0 (0.950 against 0.850" in a.answer
    assert "so neither answer of the rule is the one to use here" in md
    assert "so the rule's recommendation is not the one to use here" in a.rule_check


def test_a_baseline_within_noise_changes_nothing():
    from featx.bench.analysis import apply_baselines

    depth = {"mid": 0.5, "top": 1.0}
    cells = {"mid": (0.80, _correct(140)), "top": (0.90, _correct(180))}
    src = _Src("big", depth, "different", n_train=400, n_classes=2)
    pix = [
        {**r, "layer": "pixels", "baseline": "pixels", "model": "pixels"}
        for r in _rows("big", {"pixels": (0.9, _correct(182))})
    ]
    (a,) = analyze(_rows("big", cells) + pix, [src])
    before = a.answer
    apply_baselines([a], [])
    assert a.answer == before and not a.baseline_wins


def test_a_cross_validated_choice_keeps_the_deeper_layer_within_noise_and_says_why(tmp_path):
    """At 10/class under CV, `mid` has the better log-likelihood by a hair (within one paired standard
    error): the report chooses `top`, bolds it, and names the rule; results.csv carries the folds."""
    import csv

    from featx.bench.report import write_results
    from featx.classifiers.selection import LOGLIK

    depth = {"mid": 0.6, "top": 1.0}
    ref = np.array([-0.50, -0.52, -0.48, -0.51, -0.49])
    d = {0: [0.02, -0.02, 0.05, -0.01, 0.01], 1: [0.0, -0.03, 0.04, -0.02, 0.01]}  # mean 0.005, SE 0.0083
    folds = {("mid", s): ref for s in (0, 1)} | {("top", s): ref - d[s] for s in (0, 1)}
    rows = []
    for layer, correct in (("mid", _correct(150)), ("top", _correct(160, offset=5))):
        for seed in (0, 1):
            rows.append(
                {
                    "dataset": "x",
                    "layer": layer,
                    "classifier": "softmax",
                    "preset": "",
                    "baseline": "",
                    "train_size_spec": "10/class",
                    "train_size": 20,
                    "accuracy": float(correct.mean()),
                    "val_score": 0.9,
                    "val_tiebreak": float(folds[layer, seed].mean()),
                    "seed": seed,
                    "n_test": N_TEST,
                    "val_source": "5-fold cv",
                    "val_rule": LOGLIK,
                    "val_folds": list(folds[layer, seed]),
                    "test_correct": pack_correct(correct),
                    "C": 0.1,
                    "relative_depth": depth[layer],
                }
            )
    (a,), md = _report(rows, [_Src("x", depth)])
    assert a.best == "top"
    assert (
        "5-fold cv: the deepest layer within one standard error of the best cross-validated log-likelihood"
        in md
    )
    assert "**Use top (depth 1.00)" in md
    csv_path, _ = write_results(rows, str(tmp_path))
    with open(csv_path) as f:
        got = list(csv.DictReader(f))
    assert got[0]["val_rule"] == LOGLIK and [float(v) for v in got[0]["val_folds"].split()] == list(ref)


def test_a_random_init_control_that_beats_the_pretrained_layer_leads_the_answer():
    """The random-init twin's chosen layer beats the pretrained model's chosen layer beyond noise:
    the pretrained analysis' answer starts by saying so and what to use."""
    from featx.bench.analysis import apply_baselines

    depth = {"mid": 0.5, "top": 1.0}
    pre, rnd = _Src("big", depth, "different"), _Src("big", depth, "different")
    pre.model, rnd.model, rnd.control_of = "m@imagenet", "m@none", "m@imagenet"
    rows = [
        {**r, "model": "m@imagenet"}
        for r in _rows("big", {"mid": (0.8, _correct(140)), "top": (0.9, _correct(150))})
    ]
    rows += [
        {**r, "model": "m@none", "control_of": "m@imagenet"}
        for r in _rows("big", {"mid": (0.8, _correct(170)), "top": (0.95, _correct(190))})
    ]
    analyses = analyze(rows, [pre, rnd])
    a = next(x for x in analyses if not x.control_of)
    apply_baselines(analyses, [])
    assert a.answer.startswith(
        "Use m@none's top codes (random init): the random-init control's top beat the chosen layer top"
    )
    assert "the pretrained network does not pay on this data" in a.answer
