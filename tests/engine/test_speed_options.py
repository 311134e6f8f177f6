"""Options that trade speed: the device-side decoder, precision (measured auto), torch.compile.
They run on the CPU here; on a GPU the same code paths run with device='cuda'."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, make_images
from featx.engine.autotune import choose_precision
from featx.engine.extract import extract
from featx.models.spec import parse_model_name
from featx.store.codes import open_codes


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """JPEGs of several sizes, a PNG, a grayscale JPEG and a broken JPEG."""
    root = make_images(tmp_path_factory.mktemp("dec") / "mixed", per_class=4, size=(60, 44))
    Image.new("RGB", (50, 70), (10, 200, 30)).save(root / "cat" / "png_one.png")
    Image.new("L", (64, 64), 120).save(root / "dog" / "gray.jpg")
    (root / "owl" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    return root


def _codes(path, layer):
    with open_codes(path) as f:
        return f.paths, f.codes(layer), f.skipped


def test_torchvision_decoder_matches_pil_within_resize_tolerance(mixed, tmp_path):
    a = extract("resnet18", str(mixed), "layer2,avgpool", cache_dir=str(tmp_path), **FAST)
    b = extract(
        "resnet18", str(mixed), "layer2,avgpool", cache_dir=str(tmp_path), decoder="torchvision", **FAST
    )
    assert a.path != b.path  # other pixels, another entry
    pa, ca, sa = _codes(a.path, "avgpool")
    pb, cb, sb = _codes(b.path, "avgpool")
    assert pa == pb and [p for p, _ in sa] == [p for p, _ in sb] == ["owl/broken.jpg"]
    rel = np.linalg.norm(ca - cb, axis=1) / np.linalg.norm(ca, axis=1)
    assert rel.max() < 0.05, rel.max()  # antialiasing kernels differ slightly; the same images
    with open_codes(b.path) as f:
        assert f.attrs["decoder"] == "torchvision"


def test_bf16_codes_agree_with_fp32_within_bf16_tolerance(image_folder, tmp_path):
    kw = {**FAST, "precision": "fp32"}
    a = extract("resnet18", str(image_folder), "layer3,avgpool", cache_dir=str(tmp_path), **kw)
    b = extract(
        "resnet18",
        str(image_folder),
        "layer3,avgpool",
        cache_dir=str(tmp_path),
        **{**kw, "precision": "bf16"},
    )
    assert a.path != b.path
    for layer in ("layer3", "avgpool"):
        _, ca, _ = _codes(a.path, layer)
        _, cb, _ = _codes(b.path, layer)
        rel = np.linalg.norm(ca - cb) / np.linalg.norm(ca)
        assert rel < 2e-2, (layer, rel)  # bf16 keeps 8 bits of mantissa: ~1e-2 relative through a network


def test_auto_precision_is_measured_once_and_stable(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("FEATX_AUTOTUNE")  # measure for real: either outcome is right on some CPU
    model = parse_model_name("resnet18")
    first = choose_precision(model, torch.device("cpu"), 48)
    assert first in ("fp32", "bf16")
    store = json.loads((tmp_path / "featx" / "autotune.json").read_text())
    assert list(store.values()) == [first]
    assert choose_precision(model, torch.device("cpu"), 48) == first
    assert choose_precision(parse_model_name("pixels"), torch.device("cpu"), 48) == "fp32"


@pytest.mark.slow
def test_compiled_forward_gives_the_same_codes(image_folder, tmp_path):
    a = extract("resnet18", str(image_folder), "layer2,avgpool", cache_dir=str(tmp_path / "a"), **FAST)
    b = extract(
        "resnet18", str(image_folder), "layer2,avgpool", cache_dir=str(tmp_path / "b"), compile=True, **FAST
    )
    assert os.path.basename(a.path) == os.path.basename(b.path)  # compile does not change the entry
    for layer in ("layer2", "avgpool"):
        np.testing.assert_allclose(_codes(a.path, layer)[1], _codes(b.path, layer)[1], rtol=1e-4, atol=1e-5)
    with open_codes(b.path) as f:
        assert bool(f.attrs["compile"])
