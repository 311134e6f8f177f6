"""Hostile files: checkpoints carrying pickle payloads, tampered or foreign classifier files, and
HDF5 files whose attributes hold code. Payloads here would create a marker file if anything ever
ran them; every test checks that the marker never appears, and that featx says what is wrong in
one line instead of a traceback.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import assert_one_line_error as _assert_one_line_error
from conftest import cli, make_images
from tests.classifiers.test_classifier_io import rewrite_description

FAST_ARGS = ["--model", "resnet18", "--image-size", "32", "--workers", "0", "--batch-size", "4"]


# only the error lines count here: the warning before unpickling may precede them
assert_one_line_error = functools.partial(_assert_one_line_error, only_error_lines=True)


class Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images, their codes, a classifier fitted on them and saved with `fit --out` (pickle-free), and
    the same exported as a joblib pickle (`--export-joblib`, the format of featx 0.1.0)."""
    root = tmp_path_factory.mktemp("hostile")
    data = make_images(root / "data", per_class=6, size=(36, 36), splits=("train", "test"))
    cache = root / "cache"
    rc, out, err = cli(
        "-q",
        "extract",
        *FAST_ARGS,
        "--weights",
        "none",
        "--data",
        data,
        "--layers",
        "layer2,layer3",
        "--cache-dir",
        cache,
    )
    assert rc == 0, err
    codes = out.strip().splitlines()[-1]
    clf, pkl = root / "clf" / "m.safetensors", root / "pkl" / "m.joblib"
    rc, out, err = cli("-q", "fit", codes, "--C", "1", "--out", clf, "--export-joblib", pkl)
    assert rc == 0, err
    return {"root": root, "data": data, "cache": cache, "codes": codes, "clf": clf, "pkl": pkl}


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / "PAYLOAD_RAN"
    yield m
    assert not m.exists(), "a payload in a hostile file was executed"


# -- checkpoints ---------------------------------------------------------------------------------


def _evil_checkpoint(path: Path, marker: Path, kind: str) -> None:
    state = {"conv1.weight": torch.zeros(64, 3, 7, 7)}
    if kind == "zip":
        torch.save({"state_dict": state, "extra": Payload(marker)}, path)
    elif kind == "legacy":
        torch.save({"model": state, "extra": Payload(marker)}, path, _use_new_zipfile_serialization=False)
    elif kind == "raw-pickle":
        path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol=2))
    elif kind == "only-payload":
        torch.save(Payload(marker), path)
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw-pickle", "only-payload"])
def test_checkpoint_with_pickle_payload_is_refused(world, tmp_path, marker, kind):
    evil = tmp_path / "evil.pth"
    _evil_checkpoint(evil, marker, kind)
    cache = tmp_path / "cache"
    rc, out, err = cli(
        "-q", "extract", *FAST_ARGS, "--weights", evil, "--data", world["data"], "--cache-dir", cache
    )
    line = assert_one_line_error(rc, err, (2,), [str(evil)])
    assert "refused" in line or "weights_only" in line, line
    assert out == "" and not list(cache.glob("*.h5"))
    # the same file given to predict as the classifier's weights
    rc, out, err = cli("predict", world["clf"], world["data"] / "test" / "cat", "--weights", evil)
    assert_one_line_error(rc, err, (1, 2), [str(evil)])
    # `featx layers` never loads weights; whatever it does, it runs nothing
    rc, out, err = cli("layers", "resnet18", "--weights", evil)
    assert "Traceback" not in err, err


@pytest.mark.parametrize(
    "kind", ["empty", "truncated", "junk-safetensors", "not-a-state-dict", "tensor-list"]
)
def test_unreadable_checkpoint_is_one_line_error(world, tmp_path, kind):
    ck = tmp_path / ("w.safetensors" if kind == "junk-safetensors" else "w.pth")
    if kind == "empty":
        ck.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, ck)
        ck.write_bytes(ck.read_bytes()[:-200])
    elif kind == "junk-safetensors":
        ck.write_bytes(b"\xff" * 64)
    elif kind == "not-a-state-dict":
        torch.save({"epoch": 3, "lr": 0.1}, ck)
    else:
        torch.save([torch.zeros(3)], ck)
    rc, out, err = cli(
        "-q",
        "extract",
        *FAST_ARGS,
        "--weights",
        ck,
        "--data",
        world["data"],
        "--cache-dir",
        tmp_path / "cache",
    )
    assert_one_line_error(rc, err, (1, 2), [str(ck)])


# -- classifier files ----------------------------------------------------------------------------


def _copy_classifier(world, tmp_path, kind: str = "clf") -> Path:
    d = tmp_path / kind
    shutil.copytree(world[kind].parent, d)
    return d / world[kind].name


