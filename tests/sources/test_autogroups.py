"""`--group-by auto[:T]` through the real CLI: near-duplicate groups found in the codes before the
entry is finalized, featx's split redone around them, the leakage check before fit and bench, and
the one-line refusals. Copies are pixel-identical files (similarity 1.0 under any network); with
random-init ResNet-18 at 32 px distinct images reach 0.998, so the tests use auto:0.9999."""

import json
import os
import shutil

import h5py
import numpy as np
import pytest

from conftest import FAST_ARGS, assert_one_line_error, cli, make_images
from featx.bench.config import BenchConfig, BenchData
from featx.bench.report import write_bench_report
from featx.bench.run import run as bench_run
from featx.classifiers.protocol import protocol_for
from featx.settings import DataOptions
from featx.sources.autogroups import DUP_SIMILARITY, deepest, describe, threshold_of
from featx.sources.cutting import regroup
from featx.store.cache import list_entries
from featx.store.codes import CodesFile

AUTO = "auto:0.9999"


def _patterns(root, per_class, splits=None, seed=0):
    """Like make_images, but every image is its own random pattern (a 4x4 colour grid, upsampled):
    distinct images of one class are as unlike as images of two classes, as independent photos are
    (make_images' class colour + noise makes a random network map a class to nearly one point)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for base in [root / s for s in splits] if splits else [root]:
        for c in ("cat", "dog", "owl"):
            (base / c).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                Image.fromarray(grid).resize((36, 36), Image.BILINEAR).save(
                    base / c / f"{c}_{k:03d}.jpg", quality=92
                )


def _with_copies(root, per_class=12, sources=4, copies=2, splits=None):
    """Random patterns plus `copies` byte-identical copies of the first `sources` images of each class."""
    _patterns(root, per_class, splits)
    for base in [root / s for s in splits] if splits else [root]:
        for c in ("cat", "dog", "owl"):
            for k in range(sources):
                for j in range(1, copies + 1):
                    shutil.copy(base / c / f"{c}_{k:03d}.jpg", base / c / f"{c}_{k:03d}_copy{j}.jpg")
    return root


def _source(path: str) -> str:
    return path.split("_copy")[0].removesuffix(".jpg")


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    return _with_copies(tmp_path_factory.mktemp("dups") / "data")


def _extract(data, cache, *extra):
    rc, out, err = cli(
        "extract", *FAST_ARGS, "--data", data, "--layers", "layer4,avgpool", "--cache-dir", cache, *extra
    )
    assert rc == 0, err
    return out.strip().splitlines()[-1], err


def test_auto_groups_keep_copies_on_one_side_and_are_stored(copies, tmp_path):
    path, err = _extract(copies, tmp_path / "c", "--group-by", AUTO)
    assert (
        "--group-by auto:0.9999 on avgpool: 60 images in 36 groups (12 of 2+ images, holding 36; largest 3)"
        in err
    )
    with CodesFile(path) as f:
        assert f.groups is not None and len(np.unique(f.groups)) == 36
        for g in np.unique(
            f.groups
        ):  # each group is one source image and its copies, on one side of the split
            members = np.flatnonzero(f.groups == g)
            assert len({_source(f.paths[i]) for i in members}) == 1
            assert len(set(f.split[members].tolist())) == 1
        by_source = {}
        for i, p in enumerate(f.paths):
            by_source.setdefault(_source(p), set()).add(f.groups[i])
        assert all(len(v) == 1 for v in by_source.values())
        assert 0 < int((f.split == "test").sum()) < len(f)
        split = f.split.copy()
    again, _ = _extract(
        copies, tmp_path / "c", "--group-by", "auto:0.99990"
    )  # same threshold: the same entry
    assert again == path
    plain, _ = _extract(copies, tmp_path / "c")
    assert plain != path
    with CodesFile(plain) as f:  # the plain split puts copies on both sides
        assert f.groups is None
        sides = {}
        for p, s in zip(f.paths, f.split):
            sides.setdefault(_source(p), set()).add(s)
        assert any(len(v) == 2 for v in sides.values())
    other, _ = _extract(copies, tmp_path / "c", "--group-by", "auto:0.99995")  # the threshold enters the key
    assert other not in (path, plain)
    with CodesFile(path) as f:  # deterministic: the stored split is what regroup gives for the stored codes
        s2, g2, _ = regroup(f.codes("avgpool"), f.labels, f.split, False, 0.9999, 0.2, 0)
        assert np.array_equal(s2, split) and np.array_equal(g2, f.groups)
    rc, out, err = cli("info", path)
    assert (
        rc == 0
        and "groups        60 images in 36 groups (12 of 2+ images, holding 36; largest 3) (--group-by auto:0.9999)"
        in out
    )
    rc, out, _ = cli("info", path, "--json")
    info = json.loads(out)["groups"]
    assert info["count"] == 36 and info["sizes"] == {"1": 24, "3": 12}


def test_fit_warns_on_copies_and_records_it(copies, tmp_path):
    plain, _ = _extract(copies, tmp_path / "c")
    grouped, _ = _extract(copies, tmp_path / "c", "--group-by", AUTO)
    rc, out, err = cli("fit", plain, "--layer", "avgpool", "--C", "1", "--results", tmp_path / "p.json")
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if "near-copies of training rows" in ln]
    assert len(lines) == 1 and "--group-by auto" in lines[0] and "_copy" in lines[0] and "(train)" in lines[0]
    leak = json.load(open(tmp_path / "p.json"))["leakage"]
    assert leak["leaky"] and leak["leakage_rows"] >= 5 and leak["leakage_layer"] == "avgpool"
    assert _source(leak["leakage_example"][0]) == _source(leak["leakage_example"][1])
    rc, out, err = cli("fit", grouped, "--layer", "avgpool", "--C", "1", "--results", tmp_path / "g.json")
    assert rc == 0, err
    assert "near-copies" not in err
    result = json.load(open(tmp_path / "g.json"))
    assert result["leakage"]["leaky"] is False and result["results"][0]["val_source"].startswith(
        ("grouped", "5-fold grouped", "3-fold grouped", "4-fold grouped", "2-fold grouped")
    )


def test_given_splits_stay_and_crossing_groups_are_noted(tmp_path):
    data = _with_copies(tmp_path / "d", per_class=6, sources=2, copies=1, splits=("train", "test"))
    shutil.copy(data / "train" / "cat" / "cat_005.jpg", data / "test" / "cat" / "cat_dup_of_train.jpg")
    path, err = _extract(data, tmp_path / "c", "--group-by", AUTO)
    assert "groups have images in more than one of the data's own splits" in err
    with CodesFile(path) as f:
        assert f.meta.split_source != "seeded"
        assert all(p.startswith("train/") == (s == "train") for p, s in zip(f.paths, f.split))


@pytest.mark.parametrize("bad", ["auto:0", "auto:1.5", "auto:-1", "auto:x", "auto:", "auto"])
def test_threshold_outside_0_1_is_one_line(copies, tmp_path, bad):
    rc, _, err = cli("extract", *FAST_ARGS, "--data", copies, "--cache-dir", tmp_path, "--group-by", bad)
    if bad == "auto":  # 0.9 on a random network's codes: every image chains into one group
        assert_one_line_error(
            rc,
            err,
            code=2,
            needles=("--group-by auto", "one group", "raise the threshold"),
            only_error_lines=True,
        )
        return
    assert_one_line_error(rc, err, code=2, needles=("--group-by", "(0, 1]"))


def test_bad_inputs_are_one_line(tmp_path):
    one = make_images(tmp_path / "one", per_class=1)
    rc, _, err = cli(
        "extract", *FAST_ARGS, "--data", one, "--cache-dir", tmp_path / "c", "--group-by", "auto"
    )
    assert_one_line_error(rc, err, code=2, needles=("--group-by auto", "single image"))
    same = make_images(tmp_path / "same", per_class=1)
    for c in ("cat", "dog", "owl"):
        for k in range(1, 4):
            shutil.copy(same / "cat" / "cat_000.jpg", same / c / f"x{k}.jpg")
        if c != "cat":
            shutil.copy(same / "cat" / "cat_000.jpg", same / c / f"{c}_000.jpg")
    rc, _, err = cli(
        "extract", *FAST_ARGS, "--data", same, "--cache-dir", tmp_path / "c", "--group-by", "auto"
    )
    assert_one_line_error(rc, err, code=2, needles=("identical codes",), only_error_lines=True)
    data = make_images(tmp_path / "lim", per_class=6)
    rc, _, err = cli(
        "extract",
        *FAST_ARGS,
        "--data",
        data,
        "--cache-dir",
        tmp_path / "c",
        "--group-by",
        "auto",
        "--per-class-limit",
        "train=3,test=2",
    )
    assert_one_line_error(rc, err, code=2, needles=("--group-by auto", "per split"))
    rc, _, err = cli(
        "finetune",
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--data",
        data,
        "--group-by",
        "auto",
        "--out",
        tmp_path / "ft",
    )
    assert_one_line_error(rc, err, code=2, needles=("--group-by auto", "fine-tuning"))


def test_options_and_helpers():
    assert (
        threshold_of(None) is None
        and threshold_of("person\\d+") is None
        and threshold_of("automobile") is None
    )
    assert threshold_of("auto") == DUP_SIMILARITY and threshold_of("auto:0.5") == 0.5
    assert DataOptions().to_dict() == {
        "test_fraction": 0.2,
        "per_class_limit": None,
        "seed": 0,
        "data_root": None,
    }
    assert DataOptions(group_by="auto:0.8").to_dict()["group_by"] == "auto:0.8"
    assert deepest({"layer4": 0.9, "avgpool": 1.0, "fc": 1.1}) == "avgpool"
    assert deepest({"fc": 1.1}) == "fc"
    assert (
        describe(np.array(["0", "0", "1"])) == "3 images in 2 groups (1 of 2+ images, holding 2; largest 2)"
    )


def test_bench_records_leakage_and_reports_it(copies, tmp_path):
    cfg = BenchConfig(
        model="resnet18",
        weights="none",
        datasets=[BenchData(str(copies), "similar")],
        layers="layer4,avgpool",
        train_sizes=["all"],
        protocols=[protocol_for("softmax", Cs=(1.0,))],
        seeds=(0,),
        image_size=32,
        out=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        workers=0,
        batch_size=8,
    )
    result = bench_run(cfg)
    rows = result.rows()
    assert rows and all(r["leaky"] is True and r["leakage_fraction"] > 0.05 for r in rows)
    md = open(write_bench_report(result, "featx bench ...")["report.md"]).read()
    assert md.count("**Near-duplicates**") == 1 and "--group-by auto" in md
    cfg2 = BenchConfig(
        model="resnet18",
        weights="none",
        datasets=[BenchData(str(copies), "similar")],
        layers="layer4,avgpool",
        train_sizes=["all"],
        protocols=[protocol_for("softmax", Cs=(1.0,))],
        seeds=(0,),
        image_size=32,
        out=str(tmp_path / "out2"),
        cache_dir=str(tmp_path / "cache"),
        workers=0,
        batch_size=8,
        data_options=DataOptions(group_by=AUTO),
    )
    rows2 = bench_run(cfg2).rows()
    assert rows2 and all(r["leaky"] is False for r in rows2)
    with h5py.File(bench_run(cfg2).sources[0].codes) as f:
        assert "groups" in f


def test_a_refused_grouping_keeps_the_codes_for_a_rerun(tmp_path):
    """Identical codes are only known after extraction: the refusal keeps the entry's journal complete
    (a rerun of the command recomputes nothing and refuses again), `cache ls` shows it as partial at
    100%, `info` reads it, a plain extraction is unaffected and `cache rm` removes the journal."""
    same = make_images(tmp_path / "same", per_class=1)
    for c in ("cat", "dog", "owl"):
        for k in range(1, 4):
            shutil.copy(same / "cat" / "cat_000.jpg", same / c / f"x{k}.jpg")
        if c != "cat":
            shutil.copy(same / "cat" / "cat_000.jpg", same / c / f"{c}_000.jpg")
    cache = tmp_path / "c"
    args = ("extract", *FAST_ARGS, "--data", same, "--cache-dir", cache, "--layers", "layer4,avgpool")
    rc, _, err = cli(*args, "--group-by", "auto")
    assert_one_line_error(
        rc, err, code=2, needles=("identical codes", "12 images are kept", "rerunning"), only_error_lines=True
    )
    entries = list_entries(str(cache))
    assert len(entries) == 1 and entries[0].state == "partial"
    assert entries[0].detail["samples_done"] == entries[0].detail["samples"] == 12
    partial = entries[0].path
    rc, out, _ = cli("cache", "ls", "--cache-dir", cache)
    assert rc == 0 and "partial 12/12" in out
    rc, out, err = cli("info", partial)
    assert rc == 0, err
    rc, _, err = cli(*args, "--group-by", "auto")  # the rerun resumes at the end: no image is computed
    assert_one_line_error(rc, err, code=2, needles=("identical codes",), only_error_lines=True)
    assert "resuming" in err and "at image 12 of 12" in err
    rc, out, err = cli(*args)  # without grouping: its own complete entry
    assert rc == 0, err
    plain = out.strip().splitlines()[-1]
    with CodesFile(plain) as f:
        assert len(f) == 12 and f.groups is None
    rc, _, err = cli("cache", "rm", "--cache-dir", cache, os.path.basename(partial))
    assert rc == 0, err
    assert [e.state for e in list_entries(str(cache))] == ["complete"]


def test_unlabelled_images_still_get_their_duplicate_groups(tmp_path):
    """A flat folder (no classes): --group-by auto still finds the copies, and info reports them."""
    labelled = _with_copies(tmp_path / "labelled", per_class=4, sources=2, copies=1)
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in labelled.rglob("*.jpg"):
        shutil.copy(p, flat / p.name)
    path, err = _extract(str(flat), str(tmp_path / "cache"), "--group-by", AUTO)
    assert "unlabelled" in err and "18 images in 12 groups (6 of 2+ images, holding 12; largest 2)" in err
    with CodesFile(path) as f:
        names = [os.path.basename(p) for p in f.paths]
        groups = f.groups
    for name, g in zip(names, groups):
        if "_copy" in name:
            assert g == groups[names.index(_source(name) + ".jpg")]
    rc, out, err = cli("info", path)
    assert rc == 0 and "unlabelled" in out and "18 images in 12 groups" in out, err
