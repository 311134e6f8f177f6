"""Fine-tune cells of a bench (featx.bench.finetune_cells): grid, resume, rows with kind."""

from __future__ import annotations

import pytest

from conftest import make_images
from featx.bench.config import BenchConfig, BenchData, parse_points
from featx.bench.finetune_cells import finetune_rows, run_finetune_cells
from featx.errors import UsageError
from featx.finetune.settings import FinetuneSettings
from featx.settings import ModelSettings, RunSettings


def test_parse_points():
    assert parse_points("depth:0,0.5,1.0") == ["depth:0", "depth:0.5", "depth:1.0"]
    assert parse_points("layer3,depth:0.5,0.5") == ["layer3", "depth:0.5"]
    with pytest.raises(UsageError, match="--finetune"):
        parse_points(" , ")


def test_cells_resume_and_rows(tmp_path, monkeypatch):
    data = make_images(tmp_path / "d", per_class=6)
    config = BenchConfig(
        ModelSettings("timm:test_resnet", "none", image_size=32),
        [BenchData(str(data), "similar")],
        "depth:1.0",
        RunSettings(device="cpu", workers=0, precision="fp32"),
        train_sizes=["all", "1/class"],
        seeds=(0,),
        out=str(tmp_path / "bench"),
    )
    base = FinetuneSettings(epochs=1, batch_size=4)
    first = run_finetune_cells(config, ["depth:0.5", "depth:1.0"], base)
    assert len(first) == 4
    bad = [(c, r) for c, r in first if "error" in r]  # one image per class leaves none to validate on
    assert len(bad) == 2 and all(
        str(c.train_size) == "1/class" and "too few images per class" in r["error"] for c, r in bad
    )
    rows = finetune_rows(config, first)
    assert [r["kind"] for r in rows] == ["finetune", "finetune"]
    # the size the cell's key names is the size it was trained and tested at
    assert {r["image_size"] for r in rows} == {config.model.image_size} == {32}
    assert {r["train_from"] for r in rows} == {"depth:0.5", "depth:1.0"}

    import featx.finetune.job

    def boom(*a, **k):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(featx.finetune.job, "finetune", boom)
    again = run_finetune_cells(config, ["depth:0.5", "depth:1.0"], base)
    assert [r for _, r in again] == [r for _, r in first]
    assert not (tmp_path / "bench" / "finetune-ckpt").exists() or not any(
        (tmp_path / "bench" / "finetune-ckpt").iterdir()
    )


def test_bench_finetune_from_the_cli_report_and_resume(tmp_path):
    """`featx bench --finetune`: fine-tune rows beside probe rows in results.csv, the report's
    fine-tune section with verdicts that follow its own intervals, and a rerun that runs nothing."""
    import csv

    from conftest import cli

    data = make_images(tmp_path / "d", per_class=12)
    argv = [
        "bench",
        "--model",
        "timm:test_resnet",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--data",
        f"{data}:different",
        "--layers",
        "depth:0.5,1.0",
        "--train-sizes",
        "all",
        "--seeds",
        "0",
        "--C",
        "0.1,1",
        "--precision",
        "fp32",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--finetune",
        "depth:0.5,1.0",
        "--finetune-epochs",
        "1",
        "--finetune-batch-size",
        "4",
        "--finetune-method",
        "full,bitfit",
        "--cache-dir",
        tmp_path / "cache",
        "--out",
        tmp_path / "b",
        "-q",
    ]
    rc, out, err = cli(*argv)
    assert rc == 0, err
    rows = list(csv.DictReader(open(tmp_path / "b" / "results.csv")))
    kinds = [r["kind"] for r in rows]
    assert kinds.count("probe") == 2 and kinds.count("finetune") == 4
    ft = [r for r in rows if r["kind"] == "finetune"]
    assert {(r["train_from"], r["method"]) for r in ft} == {
        (p, m) for p in ("depth:0.5", "depth:1.0") for m in ("full", "bitfit")
    }
    for r in ft:  # the cost of every fine-tune row
        assert int(r["trainable_params"]) > 0 and int(r["total_params"]) >= int(r["trainable_params"])
        assert float(r["train_seconds"]) > 0 and float(r["inference_ms_per_image"]) > 0
    bitfit = {r["train_from"]: int(r["trainable_params"]) for r in ft if r["method"] == "bitfit"}
    full = {r["train_from"]: int(r["trainable_params"]) for r in ft if r["method"] == "full"}
    assert bitfit["depth:0.5"] < full["depth:0.5"] and bitfit["depth:1.0"] == full["depth:1.0"]  # head only
    report = (tmp_path / "b" / "report.md").read_text()
    assert "## Fine-tuning beside probing" in report
    line = next(ln for ln in report.splitlines() if ln.startswith("| d | all |"))
    # the verdict is the exact McNemar test on the same test images (the rule layers and models use)
    p = float(line.split(" | ")[5])
    gain = float(line.split(" | ")[4])
    verdict = "within noise" if p >= 0.05 else "pays" if gain > 0 else "does not pay"
    assert f"| {verdict}" in line
    assert "rule of thumb for case" in report and (
        "confirms it" in report
        or "contradicts it" in report
        or "cannot tell them apart" in report
        or "not converged" in report
    )
    before = (tmp_path / "b" / "cells.jsonl").read_text()
    rc, out, err = cli(*argv)
    assert rc == 0, err
    assert (tmp_path / "b" / "cells.jsonl").read_text() == before  # nothing refitted or re-run