def _forge(clf: Path, marker: Path) -> None:
    """A code-running pickle in place of the classifier, and its sha256 written into the JSON."""
    clf.write_bytes(pickle.dumps(Payload(marker)))
    side = clf.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta["joblib_sha256"] = hashlib.sha256(clf.read_bytes()).hexdigest()
    side.write_text(json.dumps(meta))


def test_forged_pickle_pair_never_runs(world, tmp_path, marker):
    """a payload plus a JSON whose sha256 was forged to match passed every check and ran;
    featx predict does not unpickle without --trust-pickle, whatever the JSON says."""
    clf = _copy_classifier(world, tmp_path, "pkl")
    _forge(clf, marker)
    for name in (clf, clf.with_suffix("")):
        rc, out, err = cli("predict", name, world["data"] / "test" / "cat", "--device", "cpu")
        assert_one_line_error(rc, err, (1,), [str(clf), "--trust-pickle"])
        assert out == ""
    shutil.copy(world["clf"], clf.with_suffix(".safetensors"))  # re-saved: the pickle is never touched again
    rc, out, err = cli("predict", clf, world["data"] / "test" / "cat", "--device", "cpu", "--json")
    assert rc == 0 and len(json.loads(out)) == 6, err


def test_tampered_classifier_pickle_is_refused_before_unpickling(world, tmp_path, marker):
    clf = _copy_classifier(world, tmp_path, "pkl")
    clf.write_bytes(pickle.dumps(Payload(marker)))
    rc, out, err = cli("predict", clf, world["data"] / "test" / "cat", "--device", "cpu", "--trust-pickle")
    assert_one_line_error(rc, err, (1,), [str(clf), "sha256", "--force"])
    assert out == ""


def test_classifier_with_other_hash_is_refused_unless_forced(world, tmp_path):
    import joblib

    clf = _copy_classifier(world, tmp_path, "pkl")
    joblib.dump(joblib.load(world["pkl"]), clf, compress=3)  # the same model, other bytes
    inputs = world["data"] / "test"
    rc, out, err = cli("predict", clf, inputs, "--device", "cpu", "--trust-pickle")
    assert_one_line_error(rc, err, (1,), [str(clf), "sha256", "--force"])
    rc, out, err = cli("predict", clf, inputs, "--device", "cpu", "--force", "--trust-pickle", "--json")
    assert rc == 0 and "Traceback" not in err, err
    preds = json.loads(out)
    assert len(preds) == 18 and all(p["class"] in ("cat", "dog", "owl") for p in preds)
    assert "pickles" in err  # the warning that joblib files can run code


def test_classifier_from_another_featx_release_is_refused_unless_forced(world, tmp_path):
    clf = _copy_classifier(world, tmp_path)
    rewrite_description(clf, featx_version="9.9.0")
    inputs = world["data"] / "test" / "dog"
    rc, out, err = cli("predict", clf, inputs, "--device", "cpu")
    assert_one_line_error(rc, err, (1,), [str(clf), "9.9.0", "--force"])
    rc, out, err = cli("predict", clf, inputs, "--device", "cpu", "--force", "--json")
    assert rc == 0 and len(json.loads(out)) == 6, err


HOSTILE_META = {
    "version-not-a-string": {"featx_version": 5},
    "layers-a-string": {"layers": "layer2"},
    "layers-unknown": {"layers": ["layer9"]},
    "classes-too-few": {"classes": ["cat"]},
    "classes-not-a-list": {"classes": 3},
    "preprocessing-a-string": {"preprocessing": "__import__('os')"},
    "preprocessing-missing-keys": {"preprocessing": {"crop_size": 32}},
    "mean-wrong-length": {
        "preprocessing": {
            "crop_size": 32,
            "resize_size": 32,
            "interpolation": "bilinear",
            "mean": [0.5, 0.5],
            "std": [0.5] * 3,
            "crop_mode": "center",
        }
    },
    "activation-unknown": {"activations": {"layer2": "exec", "layer3": "exec"}},
    "pool-unknown": {"pool": "sum"},
    "model-code": {"model": "__import__('os').system('true')"},
    "model-other": {"model": "resnet34"},
    "pipeline-code": {
        "pipeline": [{"type": "builtins.eval", "params": {}, "n_features_in": 1, "fitted": {}}]
    },
}


