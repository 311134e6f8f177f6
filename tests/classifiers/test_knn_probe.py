"""The k-NN probe end to end: fit/bench `--classifier knn`, k and T on validation, saving, predicting."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os

import numpy as np
import pytest

from conftest import FAST, assert_one_line_error, blobs, cli, make_images, write_codes
from featx.classifiers import selection
from featx.classifiers.fit import fit, fit_cell
from featx.classifiers.io import load_classifier, save_classifier
from featx.classifiers.knn import GridScore, WeightedKNN, grid_scores
from featx.classifiers.protocol import PRESETS, Protocol, protocol_for
from featx.classifiers.rows import load_parts, select_rows
from featx.errors import FeatxError, UsageError
from featx.store.codes import CodesFile

CLASSES = ["a", "b", "c"]


def _splits(y, test_every=4, val_every=None):
    s = np.array(["train"] * len(y), dtype=object)
    s[::test_every] = "test"
    if val_every:
        s[1::val_every] = "val"
    return s


@pytest.fixture
def codes(tmp_path):
    """Blobs with a val split (a hold-out choice) and a second, noisier layer."""
    X, y = blobs(60, 3, 16, sep=2.0)
    X2 = X[:, ::-1] * 0.5 + np.random.default_rng(1).normal(size=X.shape) * 3
    return write_codes(tmp_path / "c.h5", {"good": X, "noisy": X2}, y, _splits(y, 4, 4), CLASSES)


def _rows(path, protocol, size="all", seed=0):
    from featx.classifiers.protocol import parse_train_size

    with CodesFile(path) as f:
        rows = select_rows(f, protocol, parse_train_size(size), seed)
        parts = load_parts(f, ["good"], (rows.train, rows.val, rows.test))
        return rows, parts, [f.labels[r] for r in (rows.train, rows.val, rows.test)]


def test_k_and_T_chosen_on_validation_and_test_equals_a_direct_fit(codes, caplog):
    protocol = protocol_for("knn", ks=(1, 5, 20, 500))
    with caplog.at_level(logging.WARNING, logger="featx"):
        r = fit_cell(codes, ["good"], protocol, "all", 0)
    assert "k=500 is more than the 90 training rows" in caplog.text  # capped, with a warning
    rows, (X_tr, X_va, X_te), (y_tr, y_va, y_te) = _rows(codes, protocol)
    assert r["val_source"] == "val split" and r["n_val"] == len(y_va) == 45
    grid = grid_scores(X_tr, y_tr, X_va, y_va, ks=(1, 5, 20, 90), temperatures=protocol.temperatures)
    best = grid[selection.best_knn(grid)]
    assert (r["k"], r["temperature"]) == (best.k, best.temperature)
    assert r["C"] == f"k={best.k} T={best.temperature:g}"
    assert (r["val_score"], r["val_tiebreak"]) == (best.val_score, best.val_tiebreak)
    assert r["val_tiebreak_metric"] == "mean log-likelihood" and r["val_rule"] == "val_score"
    # the refit on train + val with the chosen values, read once on test
    direct = WeightedKNN(best.k, best.temperature).fit(np.vstack([X_tr, X_va]), np.concatenate([y_tr, y_va]))
    assert r["accuracy"] == pytest.approx(float(np.mean(direct.predict(X_te) == y_te)))
    assert r["n_test"] == len(y_te) and r["test_ci_low"] < r["accuracy"] <= r["test_ci_high"]
    assert r["test_correct"] and r["classifier"] == "knn"


def test_cross_validation_scores_every_fold(tmp_path):
    X, y = blobs(40, 3, 16, sep=2.0)
    path = write_codes(tmp_path / "s.h5", {"good": X}, y, _splits(y), CLASSES)
    protocol = protocol_for("knn", ks=(3, 10), temperatures=(0.07, 0.2))
    r = fit_cell(path, ["good"], protocol, "5/class", 0)  # 5 a class: no hold-out, 5-fold CV
    assert r["val_source"] == "5-fold cv" and len(r["val_folds"]) == 5 and r["val_rule"] == "val_score"
    assert r["k"] in (3, 10) and r["temperature"] in (0.07, 0.2)
    again = fit_cell(path, ["good"], protocol, "5/class", 0)
    assert {k: v for k, v in again.items() if k != "fit_seconds"} == {
        k: v for k, v in r.items() if k != "fit_seconds"
    }


def test_tie_rule_smaller_k_then_T_nearest_007():
    g = [
        GridScore(20, 0.2, 0.9, -0.1),
        GridScore(10, 0.2, 0.9, -0.1),
        GridScore(10, 0.07, 0.9, -0.1),
        GridScore(10, 0.02, 0.9, -0.1),
        GridScore(200, 0.02, 0.8, 0.0),
    ]
    assert selection.best_knn(g) == 2  # accuracy, log-likelihood tie: smaller k, then T = 0.07
    assert (
        selection.best_knn(g[:2] + [GridScore(10, 0.02, 0.9, -0.05)]) == 2
    )  # the better log-likelihood first
    assert (
        selection.best_knn([GridScore(10, 0.2, 0.9, 0.0), GridScore(10, 0.02, 0.9, 0.0)]) == 0
    )  # x2.9, x3.5
    assert selection.best_knn([GridScore(10, 0.14, 0.9, 0.0), GridScore(10, 0.035, 0.9, 0.0)]) == 1  # x2 each


def test_protocol_identities_and_bad_values():
    # linear protocols' identities are what they were before knn (bench cells and resumes depend on them)
    pinned = [
        "2c858bbc4246347f",
        "368a5864e9bfffbe",
        "1e3eca18586466fc",
        "91e5f8a84c180c22",
        "5721ddd621a8bb9e",
        "06e63c0b929de3a3",
        "d383a963f0ea04e3",
    ]
    ps = [protocol_for(c) for c in ("softmax", "svm", "sgd")] + list(PRESETS.values())
    ps += [protocol_for("softmax", cv=3, Cs=(0.1, 1)), protocol_for("svm", scale="l2", pca=8)]
    assert [
        hashlib.sha256(json.dumps(p.to_dict(), sort_keys=True).encode()).hexdigest()[:16] for p in ps
    ] == pinned
    knn = protocol_for("knn")
    assert knn.scale == "none" and knn.ks == (10, 20, 100, 200) and knn.temperatures == (0.02, 0.07, 0.2)
    assert knn.to_dict()["ks"] == [10, 20, 100, 200] and "Cs" not in knn.to_dict()
    assert protocol_for("knn", Cs=(1.0,)).to_dict() == knn.to_dict()  # C does not touch knn's numbers
    assert protocol_for("knn", ks=(20, 10)).to_dict() != knn.to_dict()
    for kw, flag in [
        ({"ks": (0,)}, "--knn-k"),
        ({"ks": (2.5,)}, "--knn-k"),
        ({"temperatures": (0.0,)}, "--knn-t"),
        ({"temperatures": (float("nan"),)}, "--knn-t"),
        ({"scale": "standardize"}, "--scale"),
        ({"pca": 4}, "--pca"),
        ({"solver": "torch"}, "--solver"),
    ]:
        with pytest.raises(UsageError, match=flag):
            protocol_for("knn", **kw)
    assert Protocol().scale == "standardize"


def test_save_load_predict_equal_in_memory(codes, tmp_path):
    report = fit(codes, "good,noisy", protocol_for("knn"), return_models=True)
    pipe = report.models[report.best]
    X = np.random.default_rng(3).normal(size=(50, 16))
    for dtype in ("float32", "float16"):
        out = save_classifier(str(tmp_path / dtype), report, knn_codes=dtype)
        loaded, meta = load_classifier(out)
        assert meta["k"] == pipe[-1].n_neighbors_ and meta["temperature"] == pipe[-1].temperature
        assert meta["pipeline"][-1]["fitted"]["codes_dtype"] == dtype
        assert (loaded.predict(X) == pipe.predict(X)).all()
        if dtype == "float32":
            assert np.array_equal(loaded.predict_proba(X), pipe.predict_proba(X))
    from safetensors import safe_open

    sizes = {}
    for dtype in ("float32", "float16"):
        with safe_open(str(tmp_path / f"{dtype}.safetensors"), framework="numpy") as f:
            sizes[dtype] = f.get_tensor("0.codes").nbytes  # the training codes travel with the classifier
    assert sizes["float32"] == 135 * 16 * 4 == 2 * sizes["float16"]


def test_a_damaged_knn_file_is_refused_in_one_line(codes, tmp_path):
    from tests.classifiers.test_classifier_io import rewrite_description

    report = fit(codes, "good", protocol_for("knn"), return_models=True)
    out = save_classifier(str(tmp_path / "m"), report)
    data = bytearray(open(out, "rb").read())
    data[-5] ^= 0xFF  # a flipped bit in the training codes
    (tmp_path / "flip.safetensors").write_bytes(bytes(data))
    with pytest.raises(FeatxError, match="do not match the sha256"):
        load_classifier(str(tmp_path / "flip.safetensors"))
    make_images(tmp_path / "imgs", per_class=1)
    rc, _, err = cli("predict", str(tmp_path / "flip.safetensors"), str(tmp_path / "imgs"))
    assert_one_line_error(rc, err, needles=("sha256",))
    for step, needle in [
        ({"fitted": {"n_neighbors_": 10**6, "codes_dtype": "float32"}}, "n_neighbors_"),
        ({"fitted": {"n_neighbors_": 5, "codes_dtype": "float16"}}, "float16"),
        ({"params": {"temperature": -1.0, "n_neighbors": 5}}, "temperature"),
    ]:
        bad = tmp_path / "edit.safetensors"
        bad.write_bytes(open(out, "rb").read())
        from safetensors import safe_open

        with safe_open(str(bad), framework="numpy") as f:
            spec = json.loads(f.metadata()["featx_classifier"])["pipeline"]
        spec[-1] = {**spec[-1], **{k: {**spec[-1][k], **v} for k, v in step.items()}}
        rewrite_description(bad, pipeline=spec)
        with pytest.raises(FeatxError, match=needle):
            load_classifier(str(bad))
    rewrite_description(tmp_path / "edit.safetensors", k=0)
    with pytest.raises(FeatxError, match="'k'"):
        load_classifier(str(tmp_path / "edit.safetensors"))


def test_cli_fit_knn_options_and_errors(codes, tmp_path):
    rc, out, err = cli(
        "fit",
        codes,
        "--classifier",
        "knn",
        "--knn-k",
        "5,500",
        "--knn-t",
        "0.07",
        "--out",
        tmp_path / "m",
        "--results",
        tmp_path / "r.json",
    )
    assert rc == 0, err
    assert "k, T" in out and ("k=5 T=0.07" in out or "k=90 T=0.07" in out)  # 500 capped at the 90 rows
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["protocol"]["ks"] == [5, 500] and res["results"][0]["k"] in (5, 90)
    assert (tmp_path / "m.safetensors").is_file()
    for args, flag in [
        (["--knn-k", "0"], "--knn-k"),
        (["--knn-t", "0"], "--knn-t"),
        (["--knn-t", "-0.1"], "--knn-t"),
        (["--knn-k", "x"], "--knn-k"),
        (["--C", "1"], "--C"),
        (["--scale", "l2"], "--scale"),
    ]:
        rc, _, err = cli("fit", codes, "--classifier", "knn", *args)
        assert_one_line_error(rc, err, code=2, needles=(flag,))
    rc, _, err = cli("fit", codes, "--knn-k", "5")  # softmax: the option would be ignored
    assert_one_line_error(rc, err, code=2, needles=("--knn-k", "--classifier knn"))


@pytest.fixture(scope="module")
def images_and_codes(tmp_path_factory):
    from featx.engine.extract import extract

    root = tmp_path_factory.mktemp("knnpred")
    data = make_images(root / "data", per_class=8, splits=("train", "test"), size=(36, 36))
    res = extract("resnet18", str(data), "layer2,layer3", cache_dir=str(root / "cache"), **FAST)
    return root, data, res.path


def test_predict_from_images_equals_the_fitted_knn(images_and_codes, tmp_path):
    from featx.classifiers.predict import Predictor
    from featx.store.codes import open_codes

    root, data, codes_path = images_and_codes
    rc, _, err = cli(
        "fit",
        codes_path,
        "--layer",
        "layer3",
        "--classifier",
        "knn",
        "--out",
        tmp_path / "knn",
        "--export-joblib",
        tmp_path / "knn.joblib",
    )
    assert rc == 0, err
    pipe, _ = load_classifier(str(tmp_path / "knn"))
    pickled, _ = load_classifier(str(tmp_path / "knn.joblib"), trust_pickle=True)
    predictor = Predictor(str(tmp_path / "knn"), device="cpu")
    with open_codes(codes_path) as f:
        test = np.flatnonzero(f.split == "test")
        paths = [os.path.join(data, f.paths[i]) for i in test]
        X = f.codes("layer3", test)
    proba = pipe.predict_proba(X)
    preds = predictor.predict(paths, top_k=3)
    assert [p.label for p in preds] == [
        predictor.classes[int(pipe.classes_[k])] for k in np.argmax(proba, axis=1)
    ]
    for p, row in zip(preds, proba):
        assert p.score == pytest.approx(row.max(), abs=1e-4)  # codes recomputed from pixels: float rounding
        assert sum(s for _, s in p.top) <= 1 + 1e-6
    assert (pickled.predict(X) == pipe.predict(X)).all()
    rc, out, err = cli("predict", tmp_path / "knn", data / "test" / "cat", "--json", "--device", "cpu")
    assert rc == 0, err and all(p["class"] in ("cat", "dog", "owl") for p in json.loads(out))
    predictor.close()


def test_bench_with_softmax_and_knn(images_and_codes, tmp_path):
    root, data, _ = images_and_codes
    out = tmp_path / "bench"
    rc, _, err = cli(
        "bench",
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--batch-size",
        "8",
        "--precision",
        "fp32",
        "--data",
        data,
        "--layers",
        "layer2,layer3",
        "--classifier",
        "softmax,knn",
        "--C",
        "0.1,1",
        "--knn-k",
        "3,10",
        "--out",
        out,
        "--cache-dir",
        root / "cache",
    )
    assert rc == 0, err
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    kinds = {r["classifier"] for r in table}
    assert kinds == {"softmax", "knn"} and len(table) == 4
    for r in table:
        if r["classifier"] == "knn":
            assert r["C"] == f"k={r['k']} T={float(r['temperature']):g}" and int(r["k"]) in (3, 10)
        else:
            assert r["k"] == "" and float(r["C"]) in (0.1, 1.0)
    rows = json.loads((out / "results.json").read_text())
    assert all(r["test_correct"] and r["val_score"] is not None for r in rows)
    assert "## " in (out / "report.md").read_text() and "(knn)" in (out / "report.md").read_text()
