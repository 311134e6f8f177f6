"""Saved classifiers, featx predict, and the CNNCodes scikit-learn transformer."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, make_images, run_cli
from featx.classifiers.fit import fit
from featx.classifiers.io import export_joblib, load_classifier, read_description, save_classifier
from featx.classifiers.predict import Predictor, classifier_meta, collect_images
from featx.classifiers.protocol import protocol_for
from featx.classifiers.transformer import CNNCodes
from featx.engine.extract import extract
from featx.errors import FeatxError
from featx.store.codes import open_codes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Codes of a train/test image folder, a softmax fitted on them and saved."""
    root = tmp_path_factory.mktemp("pred")
    data = make_images(root / "data", per_class=8, splits=("train", "test"), size=(36, 36))
    res = extract("resnet18", str(data), "layer2,layer3", cache_dir=str(root / "cache"), **FAST)
    report = fit(res.path, "layer2,layer3", protocol_for("softmax"), return_models=True)
    out = save_classifier(str(root / "clf" / "model"), report)  # a FitReport: its best layer and results
    return {"data": data, "codes": res.path, "clf": out, "layer": report.best, "root": root, "report": report}


def test_predictor_codes_equal_the_cached_codes(trained):
    predictor = Predictor(trained["clf"], device="cpu")
    with open_codes(trained["codes"]) as f:
        test = np.flatnonzero(f.split == "test")
        paths = [os.path.join(trained["data"], f.paths[i]) for i in test]
        cached = f.codes(trained["layer"], test)
        expected = predictor.pipeline.predict(cached)
    preds = predictor.predict(paths, top_k=2)
    predictor.close()
    assert [p.label for p in preds] == [predictor.classes[k] for k in expected]
    assert all(len(p.top) == 2 and p.score == p.top[0][1] for p in preds)
    batch = torch.stack(
        [
            Predictor(trained["clf"], device="cpu").preprocess.to_uint8(Image.open(p).convert("RGB"))
            for p in paths
        ]
    )
    pr = Predictor(trained["clf"], device="cpu")
    np.testing.assert_allclose(pr.codes(batch), cached, rtol=1e-5, atol=1e-5)
    pr.close()


def test_description_records_what_prediction_needs(trained):
    meta = read_description(trained["clf"])
    for key in (
        "model",
        "weights",
        "weights_sha256",
        "layers",
        "pool",
        "activations",
        "preprocessing",
        "classes",
        "featx_version",
        "backbone",
        "pipeline",
        "arrays_sha256",
        "results",
    ):
        assert key in meta
    assert meta["classes"] == ["cat", "dog", "owl"] and meta["layers"] == [trained["layer"]]
    assert meta["results"]["best_layer"] == trained["layer"] and meta["format"] == 2


def test_joblib_export_is_read_only_when_trusted(trained, tmp_path, caplog):
    import shutil

    clf, side = export_joblib(str(tmp_path / "m.joblib"), trained["report"])
    assert side == str(tmp_path / "m.json") and json.loads(open(side).read())["joblib_sha256"]
    with pytest.raises(FeatxError, match="joblib pickle.*--trust-pickle"):
        load_classifier(clf)
    pipe, _ = load_classifier(clf, trust_pickle=True)
    assert "pickles that can run code" in caplog.text
    X = np.ones((2, pipe.n_features_in_), np.float32)
    np.testing.assert_allclose(
        pipe.predict_proba(X), load_classifier(trained["clf"])[0].predict_proba(X), rtol=1e-6
    )
    with open(clf, "ab") as f:
        f.write(b"\0")
    with pytest.raises(FeatxError, match="sha256 does not match.*refusing to unpickle"):
        load_classifier(clf, trust_pickle=True)
    load_classifier(clf, force=True, trust_pickle=True)  # the explicit override
    shutil.copy(trained["clf"], tmp_path / "m.safetensors")
    assert load_classifier(clf)[1]["format"] == 2  # beside a pickle-free file, that file wins
    export_joblib(clf, trained["report"])
    meta = json.loads(open(side).read())
    meta["featx_version"] = "9.9.0"
    open(side, "w").write(json.dumps(meta))
    with pytest.raises(FeatxError, match="made by featx 9.9.0"):
        load_classifier(clf, force=False, trust_pickle=True)
    os.remove(side)
    with pytest.raises(FeatxError, match="metadata .* is missing"):
        load_classifier(clf, trust_pickle=True)


