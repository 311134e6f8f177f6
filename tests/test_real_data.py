"""Bars on real data: the offline ImageNet EfficientNet-Lite0 on Fashion-MNIST (Debian package)."""

import os

import pytest

from featx.classifiers.fit import fit
from featx.classifiers.protocol import protocol_for
from featx.engine.extract import extract
from featx.settings import DataOptions

FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def fashion():
    if not os.path.isdir(FASHION):
        if os.environ.get("CI"):
            pytest.fail(f"{FASHION} is missing: CI must install Debian's dataset-fashion-mnist (see README)")
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    return FASHION


def test_lite0_codes_beat_raw_pixels_on_fashion_mnist(fashion, tmp_path):
    """2,000 training and 1,000 test images at 112 px: the best layer's softmax (chosen on
    validation data) beats logistic regression on the raw pixels of the same 2,000 images."""
    opts = DataOptions(per_class_limit={"train": 200, "test": 100})
    cache = str(tmp_path)
    codes = extract(
        "efficientnet_lite0",
        fashion,
        "depth:0.25,0.55,0.85,1.0",
        weights="imagenet",
        image_size=112,
        data_options=opts,
        cache_dir=cache,
    )
    pixels = extract(
        "pixels", fashion, "pixels", pool="none", image_size=28, data_options=opts, cache_dir=cache
    )
    assert codes.rows == pixels.rows == 3000
    cnn = fit(codes.path, None, protocol_for("softmax"), jobs=2)
    raw = fit(pixels.path, None, protocol_for("softmax", Cs=(0.01, 0.1, 1.0)))
    best = next(s for s in cnn.summary() if s["layer"] == cnn.best)
    assert cnn.results[0]["train_size"] == raw.results[0]["train_size"] == 2000
    assert cnn.results[0]["n_test"] == 1000
    assert best["accuracy"] > raw.summary()[0]["accuracy"] + 0.03, (best, raw.summary())
    again = fit(codes.path, cnn.best, protocol_for("softmax"))  # the same protocol twice: the same numbers
    assert again.results[0]["accuracy"] == best["accuracy"] and again.results[0]["C"] == best["C"]
