"""The decision table on constructed bench rows: the answer is chosen on validation (the best, with the
cheapest row within its noise band named beside it), never a reference or a fine-tune that had not converged, and rows
without cost fields still read."""

import numpy as np
import pytest

from featx.bench.analysis import analyze
from featx.bench.config import BenchData
from featx.bench.decision import decision_section, decisions
from featx.bench.report import markdown_report, markdown_table
from featx.stats import pack_correct

N_TEST = 200
DEPTH = {"mid": 0.5, "top": 1.0}


class _Src:
    def __init__(self, name, model, depth, control_of=""):
        self.name, self.model, self.depth, self.control_of = name, model, depth, control_of
        self.n_train, self.n_classes, self.data = 100, 2, BenchData(name, None)


def _correct(n_right: int, offset: int = 0) -> np.ndarray:
    c = np.ones(N_TEST, bool)
    c[(np.arange(N_TEST - n_right) + offset) % N_TEST] = False
    return c


def _probe_rows(model, cells, control_of="", n_val=100, baseline="", cost=True):
    """cells: layer -> (val score, correct vector, trainable params); seeds 0 and 1."""
    rows = []
    for layer, (val, correct, params) in cells.items():
        for seed in (0, 1):
            rows.append(
                {
                    "kind": "probe",
                    "model": model,
                    "control_of": control_of,
                    "dataset": "d",
                    "layer": layer,
                    "relative_depth": None if baseline else DEPTH[layer],
                    "classifier": "softmax",
                    "preset": "",
                    "baseline": baseline,
                    "train_size_spec": "all",
                    "train_size": 100,
                    "accuracy": float(correct.mean()),
                    "val_score": val,
                    "val_tiebreak": -0.5,
                    "seed": seed,
                    "n_test": N_TEST,
                    "n_val": n_val,
                    "val_source": "hold-out 20% of train",
                    "test_correct": pack_correct(correct),
                    **(
                        {
                            "method": "probe",
                            "trainable_params": params,
                            "total_params": params + 1_000_000,
                            "train_seconds": 0.5,
                            "inference_ms_per_image": 1.0 if layer == "top" else 0.5,
                            "inference_batch_size": 64,
                        }
                        if cost
                        else {}
                    ),
                }
            )
    return rows


def _ft_rows(model, points, n_val=100):
    """points: (freeze point, method, val, correct, trainable params or None, converged); seeds 0, 1.
    A None method leaves every cost field out (a fine-tune row from before they existed)."""
    rows = []
    for point, method, val, correct, params, converged in points:
        for seed in (0, 1):
            r = {
                "kind": "finetune",
                "model": model,
                "control_of": "",
                "dataset": "d",
                "layer": "blocks.3",
                "train_from": point,
                "relative_depth": 0.5,
                "classifier": "finetune",
                "preset": "",
                "baseline": "",
                "train_size_spec": "all",
                "train_size": 100,
                "accuracy": float(correct.mean()),
                "val_score": val,
                "seed": seed,
                "n_test": N_TEST,
                "n_val": n_val,
                "test_correct": pack_correct(correct),
                "converged": converged,
                "epoch": 3,
                "epochs_run": 3,
            }
            if method is not None:
                r.update(
                    method=method,
                    trainable_params=params,
                    total_params=5_000_000,
                    train_seconds=100.0,
                    inference_ms_per_image=1.0,
                    inference_batch_size=64,
                )
                if method == "lora":
                    r.update(lora_rank=8, lora_alpha=16)
            rows.append(r)
    return rows


M = "m@imagenet"


def _decide(rows, srcs):
    analyses = analyze(rows, srcs)
    (d,) = decisions(analyses, rows)
    return analyses, d


def test_the_answer_is_the_best_by_validation_when_nothing_cheaper_is_within_noise():
    rows = _probe_rows(M, {"mid": (0.70, _correct(140), 1_000), "top": (0.80, _correct(160), 2_000)})
    rows += _ft_rows(M, [("depth:0.5", "full", 0.95, _correct(190), 4_000_000, True)])
    _, d = _decide(rows, [_Src("d", M, DEPTH)])
    assert d.answer is d.best and d.answer.method == "full"
    assert d.band[0] > 0.80  # the probe's 0.80 lies below the fine-tune's validation interval
    assert d.words[0].startswith(f"Use {M} depth:0.5 (blocks.3, 0.50), full, the best by validation:")
    assert d.cheaper is None and "No cheaper candidate reaches its validation interval" in d.words[1]
    probe = next(o for o in d.options if o.method == "probe (softmax)")
    assert probe.where == "top (1.00)"  # the chosen layer per (model, classifier), by validation


def test_a_cheaper_row_within_the_answer_validation_interval_is_named_beside_it():
    """LoRA leads on validation by one point over 100 images: it is the answer; the probe (fewer
    trainable parameters) lies within the noise band and is named beside it with its test evidence,
    never chosen on test."""
    rows = _probe_rows(M, {"mid": (0.70, _correct(140), 1_000), "top": (0.94, _correct(170), 2_000)})
    rows += _ft_rows(M, [("depth:0.5", "lora", 0.95, _correct(190), 300_000, True)])
    _, d = _decide(rows, [_Src("d", M, DEPTH)])
    assert d.answer is d.best and d.answer.method == "lora (rank 8)"
    assert d.cheaper.method == "probe (softmax)"
    assert d.band[0] <= 0.94 <= d.band[1]
    assert d.words[1].startswith(f"Cheaper within its validation noise: {M} top (1.00), probe (softmax)")
    assert "on test it differs from the answer by -10.0 points" in d.words[1]
    assert "not a choice made on test" in d.words[1]
    md = "\n".join(decision_section([d], markdown_table))
    assert (
        "| **answer** (best by validation) | m@imagenet | depth:0.5 (blocks.3, 0.50) | lora (rank 8) |" in md
    )
    assert "| cheaper within noise | m@imagenet | top (1.00) | probe (softmax) |" in md
    assert "| 2,000 |" in md and "| 300k |" in md


