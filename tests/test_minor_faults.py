"""Small faults from a black-box campaign, one line or a warning each (the larger rows have files of
their own: test_finetune_files.py, test_dask.py, test_fit_memory.py)."""

from __future__ import annotations

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


def test_four_class_names_for_three_class_ids_is_refused(classifier, tmp_path):
    from test_classifier_io import rewrite_description

    path = tmp_path / "m.safetensors"
    shutil.copy(classifier, path)
    load_classifier(str(path))  # as saved: fine
    rewrite_description(path, classes=["x", "y", "z", "w"])
    with pytest.raises(FeatxError, match="names 4 classes but array .*classes_ holds 3 class ids"):
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
    rc, _out, err = cli("extract", *args, "--data", image_folder, "--layers", "layer1", "--cache-dir", tmp_path / "c")
    assert_one_line_error(rc, err, code=1, needles=(str(weights), "not a readable PyTorch checkpoint", "a text file"))
    assert "KeyError" not in err and "IndexError" not in err