@pytest.mark.parametrize("case", list(HOSTILE_META))
def test_hostile_classifier_metadata_is_a_clear_error(world, tmp_path, marker, case):
    """A description with wrong types or values (the arrays unchanged): one line naming the
    problem, never a traceback, never predictions computed from made-up settings, even forced."""
    clf = _copy_classifier(world, tmp_path)
    rewrite_description(clf, merge=False, **HOSTILE_META[case])
    rc, out, err = cli("predict", clf, world["data"] / "test" / "owl", "--device", "cpu", "--json", "--force")
    assert_one_line_error(rc, err, (1, 2))
    assert out == ""


@pytest.mark.parametrize("content", ["[1, 2]", "{", "", "null", '{"featx_version": "0.1.0"}'])
def test_unreadable_classifier_metadata_is_refused(world, tmp_path, marker, content):
    clf = _copy_classifier(world, tmp_path)
    rewrite_description(clf, raw=content)
    rc, out, err = cli("predict", clf, world["data"] / "test" / "owl", "--device", "cpu")
    assert_one_line_error(rc, err, (1, 2), [str(clf)])
    pkl = _copy_classifier(world, tmp_path, "pkl")
    pkl.write_bytes(pickle.dumps(Payload(marker)))  # even trusted, it must not be opened
    pkl.with_suffix(".json").write_text(content)
    rc, out, err = cli("predict", pkl, world["data"] / "test" / "owl", "--device", "cpu", "--trust-pickle")
    assert_one_line_error(rc, err, (1, 2), [str(pkl.with_suffix(".json"))])


# -- HDF5 attributes -----------------------------------------------------------------------------


def _hostile_codes(world, tmp_path, marker) -> str:
    """A copy of a real codes file whose attributes hold code, YAML tags and pickles."""
    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    path = str(cache / os.path.basename(world["codes"]))
    code = f"__import__('os').system('touch {marker}')"
    with h5py.File(path, "r+") as f:
        for k in (
            "preprocessing",
            "library_versions",
            "layer_resolution",
            "config",
            "data_options",
            "model",
            "weights",
            "dataset",
            "preprocessing_text",
            "created",
            "split_source",
            "precision",
            "device",
            "relu",
            "dtype",
            "weights_source",
            "weights_ident",
        ):
            f.attrs[k] = code
        f.attrs["weights_sha256"] = np.void(pickle.dumps(Payload(marker)))
        f.attrs["pool"] = f"!!python/object/apply:os.system ['touch {marker}']"
        for name in f["codes"]:
            a = f["codes"][name].attrs
            a["activation"] = code
            a["depth"] = code
            a["pre_pool_shape"] = np.void(pickle.dumps(Payload(marker)))
            a["pool"] = code
    return path


def _run_all_readers(world, tmp_path, path) -> dict[str, tuple]:
    runs = {
        "info": cli("info", path),
        "info --json": cli("info", path, "--json"),
        "cache ls": cli("cache", "ls", "--cache-dir", os.path.dirname(path)),
        "fit": cli("-q", "fit", path, "--C", "1"),
        "fit --out": cli("-q", "fit", path, "--C", "1", "--out", tmp_path / "h" / "m"),
    }
    if (tmp_path / "h" / "m.safetensors").exists():
        runs["predict"] = cli(
            "predict", tmp_path / "h" / "m", world["data"] / "test" / "cat", "--device", "cpu"
        )
    # the same extract command finds this file as its cache entry
    runs["extract (hit)"] = cli(
        "extract",
        *FAST_ARGS,
        "--weights",
        "none",
        "--data",
        world["data"],
        "--layers",
        "layer2,layer3",
        "--cache-dir",
        os.path.dirname(path),
    )
    return runs


def test_hdf5_attributes_are_never_evaluated(world, tmp_path, marker):
    path = _hostile_codes(world, tmp_path, marker)
    runs = _run_all_readers(world, tmp_path, path)
    assert not marker.exists(), "reading HDF5 attributes ran code"
    assert runs["extract (hit)"][0] == 0  # the codes themselves are intact


def test_hostile_hdf5_attributes_give_clear_errors(world, tmp_path, marker):
    """Where an attribute featx needs holds garbage, each command still ends cleanly: success, or
    one line naming the file (exit 1), never a traceback."""
    path = _hostile_codes(world, tmp_path, marker)
    problems = []
    for name, (rc, _out, err) in _run_all_readers(world, tmp_path, path).items():
        if "Traceback" in err:
            problems.append(f"featx {name}: traceback: {err.strip().splitlines()[-1]}")
        elif rc not in (0, 1):
            problems.append(f"featx {name}: exit {rc}: {err.strip()[-300:]}")
        elif rc == 1 and len([ln for ln in err.strip().split("\n") if "featx: error" in ln]) != 1:
            problems.append(f"featx {name}: not one error line: {err.strip()[-300:]}")
    assert not problems, "\n".join(problems)
