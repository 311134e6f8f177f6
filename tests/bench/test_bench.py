"""featx bench: the grid, resume without refitting, the analysis of the four cases, outputs."""

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import cells_written, cli, csv_without_timing, make_images, run_cli, sigkill_when
from featx.bench.analysis import analyze
from featx.bench.config import BenchConfig, BenchData, parse_bench_data
from featx.bench.report import write_bench_report
from featx.bench.run import run
from featx.classifiers.protocol import protocol_for
from featx.errors import UsageError
from featx.files import load_done


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    a = make_images(root / "alpha", per_class=8, splits=("train", "test"), size=(36, 36), seed=1)
    b = make_images(root / "beta", classes=("x", "y"), per_class=10, size=(36, 36), seed=2)
    return root, a, b


def _config(root, a, b, out, **kw):
    base = dict(
        model="resnet18",
        weights="none",
        datasets=[BenchData(str(a), "similar"), BenchData(str(b), "different")],
        layers="layer1,layer3,avgpool",
        train_sizes=["2/class", "all"],
        protocols=[protocol_for("softmax", Cs=(0.1, 1.0))],
        seeds=(0, 1),
        image_size=32,
        out=str(out),
        cache_dir=str(root / "cache"),
        workers=0,
        batch_size=8,
    )
    return BenchConfig(**{**base, **kw})


