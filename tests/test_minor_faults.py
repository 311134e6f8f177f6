"""Small faults from a black-box campaign, one line or a warning each (the larger rows have files of
their own: test_finetune_files.py, test_dask.py, test_fit_memory.py)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from conftest import FAST_ARGS, assert_one_line_error, blobs, cli, write_codes
from featx.classifiers.description import describe
from featx.classifiers.fit import fit_cell
from featx.classifiers.io import load_classifier, save_classifier
from featx.classifiers.protocol import protocol_for
from featx.errors import FeatxError


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("clf")
    X, y = blobs(n_per_class=30, n_classes=3, dim=8)
    split = np.where(np.arange(len(y)) % 4 == 0, "test", "train")
    codes = write_codes(root / "c.h5", {"a": X}, y, split, ["x", "y", "z"])
    _, pipe = fit_cell(codes, ["a"], protocol_for("softmax", Cs=(1.0,)), return_model=True)
    return save_classifier(str(root / "m"), pipe, describe(codes, ["a"]))


def test_four_class_names_for_three_class_ids_is_a_warning_and_fewer_names_are_refused(
    classifier, tmp_path, caplog
):
    """More names than ids is what a class with test images only gives (it can never be predicted): a
    warning; fewer names than ids would give an id no name: refused."""
    from tests.classifiers.test_classifier_io import rewrite_description

    path = tmp_path / "m.safetensors"
    shutil.copy(classifier, path)
    load_classifier(str(path))  # as saved: fine
    assert "can never be predicted" not in caplog.text
    rewrite_description(path, classes=["x", "y", "z", "w"])
    load_classifier(str(path))
    assert "names 4 classes but array 1.classes_ holds 3 class ids: 1 can never be predicted" in caplog.text
    rewrite_description(path, classes=["x", "y"])
    with pytest.raises(FeatxError, match="class ids below 2"):
        load_classifier(str(path))


def test_a_safetensors_file_renamed_joblib_is_not_called_a_pickle(classifier, tmp_path, image_folder):
    path = tmp_path / "m.joblib"
    shutil.copy(classifier, path)
    rc, _out, err = cli("predict", path, image_folder)
    line = assert_one_line_error(rc, err, code=1, needles=("safetensors file named .joblib", "m.safetensors"))
    assert "is a joblib pickle" not in line


@pytest.mark.parametrize("suffix", [".txt", ".pth"])
def test_weights_naming_a_text_file_is_one_line(suffix, tmp_path, image_folder):
    weights = tmp_path / f"w{suffix}"
    weights.write_text("these are not weights\n")
    args = [a if a != "none" else str(weights) for a in FAST_ARGS]
    rc, _out, err = cli(
        "extract", *args, "--data", image_folder, "--layers", "layer1", "--cache-dir", tmp_path / "c"
    )
    assert_one_line_error(
        rc, err, code=2, needles=(str(weights), "not a readable PyTorch checkpoint", "a text file")
    )
    assert "KeyError" not in err and "IndexError" not in err


# -- bench: cells.jsonl checksums, the --out lock, a bench with nothing fitted -------------------


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    from conftest import make_images

    root = tmp_path_factory.mktemp("bench")
    return root, make_images(root / "alpha", per_class=8, splits=("train", "test"), size=(36, 36), seed=1)


def _bench(root, data, out, *extra):
    return cli(
        "bench",
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--data",
        f"{data}:similar",
        "--layers",
        "layer1,avgpool",
        "--train-sizes",
        "all",
        "--seeds",
        "0",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--batch-size",
        "8",
        "--precision",
        "fp32",
        "--C",
        "1",
        "--cache-dir",
        root / "cache",
        "--out",
        out,
        *extra,
    )


def test_a_forged_line_in_cells_jsonl_does_not_win(bench_data, tmp_path):
    import json

    from featx.files import load_done

    root, data = bench_data
    out = tmp_path / "out"
    assert _bench(root, data, out, "-q")[0] == 0
    before = (out / "results.csv").read_text()
    lines = (out / "cells.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert all(len(r["sum"]) == 32 for r in recs)
    forged = [{**r, "result": {**r["result"], "accuracy": 1.0}} for r in recs]
    # edited in place (old checksum), and appended again with no checksum: neither is believed
    (out / "cells.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in forged)
        + "".join(json.dumps({k: v for k, v in r.items() if k != "sum"}) + "\n" for r in forged)
    )
    rc, _o, err = _bench(root, data, out)
    assert rc == 0 and "fail their checksum" in err, err
    import csv

    from conftest import TIMINGS

    def rows(text):
        return [{k: v for k, v in r.items() if k not in TIMINGS} for r in csv.DictReader(text.splitlines())]

    assert rows((out / "results.csv").read_text()) == rows(before)
    # a file from a featx release without checksums loads whole
    (out / "cells.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "sum"}) + "\n" for r in recs)
    )
    assert load_done(str(out)) == {r["key"]: r["result"] for r in recs}


def test_a_key_recorded_twice_keeps_its_first_record_with_a_warning(tmp_path, caplog):
    from featx.files import append_record, load_done, open_log

    with open_log(str(tmp_path)) as fh:
        append_record(fh, {"key": "k", "result": {"accuracy": 0.5}})
        append_record(fh, {"key": "k", "result": {"accuracy": 1.0}})
    assert load_done(str(tmp_path)) == {"k": {"accuracy": 0.5}}
    assert "recorded twice with different results" in caplog.text


def test_two_benches_on_one_out_the_second_is_refused(bench_data, tmp_path):
    from featx.files import FolderLock

    root, data = bench_data
    out = tmp_path / "out"
    out.mkdir()
    with FolderLock(str(out), "held"):
        rc, _o, err = _bench(root, data, out, "-q")
    assert_one_line_error(
        rc, err, code=1, needles=(f"--out {out}", "another featx bench", f"pid {os.getpid()}")
    )
    assert not (out / "cells.jsonl").exists()


def test_a_bench_whose_every_cell_is_refused_exits_2_with_the_reason(bench_data, tmp_path):
    root, data = bench_data
    rc, out, err = _bench(root, data, tmp_path / "out", "--train-sizes", "1/class", "-q")
    assert_one_line_error(
        rc,
        err,
        code=2,
        needles=("no cell could be fitted", "not fitted", "no images to validate on"),
        only_error_lines=True,  # tiny generated images are near-copies to a random network: a leakage warning too
    )
    assert "0 cells" not in out + err


def test_a_class_with_one_training_image_is_named(tmp_path):
    X, y = blobs(n_per_class=6, n_classes=3, dim=4)
    split = np.full(len(y), "test", dtype=object)
    split[y != 2] = "train"
    split[np.flatnonzero(y == 2)[0]] = "train"  # class 2, "zebra", has one training image
    codes = write_codes(tmp_path / "c.h5", {"a": X}, y, split.astype(str), ["ant", "bee", "zebra"])
    with pytest.raises(FeatxError, match="class 'zebra' has fewer than 2 training images"):
        fit_cell(codes, ["a"], protocol_for(preset="vissl-svm"))


@pytest.mark.parametrize(
    "pattern,needle",
    [("^", "all 24 images in one group"), ("^.", "3 class(es) have no test images (cat, dog, owl)")],
)
def test_groups_that_leave_no_test_images_are_a_warning(pattern, needle, tmp_path):
    from conftest import make_images
    from featx.settings import DataOptions
    from featx.sources.spec import open_source

    data = make_images(tmp_path / "d", per_class=8)
    ds = open_source(str(data), DataOptions(group_by=pattern))
    assert any(needle in n for n in ds.notes), ds.notes
    assert not any(
        "no test images" in n or "one group" in n for n in open_source(str(data), DataOptions()).notes
    )


def test_image_size_limits_enter_the_cache_key_only_when_not_the_defaults(
    image_folder, tmp_path, monkeypatch
):
    import featx.sources.decode as decode

    argv = [
        "extract",
        *FAST_ARGS,
        "--data",
        image_folder,
        "--layers",
        "layer1",
        "--cache-dir",
        tmp_path,
        "-q",
    ]
    rc, out, err = cli(*argv)
    assert rc == 0, err
    default = out.strip().splitlines()[-1]
    assert decode.limits_key() == ""
    for name, value in (("MAX_IMAGE_PIXELS", 1_000_000), ("MAX_ASPECT_RATIO", 50)):
        with monkeypatch.context() as m:
            m.setattr(decode, name, value)
            assert str(value) in decode.limits_key()
            rc, out, err = cli(*argv)
            assert rc == 0, err
            assert out.strip().splitlines()[-1] != default
    rc, out, err = cli(*argv)
    assert out.strip().splitlines()[-1] == default  # back at the defaults: the first entry, a hit
