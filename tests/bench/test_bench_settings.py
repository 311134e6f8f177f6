"""bench takes the same settings as extract: --data-root reaches torchvision:NAME datasets, a
repeated seed is fitted once, and an oversized --workers is capped at the usable cores."""

from __future__ import annotations

import csv
import gzip
import logging

from conftest import cli, make_images
from featx.bench.config import BenchConfig, BenchData
from featx.settings import ModelSettings, RunSettings
from tests.sources.test_data import _write_idx_dir


def test_bench_data_root_reaches_torchvision_datasets_and_seeds_are_deduplicated(tmp_path):
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    _write_idx_dir(raw, n_train=60, n_test=20)
    for f in raw.iterdir():
        (raw / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
    rc, out, err = cli(
        "bench",
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--data",
        "torchvision:FashionMNIST",
        "--data-root",
        tmp_path / "root",
        "--layers",
        "layer1",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--batch-size",
        "8",
        "--precision",
        "fp32",
        "--seeds",
        "0,0",
        "--C",
        "1",
        "--cache-dir",
        tmp_path / "cache",
        "--out",
        tmp_path / "out",
        "-q",
    )
    assert rc == 0, err
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["dataset"], r["seed"]) for r in rows] == [("fashionmnist", "0")]
    with open(tmp_path / "out" / "cells.jsonl") as f:
        assert len(f.readlines()) == 1  # seed 0 fitted once


def test_bench_config_holds_settings_objects():
    c = BenchConfig("resnet18", [BenchData("x")], weights="none", image_size=32, workers=0, seeds=(1, 0, 1))
    assert c.model == ModelSettings("resnet18", "none", 32) and c.run == RunSettings(workers=0)
    assert c.codes.layers.startswith("depth:") and c.seeds == (1, 0)


def test_oversized_workers_are_capped_with_one_warning(tmp_path, caplog):
    from featx.engine.compute import usable_cores
    from featx.engine.extract import extract
    from featx.store.codes import open_codes

    data = make_images(tmp_path / "d", per_class=2)
    kw = dict(weights="none", image_size=32, batch_size=4, precision="fp32", cache_dir=str(tmp_path / "c"))
    with caplog.at_level(logging.WARNING, logger="featx"):
        a = extract("resnet18", str(data), "layer1", workers=1000, **kw)
        extract("resnet18", str(data), "layer2", workers=1000, **kw)
    with open_codes(a.path) as f:
        assert int(f.attrs["workers"]) == usable_cores()
    assert sum("--workers 1000" in r.getMessage() for r in caplog.records) == 1


def test_the_demo_warns_about_no_option_the_user_did_not_give():
    """The demo's own per-class limit names only splits its data has (a limit that does nothing warns)."""
    from featx.bench.config import demo_config
    from featx.sources.spec import open_source

    config = demo_config(out="unused")
    for bd in config.datasets[:1]:  # scikit-learn's digits: always there
        ds = open_source(bd.spec, config.data_options)
        assert not [n for n in ds.notes if "--per-class-limit" in n], ds.notes
