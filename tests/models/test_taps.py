import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from featx.errors import UsageError
from featx.models.build import build_module, load_model
from featx.models.spec import parse_model_name
from featx.models.taps import Tapper, activation_for, list_taps, resolve_layers
from featx.settings import Pool, parse_pool


@pytest.fixture(scope="module")
def resnet_taps():
    return {t.name: t for t in list_taps(build_module(parse_model_name("resnet50"), device="meta"), 224)}


def test_resnet_shapes_strides_and_activations(resnet_taps):
    t = resnet_taps
    assert t["layer3"].shape == (1024, 14, 14) and t["layer3"].stride == 16
    assert t["layer4"].shape == (2048, 7, 7) and t["layer4"].stride == 32
    assert t["fc"].shape == (1000,) and t["fc"].stride is None
    assert t["layer2"].post_act == "relu" and t["avgpool"].post_act == "relu"  # pooling keeps post-ReLU
    assert t["bn1"].post_act is None and t["bn1"].next_act == "relu"
    assert t["conv1"].post_act is None and t["conv1"].next_act is None  # bn1 comes next, not a ReLU
    assert t["fc"].post_act is None
    assert t["layer1.0.relu"].calls == 3  # the shared ReLU of a bottleneck
    assert t["avgpool"].depth == 1.0 and t["fc"].depth > 1.0
    assert [n for n in t if t[n].trunk][:6] == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer1.0"]


def test_depth_fractions_resolve_to_named_layers(resnet_taps):
    names, how = resolve_layers(list(resnet_taps.values()), "depth:0.25,0.5,1.0", "resnet50")
    assert how["depth:1.0"] == "avgpool"
    assert names == sorted(names, key=lambda n: resnet_taps[n].order)
    assert all(resnet_taps[n].candidate for n in names)
    names, _ = resolve_layers(list(resnet_taps.values()), "layer4,depth:1.0,layer2", "resnet50")
    assert names == ["layer2", "layer4", "avgpool"]


def test_unknown_layer_names_close_matches(resnet_taps):
    with pytest.raises(UsageError, match=r"unknown layer 'layer5'.*closest:.*layer4"):
        resolve_layers(list(resnet_taps.values()), "layer2,layer5", "resnet50")
    with pytest.raises(UsageError, match=r"depth fractions"):
        resolve_layers(list(resnet_taps.values()), "depth:1.5", "resnet50")
    with pytest.raises(UsageError, match="empty"):
        resolve_layers(list(resnet_taps.values()), " , ", "resnet50")


def test_relu_policy():
    taps = {t.name: t for t in list_taps(build_module(parse_model_name("vgg11"), device="meta"), 64)}
    assert activation_for(taps["features.0"]) == "relu"  # conv followed by the network's ReLU
    assert activation_for(taps["classifier.0"]) == "relu"  # fc6, as in DeCAF
    assert activation_for(taps["classifier.6"]) == "none"  # logits
    assert activation_for(taps["classifier.6"], "on") == "relu"
    assert activation_for(taps["features.0"], "off") == "none"
    lite = {
        t.name: t for t in list_taps(build_module(parse_model_name("efficientnet_lite0"), device="meta"), 64)
    }
    assert lite["bn1"].post_act == "relu6"
    assert activation_for(lite["conv_stem"]) == "none"  # BatchNormAct comes next, not a bare activation
    assert activation_for(lite["blocks.3"]) == "none"  # linear bottleneck output: raw
    silu = {
        t.name: t for t in list_taps(build_module(parse_model_name("efficientnet_b0"), device="meta"), 64)
    }
    assert silu["avgpool"].post_act == "silu" and activation_for(silu["avgpool"]) == "none"


def test_functional_relu_is_detected():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            x = F.relu(self.conv(x), inplace=True)
            return self.head(x.mean((2, 3)))

    taps = {t.name: t for t in list_taps(Net(), 16, device="cpu")}
    assert taps["conv"].next_act == "relu" and taps["conv"].post_act is None


def test_pool_parsing_and_dims():
    assert parse_pool("avg2x2") == Pool("grid", 2)
    assert Pool("grid", 2).dim((64, 7, 7)) == 256
    assert Pool("none").dim((64, 7, 7)) == 64 * 49
    assert Pool("avg").dim((197, 192)) == 192 and Pool("max").dim((512,)) == 512
    for bad in ("median", "avg2x3", "avg0x0", ""):  # "mean" is avg since token maps (test_tokens.py)
        with pytest.raises(UsageError, match="--pool"):
            parse_pool(bad)


def test_tapper_matches_hooks_and_survives_inplace_relu():
    """VGG's ReLUs are in-place: a tapped conv output must keep its negative values."""
    model = load_model("vgg11", "none", image_size=32).module
    taps = {t.name: t for t in list_taps(model, 32, device="cpu")}
    chosen = [taps["features.0"], taps["features.3"], taps["classifier.0"]]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), Tapper(model, chosen, {c.name: "none" for c in chosen}, Pool("none")) as tap:
        raw = tap(x)
    assert (raw["features.0"] < 0).any()
    with torch.no_grad():
        ref = model.features[0](x)
    assert torch.equal(raw["features.0"], ref.flatten(1))


def test_tapper_stops_after_the_last_tap():
    model = load_model("resnet18", "none", image_size=32).module
    taps = {t.name: t for t in list_taps(model, 32, device="cpu")}
    fired = []
    h = model.fc.register_forward_hook(lambda *a: fired.append(1))
    with torch.no_grad(), Tapper(model, [taps["layer2"]], {"layer2": "relu"}, Pool("avg")) as tap:
        out = tap(torch.randn(2, 3, 32, 32))
    h.remove()
    assert out["layer2"].shape == (2, 128) and not fired


def test_every_unknown_layer_is_named_at_once():
    from featx.models.build import load_model

    taps = list_taps(load_model("resnet18", "none").module, 32, device="cpu")
    with pytest.raises(
        UsageError, match=r"unknown layers for resnet18: 'layr3' \(closest: layer3.*'fcc' \(closest: fc"
    ):
        resolve_layers(taps, "layr3,layer2,fcc", "resnet18")