def test_bench_outputs(two_datasets, tmp_path):
    root, a, b = two_datasets
    cfg = _config(root, a, b, tmp_path / "out", baseline_pixels=True, pixel_size=8)
    result = run(cfg)
    rows = result.rows()
    # 2 datasets x (3 layers + pixels) x 2 sizes x 2 seeds
    assert len(rows) == 2 * 4 * 2 * 2
    paths = write_bench_report(result, "featx bench ...")
    for name in ("results.csv", "results.json", "report.md", "depth.png", "learning_curves.png"):
        assert os.path.getsize(paths[name]) > 0
    with open(paths["depth.png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(paths["results.csv"]) as f:
        table = list(csv.DictReader(f))
    for col in (
        "dataset",
        "layer",
        "relative_depth",
        "code_dim",
        "train_size",
        "classifier",
        "preset",
        "C",
        "seed",
        "accuracy",
        "balanced_accuracy",
        "fit_seconds",
    ):
        assert col in table[0]
    assert {r["dataset"] for r in table} == {"alpha", "beta"}
    # every probe row carries the cost fields (the pixel baseline's too: no backbone, its own classifier)
    for r in table:
        assert r["kind"] == "probe" and r["method"] == "probe", r
        trained, total = int(r["trainable_params"]), int(r["total_params"])
        dims = 8 * 8 * 3 if r["baseline"] else int(r["code_dim"])
        classes = 3 if r["dataset"] == "alpha" else 1  # a two-class linear model has one row
        assert trained == (dims + 1) * classes, r
        assert (total == trained) if r["baseline"] else (total > trained), r
        assert float(r["train_seconds"]) == float(r["fit_seconds"])
        assert float(r["inference_ms_per_image"]) > 0 and r["inference_batch_size"] == "8"
    depth_order = sorted(
        {
            (float(r["relative_depth"]), int(r["total_params"]) - int(r["trainable_params"]))
            for r in table
            if not r["baseline"]
        }
    )
    assert [b for _, b in depth_order] == sorted(b for _, b in depth_order)  # deeper: more backbone
    assert os.path.exists(tmp_path / "out" / "costs.jsonl")
    md = open(paths["report.md"]).read()
    assert "## Decision: what to use, with its cost" in md
    assert "## alpha (softmax): case" in md and "## beta (softmax): case" in md and "featx bench ..." in md
    assert "raw pixels" in md and "late-layer gain" in md


def test_rerun_fits_nothing_and_reuses_cells(two_datasets, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="featx")
    root, a, b = two_datasets
    out = tmp_path / "out"
    first = run(_config(root, a, b, out))
    n_lines = sum(1 for _ in open(out / "cells.jsonl"))
    assert n_lines == len(first.cells) == 24
    caplog.clear()
    again = run(_config(root, a, b, out))
    assert "24 cells: 24 done before, 0 to fit" in caplog.text
    assert sum(1 for _ in open(out / "cells.jsonl")) == n_lines
    assert again.rows() == first.rows()
    # a bigger grid reuses the cells it shares with the smaller one
    caplog.clear()
    run(_config(root, a, b, out, seeds=(0, 1, 2)))
    assert "36 cells: 24 done before, 12 to fit" in caplog.text


def test_torn_cells_file_is_tolerated(two_datasets, tmp_path):
    root, a, b = two_datasets
    out = tmp_path / "out"
    run(_config(root, a, b, out, seeds=(0,)))
    lines = open(out / "cells.jsonl").read().splitlines()
    (out / "cells.jsonl").write_text(
        "\n".join(lines[:5]) + "\n" + lines[5][: len(lines[5]) // 2]
    )  # killed mid-line
    assert len(load_done(str(out))) == 5
    result = run(_config(root, a, b, out, seeds=(0,)))
    assert len(load_done(str(out))) == len(result.cells) == 12


def test_killed_bench_resumes_to_the_same_results(two_datasets, tmp_path):
    root, a, b = two_datasets
    args = [
        "bench",
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--data",
        f"{a}:similar",
        "--data",
        f"{b}:different",
        "--layers",
        "layer1,layer2,layer3,layer4,avgpool",
        "--train-sizes",
        "2/class,4/class,all",
        "--seeds",
        "0,1,2",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--cache-dir",
        str(root / "cache"),
        "--C",
        "0.01,0.1,1,10",
    ]
    ref = run_cli(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    sigkill_when([*args, "--out", out], lambda: cells_written(out) >= 20)
    done = len(load_done(str(out)))
    assert 20 <= done < 90, done
    r = run_cli(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"90 cells: {done} done before, {90 - done} to fit" in r.stderr
    assert len(load_done(str(out))) == 90
    assert csv_without_timing(out / "results.csv") == csv_without_timing(tmp_path / "ref" / "results.csv")


def test_parse_bench_data():
    assert parse_bench_data("data/x:similar") == BenchData("data/x", "similar")
    assert parse_bench_data("sklearn:digits:different") == BenchData("sklearn:digits", "different")
    assert parse_bench_data("sklearn:digits") == BenchData("sklearn:digits", None)
    with pytest.raises(UsageError, match=":similar or :different"):
        parse_bench_data("x:dissimilar")


class _Src:
    def __init__(self, name, depth, label=None, n_train=100, n_classes=2):
        self.name, self.depth, self.n_train, self.n_classes = name, depth, n_train, n_classes
        self.data = BenchData(name, label)


def _rows(name, accs, n_train=100):
    rows = []
    for layer, acc in accs.items():
        for seed in (0, 1):
            rows.append(
                {
                    "dataset": name,
                    "layer": layer,
                    "classifier": "softmax",
                    "preset": "",
                    "baseline": "",
                    "train_size_spec": "all",
                    "train_size": n_train,
                    "accuracy": acc,
                    "val_score": acc,
                    "seed": seed,
                }
            )
    return rows


def test_the_four_cases():
    depth = {"early": 0.3, "mid": 0.6, "top": 1.0}
    similar = _rows("s", {"early": 0.7, "mid": 0.8, "top": 0.9})
    different = _rows("d", {"early": 0.7, "mid": 0.9, "top": 0.8})
    srcs = [
        _Src("s", depth),
        _Src("d", depth),
        _Src("S", depth, n_train=30000, n_classes=10),
        _Src("D", depth, "similar", 30000, 10),
    ]
    rows = (
        similar
        + different
        + _rows("S", {"early": 0.7, "mid": 0.8, "top": 0.9})
        + _rows("D", {"early": 0.7, "mid": 0.9, "top": 0.8})
    )
    got = {a.name: a for a in analyze(rows, srcs)}
    assert (got["s"].measured, got["s"].size, got["s"].case, got["s"].best) == ("similar", "small", 1, "top")
    assert (got["d"].measured, got["d"].size, got["d"].case, got["d"].best) == (
        "different",
        "small",
        3,
        "mid",
    )
    assert (got["S"].size, got["S"].case) == ("large", 2)
    assert got["s"].late_gain == pytest.approx(0.25) and got["d"].late_gain == pytest.approx(-0.1 / 0.3)
    # a user label decides the case, and the disagreement is reported
    assert (
        got["D"].case == 2
        and got["D"].disagrees
        and any("measurement says different" in e for e in got["D"].evidence)
    )


def test_a_top_layer_that_wins_by_little_over_the_middle_is_different():
    """The brain-MRI shape: the top layer is best, but the second half of the network adds
    little over chance-corrected accuracy, so the data behaves as different from ImageNet."""
    depth = {"early": 0.3, "mid": 0.5, "top": 1.0}
    rows = _rows("x", {"early": 0.7, "mid": 0.88, "top": 0.9})
    (a,) = analyze(rows, [_Src("x", depth)])
    assert a.best == "top" and a.late_gain == pytest.approx(0.05) and (a.measured, a.case) == ("different", 3)
    assert any("late-layer gain 0.05" in e for e in a.evidence)


def test_without_a_middle_layer_the_top_layers_lead_decides():
    """A grid of late layers only cannot measure the late-layer gain; it falls back on the gap."""
    depth = {"late": 0.9, "top": 1.0}
    (a,) = analyze(_rows("x", {"late": 0.85, "top": 0.9}), [_Src("x", depth)])
    assert a.late_gain is None and a.measured == "similar"
    assert any("no layer at depth <= 0.75" in e for e in a.evidence)
    (b,) = analyze(_rows("y", {"late": 0.9, "top": 0.85}), [_Src("y", depth)])
    assert b.late_gain is None and (b.measured, b.best) == ("different", "late")


def test_bench_cli_errors(tmp_path):
    r = run_cli(
        "bench",
        "--model",
        "resnet18",
        "--data",
        "sklearn:digits",
        "--train-sizes",
        "ten",
        "--out",
        str(tmp_path),
    )
    assert r.returncode == 2 and "--train-size" in r.stderr
    r = run_cli("bench", "--model", "resnet18")
    assert r.returncode == 2 and "--data" in r.stderr
    r = run_cli(
        "bench",
        "--model",
        "resnet18",
        "--data",
        "sklearn:digits",
        "--classifier",
        "ridge",  # not a classifier (knn is one now)
        "--out",
        str(tmp_path),
    )
    assert r.returncode == 2 and "--classifier" in r.stderr


def test_bench_out_that_is_a_file_is_one_line(tmp_path, image_folder):
    """It was a FileExistsError traceback."""
    (tmp_path / "results").write_text("not a folder")
    rc, out, err = cli(
        "bench",
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--data",
        image_folder,
        "--layers",
        "layer1",
        "--train-sizes",
        "all",
        "--out",
        tmp_path / "results",
        "--cache-dir",
        tmp_path / "c",
    )
    assert (
        rc == 2 and err.count("\n") == 1 and "--out" in err and "is a file" in err and "Traceback" not in err
    ), err
    assert (tmp_path / "results").read_text() == "not a folder"


def test_results_json_matches_csv(two_datasets, tmp_path):
    root, a, b = two_datasets
    result = run(_config(root, a, b, tmp_path / "o", seeds=(0,)))
    paths = write_bench_report(result)
    data = json.load(open(paths["results.json"]))
    assert len(data) == len(list(csv.DictReader(open(paths["results.csv"])))) == 12


def test_cells_the_data_cannot_support_are_noted_not_fatal(two_datasets, tmp_path):
    root, a, b = two_datasets
    # one image per class leaves nothing to hold out for validation: those cells are noted and skipped
    result = run(_config(root, a, b, tmp_path / "o", train_sizes=["1/class", "all"], seeds=(0,)))
    assert any("not fitted" in n and "no images to validate on" in n for n in result.notes)
    assert {r["train_size_spec"] for r in result.rows()} == {"all"}
    write_bench_report(result)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_bench_killed_at_many_moments_finishes_with_the_same_results(two_datasets, tmp_path):
    """>= 20 SIGKILLs at random moments of a bench (extraction, fitting, report writing); after
    each, every file present is whole; the last run's results equal an uninterrupted run's."""
    import random

    root, a, b = two_datasets
    args = [
        "bench",
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--data",
        f"{a}:similar",
        "--data",
        f"{b}:different",
        "--layers",
        "layer1,layer2,layer3,layer4,avgpool",
        "--train-sizes",
        "2/class,4/class,all",
        "--seeds",
        "0,1,2",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--precision",
        "fp32",
        "--C",
        "0.01,0.1,1,10",
    ]
    t0 = time.monotonic()
    ref = run_cli(*args, "--cache-dir", str(tmp_path / "ref-cache"), "--out", str(tmp_path / "ref"))
    duration = time.monotonic() - t0
    assert ref.returncode == 0, ref.stderr
    out, cache = tmp_path / "killed", tmp_path / "cache"
    rng = random.Random(7)
    kills = attempts = 0
    # a resumed bench can finish before its kill: those tries do not count
    while kills < 20 and attempts < 120:
        attempts += 1
        proc = subprocess.Popen(
            [sys.executable, "-m", "featx.cli", "-q", *args, "--cache-dir", str(cache), "--out", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            proc.wait(timeout=rng.uniform(0.5, duration))
            continue  # finished before its kill: does not count
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        for png in out.glob("*.png"):
            assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        if (out / "results.csv").exists():
            assert len(csv_without_timing(out / "results.csv")) == 90
    assert kills >= 20, (kills, attempts)
    r = run_cli(*args, "--cache-dir", str(cache), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert csv_without_timing(out / "results.csv") == csv_without_timing(tmp_path / "ref" / "results.csv")
    assert len(load_done(str(out))) == 90


def test_bench_reuses_the_users_own_extract(tmp_path):
    """`featx extract` then `featx bench` with the same model, data and layers: one entry, a cache
    hit; the ImageNet head's confidence only when asked, from an entry of its own."""
    from featx.engine.extract import extract
    from featx.settings import ModelSettings, RunSettings

    data = make_images(tmp_path / "d", per_class=6, splits=("train", "test"))
    model = ModelSettings("efficientnet_lite0", "imagenet", image_size=32)
    runs = RunSettings(device="cpu", workers=0, precision="fp32")
    mine = extract(model, str(data), "depth:0.5,1.0", run=runs, cache_dir=str(tmp_path / "c"), progress=False)
    config = BenchConfig(
        model,
        [BenchData(str(data), "similar")],
        "depth:0.5,1.0",
        runs,
        out=str(tmp_path / "b"),
        cache_dir=str(tmp_path / "c"),
        protocols=[protocol_for("softmax", Cs=(0.1, 1.0))],
    )
    (src,) = run(config).sources
    assert src.codes == mine.path and src.head is None and src.head_codes is None
    config.head_confidence, config.out = True, str(tmp_path / "b2")
    result = run(config)
    (src,) = result.sources
    assert src.codes == mine.path and src.head == "classifier" and src.head_codes != mine.path
    md = open(write_bench_report(result, "featx bench ...")["report.md"]).read()
    assert "ImageNet head mean top-1 probability on these images" in md
