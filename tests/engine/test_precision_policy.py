"""One meaning of precision='auto' per device: extract, Predictor and CNNCodes compute the same
codes for the same settings (bf16 decided by the autotune, forced here so it holds on any CPU)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_images
from featx.classifiers.fit import fit
from featx.classifiers.io import save_classifier
from featx.classifiers.predict import Predictor, classifier_meta
from featx.classifiers.protocol import protocol_for
from featx.classifiers.transformer import CNNCodes
from featx.engine.extract import extract
from featx.errors import UsageError
from featx.store.codes import open_codes

SETTINGS = dict(weights="none", image_size=32, workers=0, batch_size=4, device="cpu")


def test_extract_predict_and_cnncodes_give_identical_codes(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_AUTOTUNE", "bf16")  # what `auto` decides here, whatever the CPU
    data = make_images(tmp_path / "data", per_class=4, splits=("train", "test"), size=(36, 36))
    res = extract(
        "resnet18", str(data), "layer3", cache_dir=str(tmp_path / "cache"), precision="auto", **SETTINGS
    )
    with open_codes(res.path) as f:
        assert f.attrs["precision"] == "bf16"
        paths = [os.path.join(data, p) for p in f.paths]
        cached = f.codes("layer3")
    report = fit(res.path, "layer3", protocol_for("softmax"), return_models=True)
    clf = tmp_path / "clf" / "m.joblib"
    save_classifier(str(clf), report.models["layer3"], classifier_meta(res.path, ["layer3"]))

    monkeypatch.delenv("FEATX_AUTOTUNE")  # the classifier's recorded precision rules, not the autotune
    predictor = Predictor(str(clf), device="cpu")
    try:
        images = [predictor.preprocess.to_uint8(Image.open(p).convert("RGB")) for p in paths]
        from_predict = np.vstack(
            [predictor.codes(torch.stack(images[i : i + 4])) for i in range(0, len(images), 4)]
        )
    finally:
        predictor.close()
    np.testing.assert_array_equal(from_predict, cached)

    monkeypatch.setenv("FEATX_AUTOTUNE", "bf16")
    t = CNNCodes("resnet18", weights="none", layers="layer3", image_size=32, batch_size=4, precision="auto")
    np.testing.assert_array_equal(t.fit(paths).transform(paths), cached)
    fp32 = CNNCodes(
        "resnet18", weights="none", layers="layer3", image_size=32, batch_size=4, precision="fp32"
    )
    assert not np.array_equal(fp32.fit(paths).transform(paths), cached)  # the test can tell precisions apart


@pytest.mark.parametrize(
    "param,value,field",
    [
        ("precision", "fp64", "--precision"),
        ("relu", "yes", "relu="),
        ("pool", "sum", "--pool"),
        ("device", "tpu", "--device"),
    ],
)
def test_cnncodes_rejects_unknown_values(param, value, field):
    t = CNNCodes("resnet18", weights="none", layers="layer3", image_size=32, **{param: value})
    with pytest.raises(UsageError, match=field):
        t.fit(None)


def test_cnncodes_defaults_are_extracts():
    """CNNCodes' defaults are the settings objects' (what `featx extract` uses when not told)."""
    import inspect

    from featx.settings import CodeSettings, ModelSettings, RunSettings

    defaults = {k: p.default for k, p in inspect.signature(CNNCodes).parameters.items() if k != "model"}
    objects = (ModelSettings("x"), CodeSettings(), RunSettings())
    expected = {k: getattr(o, k) for o in objects for k in defaults if hasattr(o, k)}
    assert expected.keys() == defaults.keys()
    assert defaults == expected
