"""featx.classifiers.io: pickle-free classifier files, their checks, and how fit writes them."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from conftest import FAST_ARGS, blobs, cli, make_images, write_codes
from featx.classifiers.description import HEADER_KEY, describe
from featx.classifiers.fit import fit_cell
from featx.classifiers.io import from_arrays, load_classifier, read_description, save_classifier, to_arrays
from featx.classifiers.protocol import protocol_for
from featx.errors import FeatxError, UsageError


def one_line_error(rc, err: str, codes=(1,), needles=()) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().split("\n") if "featx: error" in ln]
    assert rc in codes and len(lines) == 1, (rc, err)
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def rewrite_description(path, merge: bool = True, raw: str | None = None, **changes) -> None:
    """Hand-edit the JSON description in a classifier file's header (dict fields merged unless not
    `merge`; `raw` replaces the whole text), arrays unchanged."""
    with safe_open(str(path), framework="numpy") as f:
        header = dict(f.metadata())
        arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta = json.loads(header[HEADER_KEY])
    for k, v in changes.items():
        meta[k] = {**meta[k], **v} if merge and isinstance(v, dict) and isinstance(meta.get(k), dict) else v
    header[HEADER_KEY] = json.dumps(meta) if raw is None else raw
    save_file(arrays, str(path), metadata=header)


# -- the array format against the fitted Pipeline ------------------------------------------------


@pytest.fixture(scope="module")
def blob_codes(tmp_path_factory):
    root = tmp_path_factory.mktemp("blobs")
    X, y = blobs(n_per_class=30, n_classes=3, dim=16)
    split = np.where(np.arange(len(y)) % 4 == 0, "test", "train")
    path = write_codes(root / "c.h5", {"a": X[:, :10], "b": X[:, 10:]}, y, split, ["x", "y", "z"])
    return {"path": path, "meta": describe(path, ["a", "b"]), "root": root}


CASES = [(c, s, p) for c in ("svm", "softmax", "sgd") for s in ("standardize", "l2") for p in (None, 4)]


@pytest.mark.parametrize("classifier,scale,pca", [*CASES, ("vissl-svm", "l2", None), ("softmax", "none", 4)])
def test_array_file_predicts_as_the_pipeline(blob_codes, tmp_path, classifier, scale, pca):
    if classifier == "vissl-svm":
        protocol = protocol_for(preset="vissl-svm")
    else:
        protocol = protocol_for(classifier, Cs=(0.1, 1.0), scale=scale, pca=pca)
    _, pipe = fit_cell(blob_codes["path"], ["a", "b"], protocol, return_model=True)
    specs, arrays = to_arrays(pipe)
    path = save_classifier(str(tmp_path / "m"), pipe, blob_codes["meta"])
    assert path == str(tmp_path / "m.safetensors") and os.listdir(tmp_path) == ["m.safetensors"]
    loaded, meta = load_classifier(path)
    assert [type(s) for s in loaded.named_steps.values()] == [type(s) for s in pipe.named_steps.values()]
    assert [s["type"] for s in meta["pipeline"]] == [type(s).__name__ for s in pipe.named_steps.values()]
    X = np.random.default_rng(1).normal(size=(40, 16)).astype(np.float32) * 3
    for rebuilt in (loaded, from_arrays(specs, arrays, "x", 3)):
        np.testing.assert_allclose(
            rebuilt.decision_function(X), pipe.decision_function(X), rtol=1e-5, atol=1e-6
        )  # float32 codes: float32 rounding
        np.testing.assert_array_equal(rebuilt.predict(X), pipe.predict(X))
        if classifier == "softmax":
            np.testing.assert_allclose(
                rebuilt.predict_proba(X), pipe.predict_proba(X), rtol=1e-5, atol=1e-6
            )  # float32 codes: float32 rounding


def test_loading_never_unpickles(blob_codes, tmp_path, monkeypatch):
    """With every way to unpickle disabled, the classifier still loads and predicts."""
    import joblib

    _, pipe = fit_cell(
        blob_codes["path"], ["a", "b"], protocol_for("softmax", Cs=(1.0,), pca=3), return_model=True
    )
    path = save_classifier(str(tmp_path / "m.joblib"), pipe, blob_codes["meta"])  # the 0.1.0 spelling
    assert path.endswith("m.safetensors") and not os.path.exists(tmp_path / "m.joblib")

    def refuse(*a, **k):
        raise AssertionError("something was unpickled")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (joblib, "load")):
        monkeypatch.setattr(mod, name, refuse)
    loaded, meta = load_classifier(str(tmp_path / "m.joblib"))
    X = np.ones((2, 16), np.float32)
    np.testing.assert_allclose(loaded.predict_proba(X), pipe.predict_proba(X), rtol=1e-9)
    with safe_open(path, framework="numpy") as f:
        assert all(f.get_tensor(k).dtype.kind in "fi" for k in f.keys())  # noqa: SIM118
    assert meta["classes"] == ["x", "y", "z"] and meta["backbone"]["tensors"] > 0


def test_damaged_or_foreign_files_are_one_line_errors(blob_codes, tmp_path):
    _, pipe = fit_cell(blob_codes["path"], ["a", "b"], protocol_for("svm", Cs=(1.0,)), return_model=True)
    path = save_classifier(str(tmp_path / "m"), pipe, blob_codes["meta"])
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-20])  # truncated: refused with and without force
    for force in (False, True):
        with pytest.raises(FeatxError, match="not a readable classifier file"):
            load_classifier(path, force=force)
    open(path, "wb").write(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit in the arrays
    with pytest.raises(FeatxError, match="do not match the sha256"):
        load_classifier(path)
    load_classifier(path, force=True)  # still well-formed: --force may use it
    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "w.safetensors"))  # weights, not a classifier
    with pytest.raises(FeatxError, match="without a featx classifier description"):
        load_classifier(str(tmp_path / "w.safetensors"))
    with pytest.raises(UsageError, match="no such classifier"):
        load_classifier(str(tmp_path / "nothing.joblib"))


@pytest.mark.parametrize(
    "edit,needle",
    [
        ({"preprocessing": {"mean": [0.5, 0.5]}}, "preprocessing"),
        ({"preprocessing": {"std": [0.5, 0.0, 0.5]}}, "preprocessing"),
        ({"pipeline": [{"type": "os.system", "params": {}, "n_features_in": 16, "fitted": {}}]}, "os.system"),
        ({"classes": ["x", "y"]}, "classes_"),
        ({"dims": {"a": 12}}, "dims"),
        ({"backbone": {"tensors": "many"}}, "backbone"),
        ({"arrays_sha256": 7}, "arrays_sha256"),
    ],
)
def test_edited_description_is_refused(blob_codes, tmp_path, edit, needle):
    _, pipe = fit_cell(blob_codes["path"], ["a", "b"], protocol_for("svm", Cs=(1.0,)), return_model=True)
    path = save_classifier(str(tmp_path / "m"), pipe, blob_codes["meta"])
    rewrite_description(path, **edit)
    with pytest.raises(FeatxError, match=needle) as e:
        load_classifier(path, force=True)
    assert "\n" not in str(e.value)


def test_only_featx_kinds_of_pipeline_are_saved(blob_codes, tmp_path):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline

    X, y = blobs(dim=16)
    with pytest.raises(UsageError, match="cannot save a RandomForestClassifier"):
        save_classifier(
            str(tmp_path / "m"), make_pipeline(RandomForestClassifier(2).fit(X, y)), blob_codes["meta"]
        )
    assert not os.listdir(tmp_path)


# -- fit and predict through the CLI -------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("clfio")
    data = make_images(root / "data", per_class=6, size=(36, 36), splits=("train", "test"))
    rc, out, err = cli(
        "-q", "extract", *FAST_ARGS, "--data", data, "--layers", "layer3", "--cache-dir", root / "cache"
    )
    assert rc == 0, err
    return {"root": root, "data": data, "codes": out.strip().splitlines()[-1]}


def predict_json(clf, world, *extra):
    rc, out, err = cli("predict", clf, world["data"] / "test", "--device", "cpu", "--json", *extra)
    assert rc == 0, err
    return [(p["path"], p["class"], round(p["score"], 6)) for p in json.loads(out)]


def test_results_beside_the_classifier_do_not_destroy_it(world, tmp_path):
    """`--out models/r.joblib --results models/r.json` overwrote the classifier's
    metadata. Now the classifier is one file, and outputs that would collide are refused."""
    models = tmp_path / "models"
    rc, out, err = cli(
        "-q", "fit", world["codes"], "--C", "1", "--out", models / "r.joblib", "--results", models / "r.json"
    )
    assert rc == 0, err
    assert sorted(os.listdir(models)) == ["r.json", "r.safetensors"]
    assert json.loads((models / "r.json").read_text())["best_layer"] == "layer3"
    assert len(predict_json(models / "r.joblib", world)) == 18  # the old spelling names the same classifier
    before = {p: sha256(models / p) for p in os.listdir(models)}
    codes_sha = sha256(world["codes"])
    for argv in (
        ["--out", models / "r", "--results", models / "r.safetensors"],
        ["--export-joblib", models / "e.joblib", "--results", models / "e.json"],
        ["--out", models / "e.joblib", "--export-joblib", models / "x", "--results", models / "x.joblib"],
        ["--results", world["codes"]],
    ):
        rc, out, err = cli("-q", "fit", world["codes"], "--C", "1", *argv)
        one_line_error(rc, err, (2,), ["give each output of featx fit its own path"])
    assert {p: sha256(models / p) for p in os.listdir(models)} == before and sha256(
        world["codes"]
    ) == codes_sha


def _with_fsize_limit(limit: int):
    def pre():
        import resource
        import signal

        signal.signal(
            signal.SIGXFSZ, signal.SIG_IGN
        )  # writes past the limit fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return pre


def _failed_save_keeps_the_old_files(world, tmp_path, option: str) -> None:
    name = tmp_path / "full" / "c"
    rc, out, err = cli("-q", "fit", world["codes"], "--C", "1", "--out", name, "--export-joblib", name)
    assert rc == 0, err
    files = sorted(os.listdir(name.parent))
    assert files == ["c.joblib", "c.json", "c.safetensors"]
    before = {p: sha256(name.parent / p) for p in files}
    preds = predict_json(name, world)
    r = subprocess.run(
        [sys.executable, "-m", "featx.cli", "-q", "fit", world["codes"], "--C", "0.1", option, name],
        capture_output=True,
        text=True,
        preexec_fn=_with_fsize_limit(2000),
        timeout=300,
    )
    one_line_error(r.returncode, r.stderr, (1,), ["cannot write"])
    assert sorted(os.listdir(name.parent)) == files, "a temporary file was left behind"
    assert {p: sha256(name.parent / p) for p in files} == before
    assert predict_json(name, world) == preds
    assert predict_json(f"{name}.joblib", world, "--trust-pickle") == preds


def test_failed_save_keeps_the_old_classifier(world, tmp_path):
    """a save that runs out of space leaves the earlier classifier whole and loadable."""
    _failed_save_keeps_the_old_files(world, tmp_path, "--out")


@pytest.mark.slow
def test_failed_joblib_export_keeps_the_old_pair(world, tmp_path):
    _failed_save_keeps_the_old_files(world, tmp_path, "--export-joblib")


def test_fit_validates_C_and_reports_solver_failures(tmp_path):
    X, y = blobs(n_per_class=20, dim=8)
    split = np.where(np.arange(len(y)) % 4 == 0, "test", "train")
    codes = write_codes(tmp_path / "c.h5", {"a": X}, y, split, ["x", "y", "z"])
    for C in ("1e308", "1e-300"):
        rc, out, err = cli("fit", codes, "--classifier", "sgd", "--C", C)
        one_line_error(rc, err, (2,), ["--C", "1e-10 to 1e+10"])
    X[3, 2] = np.inf  # what the solvers cannot take: its message, for that layer, in one line
    bad = write_codes(tmp_path / "h.h5", {"a": X}, y, split, ["x", "y", "z"])
    rc, out, err = cli("fit", bad, "--classifier", "sgd", "--scale", "none", "--C", "1")
    one_line_error(rc, err, (1,), ["layer a: the sgd solver failed"])


def test_vissl_error_names_the_class_plainly(tmp_path):
    X, y = blobs(n_per_class=6, dim=8)
    split = np.array(["train"] * len(y), dtype=object)
    split[[0, 6, 12, 13, 14, 15, 16]] = "test"  # class 2 keeps one training image
    codes = write_codes(tmp_path / "c.h5", {"a": X}, y, split, ["x", "y", "z"])
    rc, out, err = cli("fit", codes, "--preset", "vissl-svm")
    line = one_line_error(rc, err, (1,), ["class 'z' has fewer than 2 training images"])
    assert "np." not in line


def test_predict_refuses_a_description_edited_to_another_model(world, tmp_path):
    """resnet34 has the same layer3 width as resnet18, so an edited `model` gave a
    confident wrong prediction; the backbone's identity in the file catches it."""
    clf = tmp_path / "m"
    rc, out, err = cli("-q", "fit", world["codes"], "--C", "1", "--out", clf)
    assert rc == 0, err
    path = f"{clf}.safetensors"
    rewrite_description(path, model="resnet34")
    for extra in ([], ["--force"]):
        rc, out, err = cli("predict", path, world["data"] / "test" / "cat", "--device", "cpu", *extra)
        one_line_error(rc, err, (1,), ["resnet34", "refit"])
        assert out == ""
    assert "resnet34" in read_description(path)["model"]


def test_predict_force_on_truncated_files_is_one_line(world, tmp_path):
    clf = tmp_path / "t"
    rc, out, err = cli("-q", "fit", world["codes"], "--C", "1", "--out", clf, "--export-joblib", clf)
    assert rc == 0, err
    for path, extra in ((f"{clf}.safetensors", []), (f"{clf}.joblib", ["--trust-pickle"])):
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        rc, out, err = cli(
            "predict", path, world["data"] / "test" / "cat", "--device", "cpu", "--force", *extra
        )
        one_line_error(rc, err, (1,), [path, "not a readable"])
