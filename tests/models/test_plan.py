"""featx.models.plan and featx.settings: one resolver, validated settings, and cache keys pinned to the
values featx computed before the refactor (so existing cache entries stay hits)."""

from __future__ import annotations

import pytest

from featx.errors import UsageError
from featx.models.plan import request_key, resolve
from featx.settings import CodeSettings, ModelSettings, RunSettings

FINGERPRINT = "fixed-dataset-fingerprint"

# (model settings, code settings, precision, decoder) -> the cache key the pre-refactor
# `extraction._plan` computed for them (on the CPU, with the dataset fingerprint above)
PINNED = [
    (
        ("resnet18", "none", 32, None),
        ("layer2,layer4", "avg", "auto", "float32"),
        "fp32",
        "pil",
        "295b773496ef7f94a7fde60c4b471c940b37522040298fa7520ac7a9399030d3",
    ),
    (
        ("resnet18", "none", 48, 0.875),
        ("depth:0.5,1.0", "avg2x2", "off", "float16"),
        "bf16",
        "pil",
        "8ad07a93fed12c4663496275f6cec8d35b8065e6738ce330db6afeb0b0441ae2",
    ),
    (
        ("pixels", "none", 28, None),
        ("pixels", "none", "auto", "float32"),
        "fp32",
        "pil",
        "fbaaa84e640b950b151f64e5be2ca181f7bf44efc3621f6e94f4220f6ba8ae97",
    ),
    (
        ("resnet18", "none", 32, None),
        ("layer3", "max", "on", "float32"),
        "fp32",
        "torchvision",
        "8abdda2f85d712a39a2130f5b188a697eb88d37ec19ed5d27025e43468461afd",
    ),
]


@pytest.mark.parametrize("model,codes,precision,decoder,key", PINNED)
def test_cache_keys_are_unchanged(model, codes, precision, decoder, key):
    plan = resolve(ModelSettings(*model), CodeSettings(*codes))
    assert plan.cache_key(precision, decoder, FINGERPRINT) == key


def test_request_keys_are_unchanged():
    """The request memo's key, with the library versions fixed (they are part of it)."""
    from featx import __version__

    libs = {"torch": "x", "featx": __version__}
    m, c = ModelSettings("resnet18", "none", 32), CodeSettings("layer2,layer4")
    assert request_key(m, c, "fp32", "auto", FINGERPRINT, libs) == (
        "3174f28d2b2c1fd5eb4371a02d8ac5772ffe47fac16871ae9d96aa45db206ba9"
    )
    m, c = (
        ModelSettings("resnet18", "none", 48, 0.875),
        CodeSettings("depth:0.5,1.0", "avg2x2", "off", "float16"),
    )
    assert request_key(m, c, "auto", "auto", FINGERPRINT, libs) == (
        "d91d91ffe4fe20815611a1f2481608740d65170c92a5e08bb3c139c0006e7574"
    )


def test_plan_resolves_depths_and_activations():
    plan = resolve(ModelSettings("resnet18", "none", 32), CodeSettings(["depth:1.0", "layer2"], relu="off"))
    assert plan.layers == ("layer2", "avgpool") and plan.resolved == {"depth:1.0": "avgpool"}
    assert plan.activations == {"layer2": "none", "avgpool": "none"} and plan.dims == [128, 512]
    assert resolve("resnet18", "layer3").activations == {"layer3": "relu"}  # strings are shorthands


def test_plan_round_trips_through_metadata():
    from featx.models.build import build_module
    from featx.models.plan import Plan
    from featx.models.spec import parse_model_name

    plan = resolve(ModelSettings("resnet18", "none", 40, 0.8), CodeSettings("layer1,layer3", "avg2x2"))
    again = Plan.from_meta(plan.to_meta(), build_module(parse_model_name("resnet18")))
    assert again.to_meta() == plan.to_meta() and again.dims == plan.dims


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: ModelSettings(""), "--model"),
        (lambda: ModelSettings("resnet18", image_size=0), "--image-size"),
        (lambda: ModelSettings("resnet18", crop_pct=1.5), "--crop-pct"),
        (lambda: CodeSettings(pool="sum"), "--pool"),
        (lambda: CodeSettings(relu="yes"), "relu="),
        (lambda: CodeSettings(dtype="int8"), "--dtype"),
        (lambda: RunSettings(precision="fp8"), "--precision"),
        (lambda: RunSettings(precision="FP32"), "--precision"),
        (lambda: RunSettings(device="tpu"), "--device"),
        (lambda: RunSettings(batch_size=0), "--batch-size"),
        (lambda: RunSettings(workers=-1), "--workers"),
        (lambda: RunSettings(decoder="opencv"), "--decoder"),
        (lambda: RunSettings(channels_last="yes"), "--channels-last"),
    ],
)
def test_bad_settings_fail_at_construction_naming_the_field(make, field):
    with pytest.raises(UsageError) as e:
        make()
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


def test_extract_rejects_unknown_precision_and_relu(image_folder, cache_dir):
    from featx.engine.extract import extract

    for kw in (dict(precision="float64"), dict(relu="maybe")):
        with pytest.raises(UsageError):
            extract("resnet18", str(image_folder), "layer2", cache_dir=str(cache_dir), weights="none", **kw)
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        extract("resnet18", str(image_folder), "layer2", cache_dir=str(cache_dir), colour="red")


def test_a_weights_file_is_hashed_once_while_unchanged(tmp_path, monkeypatch):
    import os

    import torch

    import featx.models.weights as fm
    from featx.models.build import build_module
    from featx.models.plan import weights_request
    from featx.models.spec import parse_model_name

    ckpt = tmp_path / "w.pth"
    module = build_module(parse_model_name("resnet18"))
    torch.save(module.state_dict(), ckpt)
    calls, orig = [], fm.file_sha256
    monkeypatch.setattr(fm, "file_sha256", lambda p: calls.append(p) or orig(p))
    first = resolve(ModelSettings("resnet18", str(ckpt), 32), "layer2")
    assert weights_request(str(ckpt)) == first.weights.ident
    resolve(ModelSettings("resnet18", str(ckpt), 32), "layer3")
    assert len(calls) == 1
    with torch.no_grad():
        module.fc.bias.add_(1.0)
    torch.save(module.state_dict(), ckpt)
    os.utime(ckpt, ns=(1, 1))  # another mtime, whatever the clock's resolution
    assert resolve(ModelSettings("resnet18", str(ckpt), 32), "layer2").weights.ident != first.weights.ident
