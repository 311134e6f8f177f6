"""Unlabelled data: a flat folder, an image list, a CSV without labels -> an entry without labels
(one class "", labels 0, `labelled` False) that extract, info, export and predict take and that
fit, score, bench and finetune refuse in one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, cli, make_images
from featx.errors import UsageError
from featx.sources.spec import open_source


def _flat(root, n=6):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / f"im{k:02d}.png")
    return root


def test_flat_folder_is_unlabelled(tmp_path):
    ds = open_source(str(_flat(tmp_path / "flat")))
    assert not ds.labelled and ds.classes == [""] and set(ds.labels.tolist()) == {0}
    assert ds.ids == [f"im{k:02d}.png" for k in range(6)] or sorted(ds.ids) == ds.ids
    assert set(ds.splits.tolist()) == {"train", "test"}
    assert any("unlabelled" in n for n in ds.notes)


def test_mixed_folder_keeps_the_class_folders_and_warns(tmp_path):
    data = make_images(tmp_path / "mix", classes=("a", "b"), per_class=2, size=(16, 16))
    Image.new("RGB", (8, 8)).save(data / "stray.jpg")
    ds = open_source(str(data))
    assert ds.labelled and ds.classes == ["a", "b"] and len(ds) == 4
    assert any("1 image(s) lie directly" in n for n in ds.notes)


def test_image_list_and_csv_without_labels(tmp_path):
    flat = _flat(tmp_path / "imgs")
    (tmp_path / "list.txt").write_text("# my images\nimgs/im03.png\n\nimgs/im01.png\nimgs/im03.png\n")
    ds = open_source(str(tmp_path / "list.txt"))
    assert not ds.labelled and sorted(ds.ids) == ["imgs/im01.png", "imgs/im03.png"]
    (tmp_path / "one.csv").write_text("".join(f"imgs/im{k:02d}.png\n" for k in range(4)))
    ds = open_source(str(tmp_path / "one.csv"))
    assert not ds.labelled and len(ds) == 4
    (tmp_path / "split.csv").write_text(
        "path,split\n"
        + "".join(f"imgs/im{k:02d}.png,{'test' if k % 3 == 0 else 'train'}\n" for k in range(6))
    )
    ds = open_source(str(tmp_path / "split.csv"))
    assert not ds.labelled and ds.split_source == "manifest" and (ds.splits == "test").sum() == 2
    (tmp_path / "lab.csv").write_text("filename,species\nimgs/im00.png,x\nimgs/im01.png,y\n")
    assert open_source(str(tmp_path / "lab.csv")).labelled  # an unknown second column is still the label
    (tmp_path / "bad.txt").write_text("imgs/im00.png\nreadme\n")
    with pytest.raises(UsageError, match="line 2 .readme. is not an image path"):
        open_source(str(tmp_path / "bad.txt"))
    (tmp_path / "ragged.csv").write_text("imgs/im00.png\nimgs/im01.png,x\n")
    with pytest.raises(UsageError, match="row 2 has 2 columns"):
        open_source(str(tmp_path / "ragged.csv"))
    del flat


def test_unlabelled_entry_end_to_end(tmp_path):
    flat = _flat(tmp_path / "flat")
    cache = tmp_path / "c"
    rc, out, err = cli("-q", "extract", "--model", "pixels", "--data", flat, "--cache-dir", cache)
    assert rc == 0, err
    entry = out.strip().splitlines()[-1]
    rc, out, err = cli("info", entry)
    assert rc == 0 and "unlabelled" in out, err
    for argv in (["fit", entry], ["score", entry]):
        rc, _, err = cli(*argv)
        assert_one_line_error(rc, err, 2, ["unlabelled", "needs labels"])
    rc, _, err = cli(
        "-q", "bench", "--model", "pixels", "--data", flat, "--cache-dir", cache, "--out", tmp_path / "b"
    )
    assert_one_line_error(rc, err, 2, ["unlabelled", "bench needs labels"], only_error_lines=True)
    rc, out, err = cli("export", entry, "--layer", "pixels", "--out", tmp_path / "x.npy")
    assert rc == 0, err
    assert np.array_equal(np.load(tmp_path / "x.labels.npy"), np.full(6, -1))
    assert (tmp_path / "x.classes.txt").read_text() == ""
    # predict: a classifier from labelled data classifies the flat folder and an image list
    data = make_images(tmp_path / "lab", per_class=4)
    rc, out, err = cli("-q", "extract", "--model", "pixels", "--data", data, "--cache-dir", cache)
    assert rc == 0, err
    rc, _, err = cli("-q", "fit", out.strip().splitlines()[-1], "--out", tmp_path / "clf")
    assert rc == 0, err
    (tmp_path / "list.txt").write_text("flat/im00.png\nflat/im05.png\n")
    for inputs in ([flat], [tmp_path / "list.txt"]):
        rc, out, err = cli("predict", tmp_path / "clf", *inputs, "--json")
        assert rc == 0, err
        assert '"path"' in out or "im0" in out


def test_finetune_refuses_unlabelled(tmp_path):
    flat = _flat(tmp_path / "flat")
    rc, _, err = cli(
        "finetune",
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--data",
        flat,
        "--image-size",
        "32",
        "--out",
        tmp_path / "ft",
    )
    assert_one_line_error(rc, err, 2, ["unlabelled", "finetune needs labels"], only_error_lines=True)
