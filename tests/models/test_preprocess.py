import numpy as np
import pytest
import torch
from PIL import Image

from featx.errors import UsageError
from featx.models.build import load_model, weights_preprocess
from featx.models.preprocess import Preprocess
from featx.models.spec import parse_model_name
from featx.models.weights import resolve_weights


@pytest.fixture
def photo():
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (150, 211, 3), dtype=np.uint8))


def _ours(pre: Preprocess, img) -> torch.Tensor:
    return pre.normalize(pre.to_uint8(img).unsqueeze(0))[0]


@pytest.mark.parametrize(
    "arch,weights", [("resnet50", "IMAGENET1K_V2"), ("resnet50", "IMAGENET1K_V1"), ("vit_b_16", "DEFAULT")]
)
def test_matches_torchvision_weight_transforms(photo, arch, weights):
    import torchvision

    enum = torchvision.models.get_model_weights(arch)[weights if weights != "DEFAULT" else "DEFAULT"]
    model = parse_model_name(arch)
    pre = weights_preprocess(model, resolve_weights(model, weights))
    ref = enum.transforms()(photo)
    assert torch.allclose(_ours(pre, photo), ref, atol=1e-6)


def test_matches_timm_transform(photo):
    import timm

    m = timm.create_model("resnet18", pretrained=False)
    ref = timm.data.create_transform(**timm.data.resolve_model_data_config(m))(photo)
    pre = load_model("timm:resnet18", "none").preprocess
    assert torch.allclose(_ours(pre, photo), ref, atol=1e-6)


def test_image_size_override_keeps_crop_fraction():
    pre = Preprocess(224, 256).with_overrides(image_size=112)
    assert (pre.crop_size, pre.resize_size) == (112, 128)
    pre = Preprocess(224, 256).with_overrides(crop_pct=1.0)
    assert (pre.crop_size, pre.resize_size) == (224, 224)
    with pytest.raises(UsageError, match="--image-size"):
        Preprocess(224, 256).with_overrides(image_size=2)


def test_squash_resizes_both_sides(photo):
    pre = Preprocess(32, 32, crop_mode="squash")
    out = pre.to_uint8(photo)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    # squash keeps the whole width: the left edge column comes from the image's left edge
    centre = Preprocess(32, 32).to_uint8(photo)
    assert not torch.equal(out, centre)


def test_round_trip_dict():
    pre = Preprocess(100, 120, "bicubic", (0.5, 0.5, 0.5), (0.25, 0.5, 0.5))
    assert Preprocess.from_dict(pre.to_dict()) == pre
    assert "center crop 100" in str(pre)
