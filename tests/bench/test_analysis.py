"""featx.bench.analysis: the per-dataset verdict of a bench (best layer, late-layer gain, size regime,
transfer case) from result rows, and the ImageNet head's confidence from a codes file."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_codes
from featx.bench.analysis import GAIN_THRESHOLD, analyze, best_layer, head_confidence
from featx.bench.config import BenchData
from featx.bench.grid import Source

DEPTH = {"early": 0.25, "mid": 0.5, "late": 0.9, "top": 1.0}


def _source(name="d", label=None, n_train=100, n_classes=2, layers=DEPTH):
    return Source(
        BenchData(name, label),
        name,
        f"{name}.h5",
        list(layers),
        dict(layers),
        {n: 8 for n in layers},
        None,
        n_train=n_train,
        n_classes=n_classes,
    )


def _rows(acc: dict, name="d", sizes=(("10/class", 20), ("all", 100)), seeds=(0,), val=None, pixels=None):
    """Rows like BenchResult.rows(): acc[layer] is the accuracy at the largest size (smaller sizes
    get 0.1 less); val defaults to acc."""
    out = []
    for spec, n in sizes:
        drop = 0.0 if spec == sizes[-1][0] else 0.1
        for layer, a in acc.items():
            for s in seeds:
                v = (val or acc)[layer] - drop
                out.append(
                    {
                        "dataset": name,
                        "layer": layer,
                        "train_size_spec": spec,
                        "train_size": n,
                        "classifier": "softmax",
                        "preset": "",
                        "seed": s,
                        "accuracy": a - drop + 0.01 * s,
                        "val_score": v,
                        "baseline": "",
                    }
                )
        if pixels is not None:
            out.append(
                {
                    "dataset": name,
                    "layer": "pixels",
                    "train_size_spec": spec,
                    "train_size": n,
                    "classifier": "softmax",
                    "preset": "",
                    "seed": 0,
                    "accuracy": pixels,
                    "val_score": pixels,
                    "baseline": "pixels",
                }
            )
    return out


def test_large_late_gain_means_similar_small_data_case_1():
    (a,) = analyze(_rows({"early": 0.6, "mid": 0.7, "late": 0.85, "top": 0.9}), [_source()])
    assert a.mid == "mid" and a.top == "top" and a.best == "top"
    assert a.late_gain == pytest.approx((0.9 - 0.7) / (0.9 - 0.5))
    assert a.measured == "similar" and a.size == "small" and a.case == 1
    assert any("learning curve of top" in e for e in a.evidence)


def test_small_late_gain_means_different_and_size_picks_the_case():
    rows = _rows({"early": 0.8, "mid": 0.85, "late": 0.86, "top": 0.86})
    (small,) = analyze(rows, [_source()])
    assert small.late_gain < GAIN_THRESHOLD and small.measured == "different" and small.case == 3
    (large,) = analyze(rows, [_source(n_train=2000 * 2)])
    assert large.size == "large" and large.case == 4


def test_the_users_label_decides_and_a_disagreement_is_reported():
    (a,) = analyze(_rows({"early": 0.6, "mid": 0.7, "late": 0.85, "top": 0.9}), [_source(label="different")])
    assert a.measured == "similar" and a.similarity == "different" and a.disagrees and a.case == 3
    assert "the measurement says similar" in a.evidence[-1]


def test_best_layer_is_chosen_on_validation_not_test():
    acc = {"early": 0.6, "mid": 0.95, "late": 0.7, "top": 0.8}  # mid is best on test ...
    val = {"early": 0.6, "mid": 0.7, "late": 0.9, "top": 0.8}  # ... but late on validation
    (a,) = analyze(_rows(acc, val=val), [_source()])
    assert a.best == "late" == best_layer(a, "all")


def test_without_a_middle_layer_the_gap_to_the_best_decides():
    layers = {"late": 0.9, "top": 1.0}
    (a,) = analyze(
        _rows({"late": 0.95, "top": 0.8}, val={"late": 0.95, "top": 0.8}), [_source(layers=layers)]
    )
    assert a.late_gain is None and a.measured == "different"  # an earlier layer beats the top one
    (b,) = analyze(_rows({"late": 0.8, "top": 0.8}), [_source(layers=layers)])
    assert b.measured == "similar" and "no layer at depth" in " ".join(b.evidence)


def test_seeds_are_aggregated_and_the_pixel_baseline_is_reported():
    (a,) = analyze(
        _rows({"mid": 0.7, "top": 0.9}, seeds=(0, 1), pixels=0.55), [_source(layers={"mid": 0.5, "top": 1.0})]
    )
    stat = a.acc[("top", "all")]
    assert stat.n == 2 and stat.mean == pytest.approx(0.905) and stat.std == pytest.approx(0.005)
    assert a.pixels["all"].mean == pytest.approx(0.55) and any("raw-pixel baseline" in e for e in a.evidence)


def test_head_confidence_is_the_mean_top1_probability(tmp_path):
    logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0], [0.0, 0.0], [100.0, 0.0]])
    path = write_codes(tmp_path / "h.h5", {"fc": logits}, [0, 1, 0, 1], ["test"] * 4, ["a", "b"])
    assert head_confidence(path, "fc") == pytest.approx((0.5 + 0.75 + 0.5 + 1.0) / 4)
