"""Several models in one bench: NAME@WEIGHTS parsing, the model column, resume (old cell
keys too), the random-init control, per-layer scores, and the cross-model report read against
constructed results (the validation pick, never the test pick; Kendall's tau)."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest

from conftest import assert_one_line_error, cells_written, cli, make_images, run_cli, sigkill_when
from featx.bench.analysis import analyze
from featx.bench.config import BenchConfig, BenchData
from featx.bench.crossmodel import model_choices, pretraining_gains, score_agreement
from featx.bench.report import markdown_report, write_bench_report
from featx.bench.run import run
from featx.classifiers.protocol import protocol_for
from featx.errors import UsageError
from featx.files import load_done
from featx.models.spec import split_weights as split_model_spec
from featx.settings import ModelSettings
from featx.stats import pack_correct
from featx.store.cache import digest

# -- NAME@WEIGHTS ----------------------------------------------------------------------------------


def test_split_model_spec():
    assert split_model_spec("efficientnet_lite0@imagenet") == ("efficientnet_lite0", "imagenet")
    assert split_model_spec("timm:resnet18@none") == ("timm:resnet18", "none")
    assert split_model_spec(" resnet18 ") == ("resnet18", None)
    assert split_model_spec("resnet18@/ckpt/a@b.pt") == ("resnet18", "/ckpt/a@b.pt")  # the first @ splits
    for bad, needle in (
        ("resnet18@", "no weights after @"),
        ("@none", "no model name"),
        ("", "no model name"),
    ):
        with pytest.raises(UsageError, match=needle):
            split_model_spec(bad)


def test_bench_config_models_and_defaults():
    cfg = BenchConfig(
        ["resnet18@none", "resnet18", ModelSettings("vgg11", "none")],
        [BenchData("x")],
        weights="IMAGENET1K_V1",
        image_size=32,
    )
    # @WEIGHTS wins over the flat weights=, which is the default of a bare name and, as in extract,
    # replaces that field of a given ModelSettings
    assert [model.weights for model in cfg.models] == ["none", "IMAGENET1K_V1", "IMAGENET1K_V1"]
    assert all(model.image_size == 32 for model in cfg.models) and cfg.model == cfg.models[0]
    # the single-model form still works, and a repeated model is benched once
    assert BenchConfig("resnet18", [BenchData("x")], weights="none").models == (
        ModelSettings("resnet18", "none"),
    )
    assert len(BenchConfig(["resnet18@none", "resnet18@none"], [BenchData("x")]).models) == 1
    labels = [
        b.label
        for b in BenchConfig(["a@imagenet", "b@none"], [BenchData("x")], control="random").bench_models()
    ]
    assert labels == ["a@imagenet", "a@none (random control)", "b@none"]
    with pytest.raises(UsageError, match="--control 'fancy'"):
        BenchConfig("resnet18", [BenchData("x")], control="fancy")


@pytest.mark.parametrize(
    "model, needle", [("resnet18@", "no weights after @"), ("@imagenet", "no model name")]
)
def test_bad_model_spec_is_one_line(tmp_path, model, needle):
    rc, _, err = cli(
        "bench",
        "--model",
        "resnet18@none",
        "--model",
        model,
        "--data",
        "sklearn:digits",
        "--out",
        tmp_path / "o",
    )
    assert_one_line_error(rc, err, 2, ("--model", needle))


def test_bad_control_is_one_line(tmp_path):
    rc, _, err = cli("bench", "--model", "resnet18", "--control", "fancy", "--data", "sklearn:digits")
    assert_one_line_error(rc, err, 2, ("--control",))


# -- a real bench of tiny models ------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm")
    a = make_images(root / "alpha", per_class=8, splits=("train", "test"), size=(36, 36), seed=1)
    b = make_images(root / "beta", classes=("x", "y"), per_class=10, size=(36, 36), seed=2)
    import torch
    import torchvision

    torch.manual_seed(1)  # a "pretrained" checkpoint: other weights than featx's seeded random init
    ckpt = root / "r18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), ckpt)
    return root, a, b, str(ckpt)


def _config(root, a, b, out, models, **kw):
    base = dict(
        datasets=[BenchData(str(a), "similar"), BenchData(str(b), "different")],
        layers="depth:0.2,0.4,0.6",
        train_sizes=["2/class", "all"],
        protocols=[protocol_for("softmax", Cs=(0.1, 1.0))],
        seeds=(0, 1),
        image_size=32,
        out=str(out),
        cache_dir=str(root / "cache"),
        workers=0,
        batch_size=8,
        precision="fp32",
    )
    return BenchConfig(models, **{**base, **kw})


def test_two_models_and_a_control_in_one_bench(data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="featx")
    root, a, b, ckpt = data
    out = tmp_path / "out"
    models = [f"resnet18@{ckpt}", "mobilenet_v3_small@none"]
    result = run(_config(root, a, b, out, models, control="random", seeds=(0,)))
    rows = result.rows()
    labels = [f"resnet18@{ckpt}", "resnet18@none (random control)", "mobilenet_v3_small@none"]
    assert list(dict.fromkeys(r["model"] for r in rows)) == labels
    # the leakage check runs on the models' codes, never on a random control's
    assert not [m for m in caplog.messages if "(random control)" in m and "near-copies" in m]
    assert all(s.leakage is None for s in result.sources if s.control_of)
    # 3 models x 2 datasets x 3 layers x 2 sizes
    assert len(rows) == 36 and all(r["relative_depth"] is not None for r in rows)
    assert {r["control_of"] for r in rows if r["model"] == labels[1]} == {labels[0]}
    # the control is the same architecture, randomly initialised: the same layers, other codes
    ctl = {
        (r["dataset"], r["layer"], r["train_size_spec"], r["seed"]): r
        for r in rows
        if r["model"] == labels[1]
    }
    pre = {
        (r["dataset"], r["layer"], r["train_size_spec"], r["seed"]): r
        for r in rows
        if r["model"] == labels[0]
    }
    assert ctl.keys() == pre.keys()
    # scores: every (model, dataset, layer) once, filled on the largest size's rows only
    assert len(load_done(str(out), "scores.jsonl")) == 3 * 2 * 3
    big = [r for r in rows if r["train_size_spec"] == "all"]
    assert all(r["score_hscore"] is not None and r["score_gbc"] is not None for r in big)
    assert all(r["score_logme"] is None for r in rows if r["train_size_spec"] == "2/class")
    paths = write_bench_report(result, "featx bench ...")
    with open(paths["results.csv"]) as f:
        table = list(csv.DictReader(f))
    assert {"model", "control_of", "score_logme", "score_gbc"} <= set(table[0])
    md = open(paths["report.md"]).read()
    assert "## Which model, which layer" in md and "### alpha (softmax)" in md and "### beta (softmax)" in md
    section = md[md.index("### alpha (softmax)") : md.index("### beta (softmax)")]
    # the pretrained models are the candidates; the random control is a reference, never in the choice
    assert all(f"| {lab} |" in section or f"| **{lab}** |" in section for lab in (labels[0], labels[2]))
    assert labels[1] not in section
    assert "## What pretraining adds" in md and "pretraining adds" in md and "## Transferability scores" in md
    assert f"## alpha ({labels[1]}, softmax)" in md
    with open(paths["depth.png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # a rerun fits and scores nothing
    caplog.clear()
    again = run(_config(root, a, b, out, models, control="random", seeds=(0,)))
    assert "36 cells: 36 done before, 0 to fit" in caplog.text
    assert again.rows() == rows and len(open(out / "scores.jsonl").read().splitlines()) == 18


def test_single_model_cell_keys_are_unchanged_and_reused_by_a_bigger_bench(data, tmp_path, caplog):
    """The cell key is still the pre-multi-model digest, so an old single-model cells.jsonl resumes,
    and adding a model to a bench refits only the new model's cells."""
    caplog.set_level(logging.INFO, logger="featx")
    root, a, b, _ = data
    out = tmp_path / "out"
    single = run(_config(root, a, b, out, "resnet18", weights="none", seeds=(0,)))
    for cell, _ in single.cells:
        old = digest(
            {
                "codes": cell.cache_key,
                "layer": cell.layer,
                "train_size": str(cell.train_size),
                "protocol": cell.protocol.to_dict(),
                "seed": cell.seed,
            }
        )
        assert cell.key == old
    assert set(load_done(str(out))) == {c.key for c, _ in single.cells}
    caplog.clear()
    run(_config(root, a, b, out, ["resnet18@none", "mobilenet_v3_small@none"], seeds=(0,)))
    assert "24 cells: 12 done before, 12 to fit" in caplog.text


