"""Fine-tune cells of a bench (featx.bench_finetune): grid, resume, rows with kind."""

from __future__ import annotations

import pytest

from conftest import make_images
from featx.bench import BenchConfig, BenchData
from featx.bench_finetune import finetune_rows, parse_points, run_finetune_cells
from featx.errors import UsageError
from featx.finetune import FinetuneSettings
from featx.settings import ModelSettings, RunSettings


def test_parse_points():
    assert parse_points("depth:0,0.5,1.0") == ["depth:0", "depth:0.5", "depth:1.0"]
    assert parse_points("layer3,depth:0.5,0.5") == ["layer3", "depth:0.5"]
    with pytest.raises(UsageError, match="--finetune"):
        parse_points(" , ")


def test_cells_resume_and_rows(tmp_path, monkeypatch):
    data = make_images(tmp_path / "d", per_class=6)
    config = BenchConfig(ModelSettings("timm:test_resnet", "none", image_size=32), [BenchData(str(data), "similar")],
                         "depth:1.0", RunSettings(device="cpu", workers=0, precision="fp32"),
                         train_sizes=["all", "1/class"], seeds=(0,), out=str(tmp_path / "bench"))  # fmt: skip
    base = FinetuneSettings(epochs=1, batch_size=4)
    first = run_finetune_cells(config, ["depth:0.5", "depth:1.0"], base)
    assert len(first) == 4
    bad = [(c, r) for c, r in first if "error" in r]  # one image per class leaves none to validate on
    assert len(bad) == 2 and all(str(c.train_size) == "1/class" and "too few images per class" in r["error"]
                                 for c, r in bad)  # fmt: skip
    rows = finetune_rows(config, first)
    assert [r["kind"] for r in rows] == ["finetune", "finetune"]
    assert {r["train_from"] for r in rows} == {"depth:0.5", "depth:1.0"}

    import featx.finetune

    def boom(*a, **k):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(featx.finetune, "finetune", boom)
    again = run_finetune_cells(config, ["depth:0.5", "depth:1.0"], base)
    assert [r for _, r in again] == [r for _, r in first]
    assert not (tmp_path / "bench" / "finetune-ckpt").exists() or not any((tmp_path / "bench" / "finetune-ckpt").iterdir())