def test_a_torn_last_line_does_not_swallow_the_next_fine_tune_record(tmp_path):
    """A bench killed mid-append leaves a torn line; the next fine-tune record still lands whole."""
    from featx.files import load_done

    data = make_images(tmp_path / "d", per_class=6)
    config = BenchConfig(
        ModelSettings("timm:test_resnet", "none", image_size=32),
        [BenchData(str(data), "similar")],
        "depth:1.0",
        RunSettings(device="cpu", workers=0, precision="fp32"),
        train_sizes=["all"],
        seeds=(0,),
        out=str(tmp_path / "bench"),
    )
    base = FinetuneSettings(epochs=1, batch_size=4)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "cells.jsonl").write_text('{"key": "torn", "result": {"acc')
    ((cell, result),) = run_finetune_cells(config, ["depth:1.0"], base)
    assert "error" not in result
    assert load_done(str(tmp_path / "bench"))[cell.key(config, base)] == result


def test_an_unchanged_recipe_keeps_its_cell_key():
    """Keys pinned from the release before epochs=auto and augmentation names: a fixed number of
    epochs with one augmentation and learning rate is the same recipe, so the same cell."""
    from featx.bench.finetune_cells import finetune_cells

    config = BenchConfig(
        ModelSettings("timm:test_resnet", "none", image_size=32),
        [BenchData("sklearn:digits", "different")],
        "depth:1.0",
        RunSettings(device="cpu", workers=0, precision="fp32"),
        train_sizes=["all"],
        seeds=(0,),
        out="/tmp/x",
    )
    (cell,) = finetune_cells(config, ["depth:0.5"], ["all"], (0,))
    assert (
        cell.key(config, FinetuneSettings(epochs=5))
        == "e59b8ab77fb3e1d35aa48354f81848c690a90975e6d1d4e9f4f9acc2b11f12ee"
    )
    assert (
        cell.key(config, FinetuneSettings(epochs=5, augment="none", lr=0.03, threads=1))
        == "49ad1152eacfbc1768ca79c24327541a985a5ee7c7294e4dfa5cfb30285ad542"
    )
    assert cell.key(config, FinetuneSettings(epochs="auto")) != cell.key(config, FinetuneSettings(epochs=30))
    assert cell.key(config, FinetuneSettings(augment="light")) != cell.key(config, FinetuneSettings())
    from dataclasses import replace

    base = FinetuneSettings()
    assert replace(cell, method="bitfit").key(config, base) != cell.key(config, base)