def test_killed_multi_model_bench_resumes(data, tmp_path):
    root, a, b, _ = data
    args = [
        "bench",
        "--model",
        "resnet18@none",
        "--model",
        "mobilenet_v3_small",
        "--weights",
        "none",
        "--data",
        a,
        "--data",
        b,
        "--layers",
        "depth:0.25,0.5",
        "--train-sizes",
        "2/class,all",
        "--seeds",
        "0,1",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--cache-dir",
        root / "cache",
        "--C",
        "0.1,1",
        "--precision",
        "fp32",
    ]
    out = tmp_path / "killed"
    sigkill_when([*args, "--out", out], lambda: cells_written(out) >= 8)
    done = len(load_done(str(out)))
    assert 8 <= done < 32, done
    r = run_cli(*map(str, args), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"32 cells: {done} done before, {32 - done} to fit" in r.stderr
    with open(out / "results.json") as f:
        assert {row["model"] for row in json.load(f)} == {"resnet18@none", "mobilenet_v3_small@none"}


# -- the report against constructed results ------------------------------------------------------

N_TEST = 200


class _Src:
    def __init__(self, name, model, depth, control_of=""):
        self.name, self.model, self.depth, self.control_of = name, model, depth, control_of
        self.n_train, self.n_classes, self.data = 100, 2, BenchData(name, None)


def _correct(n_right: int, offset: int = 0) -> np.ndarray:
    c = np.ones(N_TEST, bool)
    c[(np.arange(N_TEST - n_right) + offset) % N_TEST] = False
    return c


def _rows(name, model, cells, scores=None, control_of=""):
    """cells: layer -> (val_score, correct vector); scores: layer -> {metric: value}."""
    rows = []
    for layer, (val, correct) in cells.items():
        for seed in (0, 1):
            rows.append(
                {
                    "model": model,
                    "control_of": control_of,
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
                    **{f"score_{m}": v for m, v in (scores or {}).get(layer, {}).items()},
                }
            )
    return rows


DEPTH = {"early": 0.3, "mid": 0.6, "top": 1.0}


def test_the_model_is_chosen_by_validation_never_by_test():
    """Model A's top layer has the best validation score; model B's mid layer is best on test."""
    rows = _rows(
        "d",
        "A@imagenet",
        {"early": (0.6, _correct(120)), "mid": (0.7, _correct(150)), "top": (0.9, _correct(160))},
    ) + _rows(
        "d",
        "B@imagenet",
        {"early": (0.6, _correct(120)), "mid": (0.85, _correct(190)), "top": (0.8, _correct(170))},
    )
    srcs = [_Src("d", "A@imagenet", DEPTH), _Src("d", "B@imagenet", DEPTH)]
    analyses = analyze(rows, srcs)
    (c,) = model_choices(analyses)
    assert (c.chosen.model, c.chosen.best, c.runner_up.model, c.runner_up.best) == (
        "A@imagenet",
        "top",
        "B@imagenet",
        "mid",
    )
    md = markdown_report(analyses, title="t", command=None, plots=[], notes=[])
    assert "**Use A@imagenet, layer top (depth 1.00)" in md
    assert (
        "15.0 points below (validation and test disagree) the runner-up by validation, B@imagenet mid" in md
    )
    assert "beyond noise" in md
    assert "best on test (not used for the choice): B@imagenet mid" in md
    assert "Use B@imagenet" not in md
    assert "## d (A@imagenet, softmax)" in md and "## d (B@imagenet, softmax)" in md


def test_pretraining_gain_per_depth():
    rows = _rows(
        "d",
        "A@imagenet",
        {"early": (0.6, _correct(120)), "mid": (0.7, _correct(160)), "top": (0.9, _correct(180))},
    ) + _rows(
        "d",
        "A@none (random control)",
        {"early": (0.6, _correct(130)), "mid": (0.7, _correct(140)), "top": (0.6, _correct(110))},
        control_of="A@imagenet",
    )
    srcs = [_Src("d", "A@imagenet", DEPTH), _Src("d", "A@none (random control)", DEPTH, "A@imagenet")]
    analyses = analyze(rows, srcs)
    (g,) = pretraining_gains(analyses)
    assert [(n, round(gain * 100, 1)) for n, _, _, _, gain in g.by_layer] == [
        ("early", -5.0),
        ("mid", 10.0),
        ("top", 35.0),
    ]
    md = markdown_report(analyses, title="t", command=None, plots=[], notes=[])
    assert "## What pretraining adds" in md
    assert "adds -5.0 points over random init at depth 0.30 and +35.0 at depth 1.00; most at depth 1.00" in md


def test_kendall_tau_and_each_scores_pick():
    depth = {"a": 0.2, "b": 0.4, "c": 0.6, "d": 0.8, "e": 1.0}
    right = {"a": 120, "b": 140, "c": 150, "d": 170, "e": 160}
    cells = {n: (right[n] / N_TEST, _correct(right[n])) for n in depth}
    scores = {
        n: {"up": float(right[n]), "down": -float(right[n]), "flat": 1.0, "half": [3, 1, 2, 5, 4][i]}
        for i, n in enumerate(depth)
    }
    (a,) = analyze(_rows("d", "A@x", cells, scores), [_Src("d", "A@x", depth)])
    got = {s.metric: s for s in score_agreement(a)}
    assert got["up"].tau == pytest.approx(1.0) and got["down"].tau == pytest.approx(-1.0)
    assert got["flat"].tau is None  # a constant score ranks nothing
    from scipy.stats import kendalltau

    assert got["half"].tau == pytest.approx(kendalltau([3, 1, 2, 5, 4], [120, 140, 150, 170, 160]).statistic)
    assert (got["up"].pick, got["down"].pick, got["half"].pick, got["up"].measured) == ("d", "a", "d", "d")
    md = markdown_report([a], title="t", command=None, plots=[], notes=[])
    assert "| d | A@x | softmax | up | 5 | +1.00 (p = " in md and "| d (= measured) | d |" in md
    assert "they do not replace it" in md


def test_under_cross_validation_models_are_ranked_by_the_log_likelihood_their_layers_were_chosen_by():
    """Model A has the better CV accuracy, model B the better CV log-likelihood: B is chosen, and the
    answer names the score it was chosen by."""
    from featx.classifiers.selection import LOGLIK

    def rows(model, acc, ll):
        out = []
        for layer in DEPTH:
            for seed in (0, 1):
                folds = [ll - (0.1 if layer != "top" else 0.0) + 0.01 * i for i in range(5)]
                out.append(
                    {
                        "model": model,
                        "control_of": "",
                        "dataset": "d",
                        "layer": layer,
                        "classifier": "softmax",
                        "preset": "",
                        "baseline": "",
                        "train_size_spec": "10/class",
                        "train_size": 20,
                        "accuracy": 0.8,
                        "val_score": acc,
                        "val_tiebreak": float(np.mean(folds)),
                        "seed": seed,
                        "n_test": N_TEST,
                        "val_source": "5-fold cv",
                        "val_rule": LOGLIK,
                        "val_folds": folds,
                        "test_correct": pack_correct(_correct(160)),
                    }
                )
        return out

    analyses = analyze(
        rows("A@imagenet", 0.9, -0.6) + rows("B@imagenet", 0.8, -0.4),
        [_Src("d", "A@imagenet", DEPTH), _Src("d", "B@imagenet", DEPTH)],
    )
    (c,) = model_choices(analyses)
    assert (c.chosen.model, c.chosen.best) == ("B@imagenet", "top")
    assert "the best cross-validated log-likelihood (-0.380)" in c.answer


def _sized_rows(name, model, cells, sizes, control_of=""):
    rows = []
    for size in sizes:
        for r in _rows(name, model, cells, control_of=control_of):
            rows.append({**r, "train_size_spec": size, "seed": r["seed"]})
    return rows


@pytest.mark.parametrize("sizes", [("all",), ("2/class", "10/class", "all")])
def test_plots_keep_legend_and_title_inside_the_figure(tmp_path, sizes):
    """Four models (one a control) on two datasets, one or three train sizes: at the default size every
    legend and the title lie inside the figure, and the bars are the Wilson intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from featx.bench.report import plot_depth, plot_learning_curves

    models = [
        "efficientnet_lite0@imagenet",
        "efficientnet_lite2@imagenet",
        "timm:convnext_tiny@in1k",
        "efficientnet_lite0@none (random control)",
    ]
    rows, srcs = [], []
    for d in ("flowers5_128", "brain_tumor_mri"):
        for m in models:
            ctl = "efficientnet_lite0@imagenet" if "control" in m else ""
            cells = {"early": (0.6, _correct(120)), "mid": (0.7, _correct(150)), "top": (0.9, _correct(170))}
            rows += _sized_rows(d, m, cells, sizes, control_of=ctl)
            srcs.append(_Src(d, m, DEPTH, ctl))
    analyses = analyze(rows, srcs)
    seen = []
    real_close = plt.close

    def keep(fig=None):  # look at each figure before it is closed
        seen.append(fig)

    plt.close = keep
    try:
        plot_depth(analyses, str(tmp_path / "depth.png"), "featx bench: " + ", ".join(models) + ", softmax")
        plot_learning_curves(analyses[:3], str(tmp_path / "lc.png"), "featx bench: " + ", ".join(models))
    finally:
        plt.close = real_close
    for fig in seen:
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        box = fig.bbox
        texts = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend()), fig._suptitle]
        for t in texts:
            e = t.get_window_extent(r)
            assert e.x0 >= box.x0 - 1 and e.x1 <= box.x1 + 1 and e.y0 >= box.y0 - 1 and e.y1 <= box.y1 + 1, t
        real_close(fig)
    assert (tmp_path / "depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
