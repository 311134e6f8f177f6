"""`featx fit` results carry the cost fields (featx.engine.cost.COST_FIELDS): the classifier's own
parameters, the backbone's up to the layer, the fit's seconds and the forward to the layer timed here;
in --results, --json, the table and the saved classifier's description."""

import json

import numpy as np

from conftest import FAST, cli, write_codes
from featx.engine.cost import COST_FIELDS, count_params


def _entry(image_folder, cache_dir):
    from featx.engine.extract import extract

    return extract(
        "resnet18",
        str(image_folder),
        "layer1,layer3,avgpool",
        cache_dir=str(cache_dir),
        progress=False,
        **FAST,
    ).path


def test_fit_results_and_saved_classifier_carry_the_cost_fields(image_folder, cache_dir, tmp_path):
    from featx.classifiers.io import read_description
    from featx.models.build import build_module
    from featx.models.spec import parse_model_name

    path = _entry(image_folder, cache_dir)
    results = tmp_path / "r.json"
    rc, out, err = cli("fit", path, "--C", "0.1,1", "--out", tmp_path / "clf", "--results", results)
    assert rc == 0, err
    data = json.loads(results.read_text())
    by_layer = {r["layer"]: r for r in data["results"]}
    full = count_params(build_module(parse_model_name("resnet18")))
    for r in by_layer.values():
        assert set(COST_FIELDS) <= set(r), r
        assert r["method"] == "probe" and r["classifier"] == "softmax"
        assert r["trainable_params"] == (r["dim"] + 1) * 3  # 3 classes: weights and biases
        assert r["trainable_params"] < r["total_params"] < full + r["trainable_params"]
        assert r["train_seconds"] == r["fit_seconds"]
        assert r["inference_ms_per_image"] > 0 and r["inference_batch_size"] == 4  # the extraction's batch
    # the backbone up to avgpool is all of resnet18 but its fc head (512 x 1000 + 1000)
    assert by_layer["avgpool"]["total_params"] - by_layer["avgpool"]["trainable_params"] == full - 513_000
    assert by_layer["layer1"]["total_params"] < by_layer["layer3"]["total_params"]
    assert data["cost_notes"] == []
    saved = read_description(str(tmp_path / "clf.safetensors"))
    assert {r["layer"]: r["total_params"] for r in saved["results"]["results"]} == {
        k: r["total_params"] for k, r in by_layer.items()
    }
    header = next(line for line in out.splitlines() if line.startswith("layer "))
    assert "params" in header and "ms/img" in header
    assert "forward to the layer on this device at batch 4" in out


def test_knn_trains_no_parameters(image_folder, cache_dir):
    path = _entry(image_folder, cache_dir)
    rc, out, err = cli("fit", path, "--classifier", "knn", "--knn-k", "3", "--layer", "layer1", "--json")
    assert rc == 0, err
    (r,) = json.loads(out)["results"]
    assert r["method"] == "probe" and r["trainable_params"] == 0
    assert r["total_params"] > 0 and r["inference_ms_per_image"] > 0
    rc, out, err = cli("fit", path, "--layer", "layer1", "--no-timing", "--json")  # counted, not timed
    (untimed,) = json.loads(out)["results"]
    assert rc == 0 and untimed["total_params"] > 0 and untimed["inference_ms_per_image"] is None, err


def test_layers_the_architecture_does_not_have_leave_the_cost_empty(tmp_path):
    """A codes file whose layers are no modules of its model: the fit works, its backbone cost is
    empty (None, '–' in the table) and the reason is said."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    X = rng.normal(size=(40, 8)) + y[:, None]
    path = write_codes(tmp_path / "c.h5", {"made_up": X}, y, ["train"] * 30 + ["test"] * 10, ["a", "b"])
    rc, out, err = cli("fit", path, "--C", "1", "--results", tmp_path / "r.json")
    assert rc == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    (r,) = data["results"]
    assert r["trainable_params"] == 9 and r["total_params"] is None and r["inference_ms_per_image"] is None
    assert data["cost_notes"] == ["made_up: not a module of resnet18"]
    assert "made_up: not a module of resnet18" in out
    row = next(line for line in out.splitlines() if line.startswith("made_up"))
    assert row.split()[-2:] == ["–", "–"]
