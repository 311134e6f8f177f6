"""Token maps of ViT-style models: --pool cls / mean / cls+mean against timm's own forward_intermediates,
prefix tokens in `featx layers`, no ReLU for GELU networks, and one-line errors elsewhere."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST_ARGS, assert_one_line_error, cli, make_images
from featx.engine.extract import extract
from featx.errors import UsageError
from featx.models.plan import resolve
from featx.models.taps import activation_for
from featx.settings import CodeSettings, Pool, parse_pool
from featx.store.codes import open_codes

VIT = "timm:vit_tiny_patch16_224"  # random init; timm builds it for 224 px only
# 224 x 224 PNGs at crop 224 / resize 224: the model sees the file's pixels exactly, so the reference
# needs no resize of its own
VIT_RUN = dict(
    weights="none", image_size=224, crop_pct=1.0, workers=0, batch_size=2, precision="fp32", decoder="pil"
)
BLOCKS = (3, 11)


def test_pool_parsing_and_token_map_pooling():
    assert parse_pool("mean") == Pool("avg") and str(parse_pool("mean")) == "avg"  # one cache entry for both
    assert parse_pool("CLS") == Pool("cls") and str(parse_pool("cls+mean")) == "cls+mean"
    for bad in ("cls+max", "mean2x2", "token"):
        with pytest.raises(UsageError, match="--pool"):
            parse_pool(bad)
    assert Pool("cls").dim((198, 8)) == 8 and Pool("cls+mean").dim((198, 8)) == 16
    x = torch.randn(3, 7, 5)  # [N, T, D]: 2 prefix tokens, 5 patch tokens
    patches = x[:, 2:]
    torch.testing.assert_close(Pool("cls").apply(x, 2), x[:, 0])
    torch.testing.assert_close(Pool("avg").apply(x, 2), patches.mean(1))
    torch.testing.assert_close(Pool("max").apply(x, 2), patches.amax(1))
    torch.testing.assert_close(Pool("cls+mean").apply(x, 2), torch.cat([x[:, 0], patches.mean(1)], 1))
    torch.testing.assert_close(Pool("none").apply(x, 2), x.flatten(1))
    torch.testing.assert_close(Pool("avg").apply(x), x.mean(1))  # no prefix tokens: every token


def _taps(model):
    return {t.name: t for t in resolve(model, default_may_be_none=True).taps}


def test_vit_taps_count_prefix_tokens_and_gelu_means_no_relu():
    t = _taps(VIT)
    embed = t["patch_embed"]  # before the class token joins
    assert embed.shape == (196, 192) and embed.prefix_tokens == 0 and not embed.class_token
    for name in ("blocks.0", "blocks.11", "norm", "blocks.0.attn.qkv"):
        assert t[name].tokens and t[name].prefix_tokens == 1 and t[name].class_token, name
    assert t["norm"].shape == (197, 192) and not t["fc_norm"].tokens
    # GELU is no ReLU: relu=auto leaves every tap raw, also where GELU comes next or just ran
    assert t["blocks.0.mlp.fc1"].next_act == "gelu" and t["blocks.0.mlp.act"].post_act == "gelu"
    assert {activation_for(tap) for tap in t.values()} == {"none"}
    assert activation_for(t["blocks.0.mlp.act"], "on") == "relu"  # forcing stays possible
    # DeiT's distillation token: two prefix tokens, the class token first
    d = _taps("timm:deit_tiny_distilled_patch16_224")
    block = d["blocks.5"]
    assert block.shape == (198, 192) and block.prefix_tokens == 2 and block.class_token


def test_cache_keys_of_token_maps():
    """avg/max of a token map now skip its class token: such keys differ from what a plan without
    prefix tokens (every featx before) computed; cls/none keys and keys without token maps do not."""

    def keys(layers, pool):
        plan = resolve(VIT, CodeSettings(layers, pool=pool))
        taps = tuple(dataclasses.replace(t, prefix_tokens=0, class_token=False) for t in plan.taps)
        old = dataclasses.replace(plan, taps=taps)
        return plan.cache_key("fp32", "pil", "d"), old.cache_key("fp32", "pil", "d")

    for pool in ("avg", "max"):
        new, old = keys("blocks.5,norm", pool)
        assert new != old, pool
    for layers, pool in (("blocks.5", "none"), ("patch_embed,fc_norm", "avg")):
        new, old = keys(layers, pool)
        assert new == old, (layers, pool)
    assert keys("norm", "mean") == keys("norm", "avg")


@pytest.fixture(scope="module")
def vit_data(tmp_path_factory):
    """4 PNG images of 224 x 224 and their reference tokens at BLOCKS from timm's forward_intermediates:
    {file name: (prefix [B, 1, D], patches [B, 196, D])}."""
    from featx.models.build import load_model

    root = make_images(
        tmp_path_factory.mktemp("vit") / "data", classes=("a", "b"), per_class=2, size=(224, 224), ext=".png"
    )
    files = sorted(root.rglob("*.png"))
    pixels = [np.array(Image.open(p).convert("RGB")) for p in files]
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)
    x = (x.float() / 255 - 0.5) / 0.5  # the architecture's normalization (mean = std = 0.5)
    model = load_model(VIT, "none").module.eval()
    with torch.no_grad():
        out = model.forward_intermediates(
            x, indices=list(BLOCKS), return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
        )
    ref = {i: (prefix.numpy(), spatial.numpy()) for i, (spatial, prefix) in zip(BLOCKS, out)}
    return root, [p.name for p in files], ref


@pytest.mark.parametrize("pool", ["cls", "mean", "cls+mean", "max"])
def test_vit_codes_equal_forward_intermediates(vit_data, tmp_path, pool):
    root, names, ref = vit_data
    layers = ",".join(f"blocks.{i}" for i in BLOCKS)
    res = extract(VIT, str(root), layers, pool=pool, cache_dir=str(tmp_path), **VIT_RUN)
    with open_codes(res.path) as f:
        pre = json.loads(f.attrs["preprocessing"])
        assert (pre["crop_size"], pre["resize_size"]) == (224, 224) and pre["mean"] == pre["std"] == [0.5] * 3
        rows = [names.index(p.rsplit("/", 1)[-1]) for p in f.paths]
        for i in BLOCKS:
            prefix, patches = (a[rows] for a in ref[i])
            cls, mean = prefix[:, 0], patches.mean(1)
            both = np.concatenate([cls, mean], 1)
            want = {"cls": cls, "mean": mean, "cls+mean": both, "max": patches.max(1)}
            got = f.codes(f"blocks.{i}")
            assert f.layer_attrs(f"blocks.{i}")["activation"] == "none"
            np.testing.assert_allclose(got, want[pool], rtol=1e-4, atol=1e-4, err_msg=f"blocks.{i} {pool}")
    if pool == "mean":  # avg is the same code, so the same cache entry
        assert extract(VIT, str(root), layers, pool="avg", cache_dir=str(tmp_path), **VIT_RUN).hit


def test_layers_shows_token_maps():
    rc, out, err = cli("layers", VIT, "--weights", "none")
    assert rc == 0, err
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert "1+196 tok x 192" in rows["blocks.11"] and "196 tok x 192" in rows["patch_embed"]
    assert "output (tokens x D)" in out and "no code is ReLU'd by default" in out
    assert rows["blocks.11"].split()[-2:] == ["no", "192"]  # relu'd, dim (avg)
    rc, out, err = cli("layers", VIT, "--weights", "none", "--json", "--pool", "cls+mean")
    assert rc == 0, err
    by = {t["name"]: t for t in json.loads(out)["layers"]}
    assert by["blocks.11"]["prefix_tokens"] == 1 and by["blocks.11"]["class_token"]
    assert by["blocks.11"]["patch_tokens"] == 196 and by["blocks.11"]["code_dim"] == 384
    assert by["patch_embed"]["code_dim"] is None and by["fc_norm"]["code_dim"] is None  # no class token there
    assert not any(t["relu_by_default"] for t in by.values())


def test_layers_of_a_cnn_unchanged_by_tokens():
    rc, out, err = cli("layers", "resnet18", "--weights", "none")
    assert rc == 0, err
    assert "output (C,H,W)" in out and "tok" not in out and "no ReLU" not in out


def test_pool_cls_without_class_token_is_one_line(image_folder, tmp_path):
    argv = ["extract", *FAST_ARGS, "--data", image_folder, "--cache-dir", tmp_path, "--pool", "cls"]
    rc, _out, err = cli(*argv)
    assert_one_line_error(rc, err, code=2, needles=["--pool cls", "layer avgpool", "[512, 1, 1]", "use avg"])
    with pytest.raises(UsageError, match=r"patch_embed have no class token \(all are patch tokens\)"):
        resolve(VIT, CodeSettings("patch_embed", pool="cls+mean"))