def test_classifier_for_other_weights_is_refused(tmp_path):
    from featx.models.build import load_model

    data = make_images(tmp_path / "d", per_class=6, splits=("train", "test"))
    ck = tmp_path / "w.pth"
    torch.save(load_model("resnet18", "none").module.state_dict(), ck)
    kw = {**FAST, "weights": str(ck)}
    res = extract("resnet18", str(data), "layer3", cache_dir=str(tmp_path / "c"), **kw)
    report = fit(res.path, "layer3", protocol_for("svm"), return_models=True)
    out = save_classifier(str(tmp_path / "m"), report.models["layer3"], res.path, ["layer3"])
    Predictor(out, device="cpu").close()  # same weights: fine
    state = torch.load(ck, weights_only=True)
    state["conv1.weight"] *= 2
    torch.save(state, ck)
    with pytest.raises(FeatxError, match="weights found differ"):
        Predictor(out, device="cpu")
    meta = classifier_meta(res.path, ["layer3"])  # the 0.1.0 name of describe()
    assert meta["backbone"]["state_sha256"] != read_description(out)["backbone"]["state_sha256"]


def test_cli_fit_and_predict(trained, tmp_path):
    out = tmp_path / "cli.joblib"
    r = run_cli(
        "fit",
        trained["codes"],
        "--layer",
        "layer2,layer3",
        "--classifier",
        "svm",
        "--out",
        str(out),
        "--results",
        str(tmp_path / "r.json"),
        "--seeds",
        "0,1",
    )
    assert r.returncode == 0, r.stderr
    assert "chosen layer: " in r.stdout and "confusion matrix" in r.stdout and "±" in r.stdout
    results = json.loads((tmp_path / "r.json").read_text())
    assert len(results["results"]) == 4 and results["best_layer"] in ("layer2", "layer3")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    csv = tmp_path / "list.csv"
    csv.write_text(f"path\n{trained['data']}/test/cat/cat_000.jpg\n")
    r = run_cli(
        "predict",
        str(out),
        str(trained["data"] / "test" / "dog"),
        str(csv),
        str(bad),
        "--json",
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    preds = json.loads(r.stdout)
    assert len(preds) == 10 and preds[-1]["error"] and preds[-1]["class"] is None
    assert all(p["class"] in ("cat", "dog", "owl") for p in preds[:-1])
    assert "could not be decoded" in r.stderr
    assert "10 images: " in r.stderr and "; 1 could not be decoded" in r.stderr  # the closing summary
    r = run_cli("fit", trained["codes"], "--layer", "layer9")
    assert (
        r.returncode == 2
        and "layer 'layer9' is not in" in r.stderr
        and len(r.stderr.strip().splitlines()) == 1
    )


def test_collect_images(trained):
    found = collect_images([str(trained["data"] / "train")])
    assert len(found) == 24 and all(p.endswith(".jpg") for p in found)
    with pytest.raises(Exception, match="no such image"):
        collect_images(["/no/such.png"])


def test_cnncodes_is_a_scikit_learn_transformer(trained):
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    with open_codes(trained["codes"]) as f:
        rows = np.arange(len(f))
        paths = [os.path.join(trained["data"], p) for p in f.paths]
        cached = np.hstack([f.codes("layer2"), f.codes("layer3")])
        y = f.labels
    t = CNNCodes("resnet18", weights="none", layers="layer3,layer2", image_size=32, precision="fp32")
    X = t.fit_transform(paths)
    assert t.layers_ == ["layer2", "layer3"] and X.shape == (len(rows), 128 + 256)
    np.testing.assert_allclose(X, cached, rtol=1e-5, atol=1e-5)
    assert t.get_feature_names_out()[0] == "layer2_0"
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths[:4]]
    np.testing.assert_allclose(t.transform(arrays), X[:4], rtol=1e-5, atol=1e-5)
    pipe = make_pipeline(
        CNNCodes("resnet18", weights="none", layers="layer3", image_size=32, precision="fp32"), LinearSVC()
    )
    scores = cross_val_score(pipe, paths, y, cv=3)
    assert scores.mean() > 0.5
    assert clone(pipe).get_params()["cnncodes__layers"] == "layer3"


def test_the_pixels_baseline_saves_and_predicts(tmp_path):
    """A classifier on the raw-pixels baseline (a module without tensors, weights `none` recorded)."""
    from conftest import cli

    data = make_images(tmp_path / "d", per_class=6)
    code, out, err = cli(
        "extract", "--model", "pixels", "--data", str(data), "--cache-dir", str(tmp_path / "c"), "-q"
    )
    assert code == 0, err
    codes = out.strip().splitlines()[-1]
    code, _, err = cli("fit", codes, "--out", str(tmp_path / "m" / "px"), "-q")
    assert code == 0, err
    code, out, err = cli("predict", str(tmp_path / "m" / "px"), str(data / "cat"), "--json")
    assert code == 0, err
    assert {p["class"] for p in json.loads(out)} <= {"cat", "dog", "owl"}