def test_a_fine_tune_that_did_not_converge_is_never_the_answer():
    rows = _probe_rows(M, {"mid": (0.70, _correct(140), 1_000), "top": (0.80, _correct(160), 2_000)})
    rows += _ft_rows(M, [("depth:0", "full", 0.99, _correct(198), 4_000_000, False)])
    _, d = _decide(rows, [_Src("d", M, DEPTH)])
    assert d.answer.method == "probe (softmax)" and d.answer is d.best
    late = next(o for o in d.options if not o.converged)
    assert not late.candidate
    md = "\n".join(decision_section([d], markdown_table))
    assert "| not converged (budget) |" in md and "never the answer" in md


def test_controls_and_raw_pixels_are_references_never_the_answer():
    rows = _probe_rows(M, {"mid": (0.70, _correct(140), 1_000), "top": (0.80, _correct(160), 2_000)})
    ctl = "m@none (random control)"
    rows += _probe_rows(ctl, {"mid": (0.99, _correct(198), 1_000), "top": (0.98, _correct(196), 2_000)}, M)
    rows += _probe_rows("pixels", {"pixels": (0.97, _correct(199, 3), 500)}, baseline="pixels")
    _, d = _decide(rows, [_Src("d", M, DEPTH), _Src("d", ctl, DEPTH, M)])
    assert (d.answer.model, d.answer.where) == (M, "top (1.00)")
    refs = [o for o in d.options if o.reference]
    assert {o.reference for o in refs} == {"random-init control", "raw pixels"}
    assert all(o is not d.answer and o is not d.best for o in refs)
    assert d.options[-2:] == refs  # listed below the candidates
    # the references beat the answer on test beyond noise: the words say so rather than contradict
    assert any("beats the answer on test beyond noise" in w for w in d.words)


@pytest.mark.parametrize("probe_val", [0.945, 0.60])
def test_rows_without_cost_fields_read_as_unknown(probe_val):
    """A fine-tune row from before the cost fields (no method, no parameters): its method and costs
    print '–'; an unknown cost counts as the most expensive, so a measured probe within noise of it is
    named as cheaper, and one outside the band is not."""
    rows = _probe_rows(M, {"mid": (0.50, _correct(100), 1_000), "top": (probe_val, _correct(170), 2_000)})
    rows += _ft_rows(M, [("depth:0.5", None, 0.95, _correct(190), None, True)])
    analyses, d = _decide(rows, [_Src("d", M, DEPTH)])
    ft = next(o for o in d.options if o.method.startswith("fine-tune"))
    assert ft.method == "fine-tune (method –)" and ft.trainable_params is None and ft.train_seconds is None
    assert d.answer is ft
    assert d.cheaper is (
        None if probe_val < 0.9 else next(o for o in d.options if o.method == "probe (softmax)")
    )
    md = markdown_report(
        analyses, title="t", command=None, plots=[], notes=[], decision=decision_section([d], markdown_table)
    )
    assert "## Decision: what to use, with its cost" in md
    assert "| fine-tune (method –) | 0.950 (100) | 0.950 (0.91-0.97, 200) |" in md
    assert "| – | – | – |" in md


def test_probe_rows_without_cost_fields_still_decide():
    """Probe rows from cells fitted before the cost fields: the rule falls back on validation."""
    rows = _probe_rows(M, {"mid": (0.70, _correct(140), 0), "top": (0.80, _correct(160), 0)}, cost=False)
    _, d = _decide(rows, [_Src("d", M, DEPTH)])
    assert d.answer is d.best and d.answer.trainable_params is None
    assert "trainable parameters –, training – s, inference – ms/image" in d.words[0]


def test_depth_plot_marks_each_fine_tune_method_inside_the_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from featx.bench.plots import METHOD_MARKERS, plot_depth

    rows = _probe_rows(M, {"mid": (0.70, _correct(140), 1_000), "top": (0.80, _correct(160), 2_000)})
    methods = ["full", "lp-ft", "bitfit", "lora", None]
    rows += _ft_rows(M, [(f"depth:0.{i}", m, 0.9, _correct(180), 10, True) for i, m in enumerate(methods)])
    analyses = analyze(rows, [_Src("d", M, DEPTH)])
    seen, real_close = [], plt.close
    plt.close = lambda fig=None: seen.append(fig)
    try:
        plot_depth(analyses, str(tmp_path / "depth.png"), "t", [r for r in rows if r["kind"] == "finetune"])
    finally:
        plt.close = real_close
    (fig,) = seen
    fig.canvas.draw()
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    for m in methods[:-1]:
        assert f"d (measured similar): fine-tuned ({m}) from depth" in labels
    assert "d (measured similar): fine-tuned from depth" in labels  # a row without a method
    markers = {line.get_marker() for line in fig.axes[0].get_lines()}
    assert set(METHOD_MARKERS.values()) <= markers
    e, box = legend.get_window_extent(fig.canvas.get_renderer()), fig.bbox
    assert e.x0 >= box.x0 - 1 and e.x1 <= box.x1 + 1 and e.y0 >= box.y0 - 1 and e.y1 <= box.y1 + 1
    real_close(fig)
