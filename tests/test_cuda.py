"""featx on a CUDA GPU against the CPU: codes at fp32 and bf16/fp16, decode_jpeg on the device,
the files that fall back or are skipped, the torch solver and a fine-tune step.

Every test is marked `cuda` and skipped where `torch.cuda.is_available()` is false. The bounds are
those of benchmarks/gpu_check.py (its docstring says why each is what it is), which runs the same
comparisons at full size: `python benchmarks/gpu_check.py --out results/gpu`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import featx
from conftest import make_images

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check as gc  # noqa: E402

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MODEL = dict(weights="none", workers=0, batch_size=8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Two classes of small JPEGs plus a PNG, a CMYK, a progressive, a truncated and a corrupt file."""
    root = make_images(
        tmp_path_factory.mktemp("cuda") / "imgs", classes=("a", "b"), per_class=6, size=(96, 72)
    )
    src = Image.open(next((root / "a").glob("*.jpg"))).convert("RGB")
    src.save(root / "a" / "x_png.png")
    src.convert("CMYK").save(root / "a" / "x_cmyk.jpg", quality=90)
    src.save(root / "a" / "x_progressive.jpg", quality=90, progressive=True)
    good = next((root / "b").glob("*.jpg")).read_bytes()
    (root / "a" / "x_truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "a" / "x_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    return root


def _codes(folder, device, cache, precision="fp32", decoder="pil", model="resnet18", size=64):
    return featx.extract(
        model,
        str(folder),
        "depth:0.5,1.0",
        device=device,
        precision=precision,
        decoder=decoder,
        image_size=size,
        cache_dir=str(cache),
        **MODEL,
    )


@pytest.fixture(scope="module")
def cpu_codes(folder, tmp_path_factory):
    return _codes(folder, "cpu", tmp_path_factory.mktemp("cpu-cache")).path


@pytest.mark.parametrize("model, size", [("resnet18", 64), ("timm:test_vit", 32)])
def test_fp32_codes_match_cpu(folder, tmp_path, model, size):
    ref = _codes(folder, "cpu", tmp_path / "cpu", model=model, size=size).path
    tf32 = gc.tf32_on()
    as_run = gc.compare_codes(ref, _codes(folder, "cuda", tmp_path / "as-run", model=model, size=size).path)
    assert gc.worst(as_run) <= (gc.TF32_TOL if tf32 else gc.FP32_TOL), as_run
    gc.set_tf32(False)
    try:
        strict = gc.compare_codes(
            ref, _codes(folder, "cuda", tmp_path / "no-tf32", model=model, size=size).path
        )
    finally:
        gc.set_tf32(tf32)
    assert gc.worst(strict) <= gc.FP32_TOL, strict


@pytest.mark.parametrize("precision, bound", [("bf16", gc.BF16_TOL), ("fp16", gc.FP16_TOL)])
def test_low_precision_codes_within_bound(folder, cpu_codes, tmp_path, precision, bound):
    cmp = gc.compare_codes(cpu_codes, _codes(folder, "cuda", tmp_path, precision=precision).path)
    assert gc.worst(cmp) <= bound, cmp


def test_gpu_decode_matches_cpu_decoder(folder):
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    warnings.simplefilter("ignore", DeprecationWarning)
    worst = []
    for path in sorted(folder.rglob("*.jpg")):
        if "x_" in path.name:
            continue  # the special files: test_fallback_files_as_on_cpu
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        cpu = decode_jpeg(data, mode=ImageReadMode.RGB)
        gpu = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda").cpu()
        assert gpu.shape == cpu.shape, path.name
        worst.append(float((gpu.int() - cpu.int()).abs().float().mean()))
    assert worst and max(worst) <= gc.PIXEL_MEAN_TOL, worst


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_fallback_files_as_on_cpu(folder, tmp_path, decoder):
    cpu = _codes(folder, "cpu", tmp_path / "cpu", decoder=decoder)
    gpu = _codes(folder, "cuda", tmp_path / "cuda", decoder=decoder)
    ids_cpu, _, skipped_cpu, _ = gc.read_codes(cpu.path)
    ids_gpu, _, skipped_gpu, _ = gc.read_codes(gpu.path)
    assert ids_gpu == ids_cpu
    assert [p for p, _ in skipped_gpu] == [p for p, _ in skipped_cpu]
    assert {"a/x_truncated.jpg", "a/x_corrupt.jpg"} <= {p for p, _ in skipped_cpu}
    assert {"a/x_png.png", "a/x_progressive.jpg"} <= set(ids_gpu)


def test_torch_solver_cuda_matches_cpu(tmp_path):
    from featx.classifiers.torch_softmax import TorchSoftmax

    X, y = gc.blobs(3000, 64, 4, seed=3)
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    for C in (0.01, 1.0):
        cpu = TorchSoftmax(C=C, max_iter=1000, device="cpu").fit(X, y)
        gpu = TorchSoftmax(C=C, max_iter=1000, device="cuda").fit(X, y)
        a = gc.softmax_objective(X, y, cpu.coef_, cpu.intercept_, C)
        b = gc.softmax_objective(X, y, gpu.coef_, gpu.intercept_, C)
        assert abs(a - b) / abs(a) <= gc.SOLVER_OBJ_TOL
        assert np.mean(cpu.predict(X) == gpu.predict(X)) >= gc.AGREE_MIN
    path = gc.write_codes(str(tmp_path / "codes.h5"), *gc.blobs(2000, 32, 3, seed=4))
    res = {
        d: featx.fit(path, ["L"], featx.Protocol(Cs=gc.SOLVER_CS, solver="torch", device=d)).results[0]
        for d in ("cpu", "cuda")
    }
    assert res["cuda"]["C"] == res["cpu"]["C"]
    assert 100 * abs(res["cuda"]["accuracy"] - res["cpu"]["accuracy"]) <= gc.ACC_POINTS


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_finetune_step_cuda_matches_cpu(tmp_path, precision):
    from featx.finetune.job import finetune
    from featx.finetune.settings import FinetuneSettings

    data = make_images(tmp_path / "ft", per_class=10, size=(72, 72))
    settings = FinetuneSettings(
        train_from="depth:0.5", epochs=1, warmup=0, batch_size=8, augment=False, seed=0
    )

    def run(device, prec):
        return finetune(
            featx.ModelSettings("resnet18", "none", 64),
            str(data),
            settings,
            run=featx.RunSettings(device=device, precision=prec, workers=0),
            progress=False,
        ).results

    ref, got = run("cpu", "fp32"), run("cuda", precision)
    if precision == "bf16":
        bound = gc.FT_LOSS_BF16_TOL
    else:
        bound = gc.TF32_TOL if gc.tf32_on() else gc.FT_LOSS_FP32_TOL
    for key in ("train_loss", "val_loss"):
        a, b = ref["history"][0][key], got["history"][0][key]
        assert abs(b - a) / max(abs(a), 1e-12) <= bound, (key, a, b)
    assert got["device"] == "cuda" and got["precision"] == precision
