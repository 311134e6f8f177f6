#!/usr/bin/env python
"""One prepared check of featx's CUDA paths: correctness against the CPU, and speed, in one command.

    python benchmarks/gpu_check.py --out results/gpu            # on a machine with one CUDA GPU (< 8 min)
    python benchmarks/gpu_check.py --out /tmp/gc --dry-run      # the same steps on the CPU, toy sizes
    python benchmarks/gpu_check.py --out results/gpu --steps decode,fallback   # rerun some steps
    python benchmarks/gpu_check.py --out results/gpu --size speed_n=2048     # smaller speed runs

Exit status: 0 when every step is ok, 1 otherwise, 2 for a bad option.

It writes OUT/gpu_check.json (every step, its status, measurements, checks and targets),
OUT/gpu_check.md (the same as tables) and OUT/logs/STEP.log (each step's output and traceback).
Inputs and caches go to OUT/work (kept, so a rerun of some steps reuses the images).

Steps (in this order; each runs in its own forked process with its own timeout, so a failure or a
hang costs only that step; a step is `ok`, `failed` with a one-line reason, `timed out`, or
`skipped` when the run's time budget is spent):

  env               torch/CUDA versions, the GPU, TF32 settings, cores
  inputs            JPEGs of several sizes written from --datasets images and synthetic ones, a PNG,
                    a CMYK JPEG, a progressive JPEG, a 4:4:4 JPEG, a grayscale JPEG, an EXIF-rotated
                    JPEG, a truncated and a corrupt file; a speed set; a fine-tune set
  codes_fp32        CUDA codes against the CPU's at fp32 (PIL decoder on both: the same pixels),
                    as featx runs (PyTorch's TF32 default) and with TF32 off; torchvision decoder too
  codes_lowp        CUDA codes at bf16 and fp16 against the CPU's fp32 codes (and CPU bf16's error)
  decode            decode_jpeg on the device against the CPU decoder, pixel by pixel
  fallback          rows and skipped files of the CUDA entries against the CPU entries
  predict           CNNCodes and a saved classifier's Predictor on CUDA against extract / the CPU
  auto_batch        --batch-size auto at 224 and 448 px: the chosen batch, peak memory, no OOM
  solver_match      TorchSoftmax on CUDA against the CPU; featx.fit --solver torch on both devices
  finetune_match    one epoch of fine-tuning on CUDA (fp32 and bf16) against the CPU
  speed_resnet50, speed_efficientnet_lite0, speed_vit_small
                    extraction img/s end to end with GPU decode and with CPU-worker (PIL) decode,
                    the bare forward on uint8 batches already on the device, a hand-written loop,
                    batch-size scaling with peak memory
  finetune_speed    fine-tuning img/s (one epoch, resnet50, 224 px, bf16 autocast)
  torchrun          `torchrun --standalone --nproc-per-node 1 -m featx extract` against a plain run
  solver_speed      featx.fit --solver torch (GPU) against --solver sklearn (lbfgs, all cores) on
                    100,000 x 2,048 synthetic codes, 10 classes (last: the least predictable; when
                    sklearn outlasts the timeout, the speed-up is reported as a lower bound)

Decisions:
- Weights are random init (`--weights none`, seeded by featx) everywhere: speed does not depend
  on weight values, and correctness compares devices on the same weights. No network is needed.
- Status vs verdicts. A correctness step is `failed` when one of its checks misses its bound (the
  reason names the first); a speed step is `ok` when it measured, and its targets are reported
  met or not (the targets table), because a missed target is a finding, not a broken check.
- fp32 on CUDA. PyTorch runs fp32 convolutions in TF32 by default (cudnn.allow_tf32) and featx does
  not change that, so "fp32" CUDA codes carry TF32 rounding. The check judges featx as it runs
  against TF32_TOL when TF32 is on (FP32_TOL when off) and, separately, a TF32-off run against
  FP32_TOL, so the table shows both what users get and whether the fp32 path is exact.
- Errors are relative: per layer, the batch's relative error ||A - B||_F / ||B||_F (as
  tests/engine/test_speed_options.py bounds CPU bf16), plus the largest per-image relative L2 error and the
  largest absolute difference over the largest |reference| (recorded, not judged).
- Pixels: nvjpeg and libjpeg-turbo differ in IDCT and chroma upsampling, so decoded pixels are
  judged on the mean absolute difference per image (<= PIXEL_MEAN_TOL); the max is recorded.
  Files the device decoder refuses are recorded (the fallback step judges what featx does then).
- Fallback: the CUDA entry must hold the same rows and skip the same files as the CPU entry of the
  same decoder; CPU PIL vs CPU torchvision is recorded only.
- Speed: each extraction runs in a fresh cache; autotune decisions (precision, batch size) are made
  once by a warm-up extraction of other images, as they are remembered on a real machine, so the
  timed runs do not include the measurement. `e2e` is images / seconds of the whole `extract` call
  (model build, worker start, decode, forward, HDF5 finalize); `loop` leaves out planning, model
  build and finalize (featx.Timings phases). The 0.9 target is judged on the loop rate; both are
  shown. The bare forward is featx's CodeComputer on uint8 batches already on the device, at the
  batch size and precision the extraction chose. The hand-written loop is torchvision ImageFolder +
  DataLoader (PIL, same worker count as featx's auto) + the whole network in fp32 under no_grad +
  `.cpu().numpy()` per batch, batch 64.
- Solver speed uses a 4-value C grid (1e-3..1), not the 8-value default, to fit the time budget;
  both solvers walk the same grid through `featx.fit` (hold-out selection); sklearn gets every core.
- The dataset folder defaults to ../shared/datasets relative to the repository root (then
  shared/datasets inside it); without it the images are synthetic only (recorded in env/inputs).
- FEATX_AUTOTUNE is removed from the environment (the check measures featx's own decisions), and
  autotune's memory goes to OUT/work/xdg, not ~/.cache.
- The dry run uses timm's tiny random-init test networks at 32 px and a handful of images, on the
  CPU, through exactly the same step functions; comparisons are then CPU against CPU, and its
  speed targets are not expected to be met. To stay short on a small shared CPU it pins
  FEATX_AUTOTUNE=fp32 (measuring bf16 on a CPU takes longer than the rest), runs torch on one
  thread, and checks the codes of one model (the GPU run checks a CNN and a ViT).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Bounds (see the docstring). Relative errors are ||A - B||_F / ||B||_F per layer.
FP32_TOL = 1e-4  # fp32 against fp32: summation order only
TF32_TOL = 2e-2  # fp32 convolutions in TF32 (10-bit mantissa) through a deep network
BF16_TOL = 5e-2  # bf16 autocast (8-bit mantissa); CPU bf16 measured 2-6% per image on real weights
FP16_TOL = 1e-2  # fp16 autocast (11-bit mantissa)
PIXEL_MEAN_TOL = 1.5  # mean |device - CPU| per decoded image, in 8-bit levels
SOLVER_OBJ_TOL = 1e-3  # relative objective difference, torch solver on the device vs the CPU
AGREE_MIN = 0.995  # share of equal predictions
ACC_POINTS = 0.5  # test accuracy, percentage points, featx.fit through both devices
SOLVER_SPEED_ACC_POINTS = 0.1  # torch vs sklearn on the big synthetic codes
FT_LOSS_FP32_TOL, FT_LOSS_BF16_TOL = 1e-3, 5e-2  # relative train/val loss difference after one epoch

# Targets (speed; reported, not judged)
LIMIT_RATIO_TARGET = 0.9
HAND_LOOP_TARGET = 3.0
SOLVER_SPEED_TARGET = 10.0

SOLVER_CS = (1e-3, 1e-2, 1e-1, 1.0)


def sizes(dry: bool) -> dict:
    """Everything that differs between the GPU run and the dry run."""
    if dry:
        return dict(
            codes_models=[("timm:test_resnet", 32)],
            speed_models={
                "resnet50": ("timm:test_resnet", 32),
                "efficientnet_lite0": ("timm:test_efficientnet", 32),
                "vit_small": ("timm:test_vit", 32),
            },
            batch_models=[("timm:test_resnet", 32), ("timm:test_resnet", 48)],
            ft_model=("timm:test_resnet", 32),
            ft_speed_model=("timm:test_resnet", 32),
            torchrun_model=("timm:test_resnet", 32),
            jpeg_sizes=[(48, 36), (90, 120)],
            synth_sizes=[(40, 40)],
            per_class_ds=1,
            speed_n=10,
            speed_warm=4,
            speed_side=64,
            scaling=[2],
            bare_batches=2,
            hand_batch=5,
            solver_speed=(400, 32, 4),
            solver_match=(300, 16, 3),
            ft_per_class=8,
            ft_batch=8,
            ft_speed_images=12,
            ft_speed_batch=4,
            ft_speed_data="finetune",
            workers=0,
            threads=1,
        )
    return dict(
        codes_models=[("resnet50", 224), ("timm:vit_small_patch16_224", 224)],
        speed_models={
            "resnet50": ("resnet50", 224),
            "efficientnet_lite0": ("efficientnet_lite0", 224),
            "vit_small": ("timm:vit_small_patch16_224", 224),
        },
        batch_models=[("resnet50", 224), ("resnet50", 448), ("timm:vit_small_patch16_224", 224)],
        ft_model=("resnet18", 112),
        ft_speed_model=("resnet50", 224),
        torchrun_model=("resnet50", 224),
        jpeg_sizes=[(64, 48), (200, 150), (500, 375), (375, 500), (1024, 768)],
        synth_sizes=[(224, 224), (640, 480)],
        per_class_ds=3,
        speed_n=8192,
        speed_warm=256,
        speed_side=500,
        scaling=[32, 64, 128, 256, 512, 1024],
        bare_batches=12,
        hand_batch=64,
        solver_speed=(100_000, 2048, 10),
        solver_match=(5000, 256, 5),
        ft_per_class=24,
        ft_batch=16,
        ft_speed_images=2048,
        ft_speed_batch=128,
        ft_speed_data="speed",
        workers="auto",
        threads=None,
    )


# -- steps: name, kind, timeout on the GPU (s); the dry run gives each 60 s -------------------------------------

STEPS = [
    ("env", "info", 60),
    ("inputs", "info", 90),
    ("codes_fp32", "correctness", 90),
    ("codes_lowp", "correctness", 60),
    ("decode", "correctness", 45),
    ("fallback", "correctness", 45),
    ("predict", "correctness", 60),
    ("auto_batch", "correctness", 90),
    ("solver_match", "correctness", 60),
    ("finetune_match", "correctness", 90),
    ("speed_resnet50", "speed", 100),
    ("speed_efficientnet_lite0", "speed", 100),
    ("speed_vit_small", "speed", 100),
    ("finetune_speed", "speed", 90),
    ("torchrun", "speed", 90),
    ("solver_speed", "speed", 200),  # last: the slowest and least predictable (sklearn on every core)
]


# -- the recorder a step writes into ---------------------------------------------------------------------------


class Record:
    """A step's results, written to disk after every change, so a step killed at its timeout keeps
    what it measured."""

    def __init__(self, path: str, cfg: dict):
        self.path, self.cfg = path, cfg
        self.data: dict = {}
        self.checks: list[dict] = []
        self.targets: list[dict] = []
        self.status, self.reason = "running", ""

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.flush()

    def check(self, name: str, value: float, bound: float, lower: bool = False) -> bool:
        """Judge `value` <= `bound` (or >= with `lower`)."""
        ok = bool(value >= bound) if lower else bool(value <= bound)
        ok = ok and not (isinstance(value, float) and math.isnan(value))
        self.checks.append(
            {"name": name, "value": _num(value), "bound": bound, "op": ">=" if lower else "<=", "ok": ok}
        )
        self.flush()
        return ok

    def equal(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append({"name": name, "value": detail, "bound": "equal", "op": "", "ok": bool(ok)})
        self.flush()
        return bool(ok)

    def target(self, name: str, value: float, target: float) -> None:
        self.targets.append(
            {"name": name, "value": _num(value), "target": target, "met": bool(value >= target)}
        )
        self.flush()

    def flush(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "status": self.status,
                    "reason": self.reason,
                    "data": self.data,
                    "checks": self.checks,
                    "targets": self.targets,
                },
                f,
                indent=1,
                default=_jsonable,
            )
        os.replace(tmp, self.path)


def _num(v):
    return float(v) if isinstance(v, (np.floating, np.integer)) else v


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


# -- helpers shared by steps -----------------------------------------------------------------------------------


def work(cfg: dict, *parts) -> str:
    return os.path.join(cfg["work"], *parts)


def extract(
    cfg: dict,
    model_size,
    data: str,
    device: str,
    *,
    cache: str,
    layers: str = "depth:0.5,1.0",
    precision: str = "fp32",
    decoder: str = "pil",
    batch_size="auto",
    workers=None,
    timings=None,
):
    import featx

    model, size = model_size
    return featx.extract(
        model,
        data,
        layers,
        weights="none",
        image_size=size,
        device=device,
        precision=precision,
        decoder=decoder,
        batch_size=batch_size,
        workers=cfg["sizes"]["workers"] if workers is None else workers,
        cache_dir=cache,
        timings=timings,
    )


def read_codes(path: str) -> tuple[list[str], dict, list[tuple[str, str]], dict]:
    """(row ids, {layer: codes}, skipped, attrs) of a codes file."""
    import featx

    with featx.open_codes(path) as f:
        return list(f.paths), {n: f.codes(n) for n in f.layers}, list(f.skipped), dict(f.attrs)


def compare_codes(ref: str, other: str) -> dict:
    """Per layer, over the rows both files hold: batch relative error, largest per-image relative
    L2 error, largest |diff| over the largest |ref|."""
    ids_a, ca, _, _ = read_codes(ref)
    ids_b, cb, _, _ = read_codes(other)
    pos_b = {i: k for k, i in enumerate(ids_b)}
    common = [(k, pos_b[i]) for k, i in enumerate(ids_a) if i in pos_b]
    ia, ib = np.array([a for a, _ in common], int), np.array([b for _, b in common], int)
    out = {}
    for layer in ca:
        A, B = ca[layer][ia].astype(np.float64), cb[layer][ib].astype(np.float64)
        diff = B - A
        norm = np.linalg.norm(A)
        per = np.linalg.norm(diff, axis=1) / np.maximum(np.linalg.norm(A, axis=1), 1e-30)
        out[layer] = {
            "rows": len(common),
            "batch_rel": float(np.linalg.norm(diff) / max(norm, 1e-30)),
            "max_image_rel": float(per.max()) if len(per) else 0.0,
            "max_abs": float(np.abs(diff).max()) if diff.size else 0.0,
            "max_abs_over_scale": float(np.abs(diff).max() / max(np.abs(A).max(), 1e-30))
            if diff.size
            else 0.0,
        }
    return out


def worst(cmp: dict) -> float:
    return max((v["batch_rel"] for v in cmp.values()), default=0.0)


def tf32_on() -> bool:
    import torch

    return bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)


def set_tf32(on: bool) -> None:
    import torch

    torch.backends.cudnn.allow_tf32 = on
    torch.backends.cuda.matmul.allow_tf32 = on


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_mib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def fresh(cfg: dict, name: str) -> str:
    d = work(cfg, "scratch", name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def mixed_files(cfg: dict) -> list[str]:
    root = work(cfg, "data", "mixed")
    return sorted(str(p) for p in Path(root).rglob("*") if p.is_file())


# -- step: env -------------------------------------------------------------------------------------------------


def step_env(rec: Record, cfg: dict) -> None:
    import torch
    import torchvision

    import featx

    rec.set(
        "versions",
        {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "featx": featx.__version__,
            "python": sys.version.split()[0],
            "cuda": torch.version.cuda,
        },
    )
    rec.set("cores", os.cpu_count())
    rec.set("device", cfg["device"])
    rec.set("datasets", cfg["datasets"] or "not found: synthetic images only")
    if cfg["device"].startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                "CUDA is not available in this process; run on a GPU machine or pass --dry-run"
            )
        p = torch.cuda.get_device_properties(0)
        rec.set(
            "gpu",
            {
                "name": p.name,
                "memory_gib": round(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}",
                "count": torch.cuda.device_count(),
                "bf16": torch.cuda.is_bf16_supported(),
            },
        )
        rec.set(
            "tf32",
            {
                "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            },
        )
        try:
            smi = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            )
            rec.set("nvidia_smi", smi.stdout.strip())
        except (OSError, subprocess.SubprocessError) as e:
            rec.set("nvidia_smi", one_line(e))


# -- step: inputs ----------------------------------------------------------------------------------------------


def _dataset_jpegs(cfg: dict, limit: int) -> list[str]:
    """Up to `limit` JPEG paths from the shared datasets (hymenoptera first: photos of many sizes)."""
    if not cfg["datasets"]:
        return []
    out: list[str] = []
    for name in ("hymenoptera", "flowers5_128", "brain_tumor_mri"):
        root = Path(cfg["datasets"], name)
        if root.is_dir():
            out += sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        if len(out) >= limit:
            break
    step = max(1, len(out) // limit) if out else 1
    return out[::step][:limit]


def _synthetic(w: int, h: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255.0 / max(w, 1), yy * 255.0 / max(h, 1), (xx + yy) * 127.0 / max(w + h, 1)], -1)
    base += rng.normal(0, 25, (h, w, 3)) + rng.uniform(0, 80, 3)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def _source_images(cfg: dict, n: int):
    """n RGB PIL images: dataset photos where there are some, synthetic otherwise."""
    from PIL import Image

    paths = _dataset_jpegs(cfg, n)
    out = []
    for k in range(n):
        if k < len(paths):
            with Image.open(paths[k]) as im:
                out.append(im.convert("RGB"))
        else:
            out.append(_synthetic(320, 240, k))
    return out


def step_inputs(rec: Record, cfg: dict) -> None:
    from PIL import Image

    s = cfg["sizes"]
    root = Path(work(cfg, "data"))
    shutil.rmtree(root, ignore_errors=True)
    mixed = root / "mixed"
    # the mixed set: two classes, dataset photos at several sizes, synthetic images, special files
    photos = _source_images(cfg, 2 * s["per_class_ds"])
    written = []
    for ci, cls in enumerate(("a", "b")):
        d = mixed / cls
        d.mkdir(parents=True)
        for k in range(s["per_class_ds"]):
            im = photos[ci * s["per_class_ds"] + k]
            for w, h in s["jpeg_sizes"]:
                p = d / f"ds{k}_{w}x{h}.jpg"
                im.resize((w, h), Image.BICUBIC).save(p, quality=90)
                written.append(p.name)
        for k, (w, h) in enumerate(s["synth_sizes"]):
            _synthetic(w, h, 100 + ci * 10 + k).save(d / f"synth{k}_{w}x{h}.jpg", quality=88)
    w, h = s["jpeg_sizes"][-1]
    src = photos[0].resize((w, h), Image.BICUBIC)
    special = mixed / "a"
    src.save(special / "special_png.png")
    src.convert("CMYK").save(special / "special_cmyk.jpg", quality=90)
    src.save(special / "special_progressive.jpg", quality=90, progressive=True)
    src.save(special / "special_444.jpg", quality=95, subsampling=0)
    src.convert("L").save(special / "special_gray.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    src.save(special / "special_exif6.jpg", quality=90, exif=exif.tobytes())
    raw = (special / "special_progressive.jpg").read_bytes()
    good = (mixed / "b" / sorted(os.listdir(mixed / "b"))[0]).read_bytes()
    (special / "special_truncated.jpg").write_bytes(good[: len(good) // 2])
    (special / "special_corrupt.jpg").write_bytes(
        b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8))
    )
    del raw
    rec.set("mixed_files", len(list(mixed.rglob("*.*"))))

    # the speed set: distinct JPEGs at about ImageNet's size, hard-linked to speed_n files over 5 classes
    side = s["speed_side"]
    n_distinct = min(256, s["speed_n"])
    base = root / "speed_base"
    base.mkdir()
    bases = []
    for k, im in enumerate(_source_images(cfg, n_distinct)):
        scale = side / max(im.size)
        im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))), Image.BICUBIC)
        p = base / f"b{k:04d}.jpg"
        im.save(p, quality=90)
        bases.append(p)
    for name, n in (("speed", s["speed_n"]), ("speed_warm", s["speed_warm"])):
        for k in range(n):
            d = root / name / f"c{k % 5}"
            d.mkdir(parents=True, exist_ok=True)
            target = d / f"{name}_{k:05d}.jpg"
            try:
                os.link(bases[(k * 7 + (name == "speed_warm")) % len(bases)], target)
            except OSError:
                shutil.copyfile(bases[k % len(bases)], target)
    # the fine-tune set: 3 classes of images with a class colour (learnable), from photos where there are some
    ft = root / "finetune"
    photos = _source_images(cfg, 3 * s["ft_per_class"])
    for ci in range(3):
        d = ft / f"k{ci}"
        d.mkdir(parents=True)
        for k in range(s["ft_per_class"]):
            im = photos[ci * s["ft_per_class"] + k].resize((96, 96), Image.BICUBIC)
            a = np.asarray(im, dtype=np.float64) * 0.6
            a[..., ci] += 100
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(d / f"k{ci}_{k:03d}.jpg", quality=90)
    rec.set("speed_images", s["speed_n"])
    rec.set("speed_distinct", len(bases))
    rec.set("dataset_photos_used", len(_dataset_jpegs(cfg, 2 * s["per_class_ds"])))


# -- steps: codes ----------------------------------------------------------------------------------------------


def _short(model: str) -> str:
    return model.split(":")[-1].split("_patch")[0]


def step_codes_fp32(rec: Record, cfg: dict) -> None:
    dev, data = cfg["device"], work(cfg, "data", "mixed")
    tf32 = tf32_on() if dev.startswith("cuda") else False
    rec.set("tf32_default", tf32)
    for ms in cfg["sizes"]["codes_models"]:
        m = _short(ms[0])
        entries = {}
        for side, device, decoder in (
            ("cpu", "cpu", "pil"),
            ("dev", dev, "pil"),
            ("cpu", "cpu", "torchvision"),
            ("dev", dev, "torchvision"),
        ):
            r = extract(
                cfg,
                ms,
                data,
                device,
                cache=work(cfg, "cache" if side == "cpu" else "cache_dev"),
                decoder=decoder,
            )
            entries[(side, decoder)] = r.path
        as_run = compare_codes(entries[("cpu", "pil")], entries[("dev", "pil")])
        rec.set(f"{m}_fp32_as_run", as_run)
        rec.check(
            f"{m} fp32 as featx runs (TF32 {'on' if tf32 else 'off'}): batch rel err",
            worst(as_run),
            TF32_TOL if tf32 else FP32_TOL,
        )
        set_tf32(False)
        r = extract(cfg, ms, data, dev, cache=fresh(cfg, f"notf32_{m}"), decoder="pil")
        set_tf32(tf32)
        strict = compare_codes(entries[("cpu", "pil")], r.path)
        rec.set(f"{m}_fp32_tf32_off", strict)
        rec.check(f"{m} fp32, TF32 off: batch rel err", worst(strict), FP32_TOL)
        tv = compare_codes(entries[("cpu", "torchvision")], entries[("dev", "torchvision")])
        rec.set(f"{m}_fp32_torchvision_decoder", tv)  # decode + resize differences too: recorded only


def step_codes_lowp(rec: Record, cfg: dict) -> None:
    dev, data, cache = cfg["device"], work(cfg, "data", "mixed"), work(cfg, "cache")
    for ms in cfg["sizes"]["codes_models"]:
        m = _short(ms[0])
        ref = extract(cfg, ms, data, "cpu", cache=cache, decoder="pil").path
        for prec, tol in (("bf16", BF16_TOL), ("fp16", FP16_TOL)):
            r = extract(cfg, ms, data, dev, cache=work(cfg, "cache_dev"), precision=prec, decoder="pil")
            cmp = compare_codes(ref, r.path)
            rec.set(f"{m}_{prec}", cmp)
            rec.check(f"{m} {prec} on {dev} vs CPU fp32: batch rel err", worst(cmp), tol)
        try:  # the CPU's own bf16 error, for scale
            r = extract(cfg, ms, data, "cpu", cache=cache, precision="bf16", decoder="pil")
            rec.set(f"{m}_cpu_bf16", compare_codes(ref, r.path))
        except Exception as e:  # noqa: BLE001 (information only)
            rec.set(f"{m}_cpu_bf16", one_line(e))


# -- step: decode ----------------------------------------------------------------------------------------------


def step_decode(rec: Record, cfg: dict) -> None:
    import warnings

    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    warnings.simplefilter("ignore", DeprecationWarning)
    dev = cfg["device"]
    rows, refused = [], []
    datas, names = [], []
    for path in mixed_files(cfg):
        raw = Path(path).read_bytes()
        if not raw.startswith(b"\xff\xd8\xff"):
            continue
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        name = os.path.relpath(path, work(cfg, "data", "mixed"))
        try:
            cpu = decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError as e:
            refused.append({"file": name, "decoder": "cpu", "reason": one_line(e)})
            continue
        try:
            on_dev = decode_jpeg(data, mode=ImageReadMode.RGB, device=dev, apply_exif_orientation=True).cpu()
        except Exception as e:  # noqa: BLE001 (what the device decoder refuses is a finding; fallback judges it)
            refused.append({"file": name, "decoder": dev, "reason": one_line(e)})
            continue
        datas.append(data)
        names.append(name)
        if on_dev.shape != cpu.shape:
            rows.append(
                {
                    "file": name,
                    "shape_cpu": list(cpu.shape),
                    "shape_dev": list(on_dev.shape),
                    "mean_abs": math.inf,
                    "max_abs": math.inf,
                }
            )
            continue
        d = (on_dev.int() - cpu.int()).abs()
        rows.append(
            {
                "file": name,
                "shape": list(cpu.shape),
                "mean_abs": float(d.float().mean()),
                "max_abs": int(d.max()),
            }
        )
    rec.set("files", rows)
    rec.set("refused", refused)
    # the batched call featx makes (one list per batch) against the singles
    try:
        batched = (
            decode_jpeg(datas, mode=ImageReadMode.RGB, device=dev, apply_exif_orientation=True)
            if datas
            else []
        )
        same = all(
            torch.equal(
                b.cpu(), decode_jpeg(x, mode=ImageReadMode.RGB, device=dev, apply_exif_orientation=True).cpu()
            )
            for b, x in zip(batched, datas)
        )
        rec.equal("batched decode_jpeg equals single-image decode on the device", same, f"{len(datas)} files")
    except Exception as e:  # noqa: BLE001
        rec.equal("batched decode_jpeg equals single-image decode on the device", False, one_line(e))
    sync(dev)
    if rows:
        rec.set("max_abs", max(r["max_abs"] for r in rows))
        rec.check(
            "decode_jpeg device vs CPU: worst mean |pixel diff| per image",
            max(r["mean_abs"] for r in rows),
            PIXEL_MEAN_TOL,
        )
    # featx's decode + resize + crop on the device against the same on the CPU (featx.decode internals)
    import featx
    from featx.sources.decode import decode_batch

    ms = cfg["sizes"]["codes_models"][0]
    pre = featx.resolve(featx.ModelSettings(ms[0], "none", ms[1]), featx.CodeSettings("depth:1.0")).preprocess
    payloads = [("jpeg", x) for x in datas]
    a, kept_a, bad_a = decode_batch(payloads, pre, torch.device("cpu"))
    b, kept_b, bad_b = decode_batch(payloads, pre, torch.device(dev))
    rec.equal(
        "featx decode_batch keeps the same images on both devices",
        kept_a == kept_b and [k for k, _ in bad_a] == [k for k, _ in bad_b],
        f"{len(kept_a)} vs {len(kept_b)} kept",
    )
    if a is not None and b is not None and a.shape == b.shape:
        d = (a.int() - b.cpu().int()).abs().float()
        rec.set("resized_mean_abs", float(d.mean()))
        rec.set("resized_max_abs", float(d.max()))
        rec.check(
            "featx decode+resize+crop device vs CPU: mean |pixel diff|", float(d.mean()), PIXEL_MEAN_TOL
        )


# -- step: fallback --------------------------------------------------------------------------------------------


def step_fallback(rec: Record, cfg: dict) -> None:
    dev, data = cfg["device"], work(cfg, "data", "mixed")
    ms = cfg["sizes"]["codes_models"][0]
    seen = {}
    for side, device, decoder in (
        ("cpu", "cpu", "pil"),
        ("cpu", "cpu", "torchvision"),
        ("dev", dev, "pil"),
        ("dev", dev, "torchvision"),
    ):
        r = extract(
            cfg, ms, data, device, cache=work(cfg, "cache" if side == "cpu" else "cache_dev"), decoder=decoder
        )
        ids, _, skipped, _ = read_codes(r.path)
        seen[f"{side}/{decoder}"] = (ids, skipped)
        rec.set(f"{device if side == 'dev' else 'cpu'}/{decoder}", {"rows": len(ids), "skipped": skipped})
    for decoder in ("pil", "torchvision"):
        a_ids, a_sk = seen[f"cpu/{decoder}"]
        b_ids, b_sk = seen[f"dev/{decoder}"]
        only_cpu = sorted(set(a_ids) - set(b_ids))
        only_dev = sorted(set(b_ids) - set(a_ids))
        rec.equal(
            f"{decoder} decoder: the {dev} entry holds the CPU entry's rows",
            a_ids == b_ids,
            f"{len(a_ids)} vs {len(b_ids)} rows; only on the CPU: {only_cpu[:3]}; only on {dev}: {only_dev[:3]}",
        )
        rec.equal(
            f"{decoder} decoder: {dev} skips the files the CPU skips",
            [p for p, _ in a_sk] == [p for p, _ in b_sk],
            f"CPU {[p for p, _ in a_sk]} vs {dev} {[p for p, _ in b_sk]}",
        )
    p_ids, _ = seen["cpu/pil"]
    t_ids, _ = seen["cpu/torchvision"]
    rec.set("cpu_pil_vs_torchvision_rows_equal", p_ids == t_ids)


# -- step: predict (CNNCodes, Predictor) -----------------------------------------------------------------------


def step_predict(rec: Record, cfg: dict) -> None:
    import featx

    dev, data = cfg["device"], work(cfg, "data", "mixed")
    ms = cfg["sizes"]["codes_models"][0]
    on_dev = extract(cfg, ms, data, dev, cache=work(cfg, "cache_dev"), decoder="pil")
    on_cpu = extract(cfg, ms, data, "cpu", cache=work(cfg, "cache"), decoder="pil")
    ids, codes, _, _ = read_codes(on_dev.path)
    ids = [os.path.join(data, i) for i in ids]  # the file holds paths relative to the data folder
    expect = np.hstack([codes[n] for n in codes])
    t = featx.CNNCodes(
        ms[0], weights="none", layers="depth:0.5,1.0", image_size=ms[1], device=dev, precision="fp32"
    )
    got = t.fit(ids).transform(ids)
    rel = float(np.linalg.norm(got - expect) / max(np.linalg.norm(expect), 1e-30))
    rec.set("cnncodes_vs_extract_rel", rel)
    rec.set("cnncodes_bit_identical", bool(np.array_equal(got, expect)))
    rec.check(
        f"CNNCodes on {dev} vs extract on {dev} (fp32): rel err",
        rel,
        TF32_TOL if tf32_on() and dev != "cpu" else FP32_TOL,
    )
    report = featx.fit(
        on_cpu.path, "all", featx.Protocol(classifier="softmax", Cs=(0.1, 1.0)), return_models=True
    )
    name = os.path.join(fresh(cfg, "predict"), "clf")
    featx.save_classifier(name, report)
    labels = {}
    for device in ("cpu", dev):
        p = featx.Predictor(name, device=device)
        try:
            labels[device] = [(x.label, x.score) for x in p.predict(ids, batch_size=8)]
        finally:
            p.close()
    a, b = labels["cpu"], labels[dev]
    agree = float(np.mean([x[0] == y[0] for x, y in zip(a, b)])) if a else 1.0
    rec.set("predict_score_max_abs", max((abs((x[1] or 0) - (y[1] or 0)) for x, y in zip(a, b)), default=0.0))
    rec.check(f"featx predict on {dev} vs CPU: label agreement", agree, AGREE_MIN, lower=True)


# -- step: auto batch size -------------------------------------------------------------------------------------


def step_auto_batch(rec: Record, cfg: dict) -> None:
    import torch

    dev = cfg["device"]
    data = work(cfg, "data", "speed_warm")
    for ms in cfg["sizes"]["batch_models"]:
        key = f"{_short(ms[0])}@{ms[1]}"
        reset_peak(dev)
        t0 = time.perf_counter()
        try:
            r = extract(
                cfg,
                ms,
                data,
                dev,
                cache=fresh(cfg, f"batch_{key}"),
                layers="depth:1.0",
                precision="auto",
                decoder="auto",
                batch_size="auto",
            )
        except torch.cuda.OutOfMemoryError as e:
            rec.equal(f"{key}: --batch-size auto runs without running out of memory", False, one_line(e))
            continue
        _, _, _, attrs = read_codes(r.path)
        total = torch.cuda.get_device_properties(0).total_memory / 2**20 if dev.startswith("cuda") else None
        rec.set(
            key,
            {
                "batch_size": attrs.get("batch_size"),
                "precision": attrs.get("precision"),
                "decoder": attrs.get("decoder"),
                "peak_mib": peak_mib(dev),
                "total_mib": total,
                "rows": r.rows,
                "seconds": round(time.perf_counter() - t0, 2),
            },
        )
        rec.equal(
            f"{key}: --batch-size auto runs without running out of memory",
            r.rows > 0,
            f"batch {attrs.get('batch_size')}, peak {peak_mib(dev) or 0:.0f} MiB",
        )


# -- steps: solver ---------------------------------------------------------------------------------------------


def blobs(n: int, d: int, c: int, seed: int = 0, noise: float = 2.2) -> tuple[np.ndarray, np.ndarray]:
    """Codes-like synthetic data: classes around means in a 64-d latent space, mapped to d, rectified."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    rng.shuffle(y)
    z = rng.normal(0, 1.0, (c, 64))[y] + rng.normal(0, noise, (n, 64))
    W = rng.normal(0, 1.0, (64, d)) / 8.0
    X = np.maximum(z @ W + rng.normal(0, 0.5, (n, d)), 0.0)
    return X.astype(np.float32), y


def write_codes(path: str, X: np.ndarray, y: np.ndarray) -> str:
    """A one-layer (`L`) codes file from arrays: benchmarks/fit_speed.py's writer (featx's own journal
    and finalize)."""
    from fit_speed import write_codes as write  # this script's folder is on sys.path

    return write(path, X, y)


def softmax_objective(X, y, coef, intercept, C: float) -> float:
    """scikit-learn's LogisticRegression objective / (C n), in float64."""
    X = X.astype(np.float64)
    Z = X @ coef.T.astype(np.float64) + intercept.astype(np.float64)
    if coef.shape[0] == 1:
        z = Z[:, 0]
        loss = np.logaddexp(0, z) - (y == 1) * z
    else:
        m = Z.max(1, keepdims=True)
        loss = (m[:, 0] + np.log(np.exp(Z - m).sum(1))) - Z[np.arange(len(y)), y]
    return float(loss.mean() + 0.5 / (C * len(y)) * (coef.astype(np.float64) ** 2).sum())


def step_solver_match(rec: Record, cfg: dict) -> None:
    import featx
    from featx.classifiers.torch_softmax import TorchSoftmax

    dev = cfg["device"]
    n, d, c = cfg["sizes"]["solver_match"]
    X, y = blobs(n, d, c, seed=1)
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Xs = (X - mu) / sd
    for C in (0.01, 1.0):
        fits = {device: TorchSoftmax(C=C, max_iter=1000, device=device).fit(Xs, y) for device in ("cpu", dev)}
        objs = {k: softmax_objective(Xs, y, m.coef_, m.intercept_, C) for k, m in fits.items()}
        rel = abs(objs[dev] - objs["cpu"]) / abs(objs["cpu"])
        agree = float(np.mean(fits[dev].predict(Xs) == fits["cpu"].predict(Xs)))
        rec.set(
            f"C={C:g}",
            {
                "objective_cpu": objs["cpu"],
                "objective_dev": objs[dev],
                "rel": rel,
                "agree": agree,
                "iters": {k: int(m.n_iter_[0]) for k, m in fits.items()},
            },
        )
        rec.check(f"TorchSoftmax C={C:g}: objective on {dev} vs CPU (rel)", rel, SOLVER_OBJ_TOL)
        rec.check(f"TorchSoftmax C={C:g}: equal predictions", agree, AGREE_MIN, lower=True)
    path = write_codes(os.path.join(fresh(cfg, "solver_match"), "codes.h5"), X, y)
    res = {}
    for device in ("cpu", dev):
        proto = featx.Protocol(classifier="softmax", Cs=SOLVER_CS, solver="torch", device=device)
        res[device] = featx.fit(path, ["L"], proto).results[0]
    rec.set("fit", {k: {"C": v["C"], "accuracy": v["accuracy"]} for k, v in res.items()})
    rec.equal(
        f"featx.fit --solver torch: same C on {dev} and CPU",
        res[dev]["C"] == res["cpu"]["C"],
        f"{res[dev]['C']:g} vs {res['cpu']['C']:g}",
    )
    rec.check(
        "featx.fit --solver torch: test accuracy difference (points)",
        100 * abs(res[dev]["accuracy"] - res["cpu"]["accuracy"]),
        ACC_POINTS,
    )


def step_solver_speed(rec: Record, cfg: dict) -> None:
    import featx

    dev = cfg["device"]
    n, d, c = cfg["sizes"]["solver_speed"]
    t0 = time.perf_counter()
    X, y = blobs(n, d, c, seed=2)
    path = write_codes(os.path.join(fresh(cfg, "solver_speed"), "codes.h5"), X, y)
    del X
    rec.set("shape", f"{n} x {d} x {c} classes")
    rec.set("grid", list(SOLVER_CS))
    rec.set("write_s", round(time.perf_counter() - t0, 1))
    out = {}
    for solver, device, jobs in (("torch", dev, 1), ("sklearn", "cpu", -1)):
        proto = featx.Protocol(classifier="softmax", Cs=SOLVER_CS, solver=solver, device=device)
        t = time.perf_counter()
        rec.set(f"{solver}_started_at", time.time())  # a timed-out sklearn run still bounds the speed-up
        r = featx.fit(path, ["L"], proto, jobs=jobs).results[0]
        out[solver] = {
            "seconds": time.perf_counter() - t,
            "C": r["C"],
            "accuracy": r["accuracy"],
            "val_score": r.get("val_score"),
            "device": device,
            "jobs": jobs,
        }
        rec.set(solver, out[solver])
    ratio = out["sklearn"]["seconds"] / out["torch"]["seconds"]
    rec.set("speedup", ratio)
    rec.equal(
        "torch and sklearn choose the same C",
        out["torch"]["C"] == out["sklearn"]["C"],
        f"{out['torch']['C']:g} vs {out['sklearn']['C']:g}",
    )
    rec.check(
        "test accuracy difference torch vs sklearn (points)",
        100 * abs(out["torch"]["accuracy"] - out["sklearn"]["accuracy"]),
        SOLVER_SPEED_ACC_POINTS,
    )
    rec.target("torch solver speed-up over sklearn lbfgs (x)", ratio, SOLVER_SPEED_TARGET)


# -- steps: fine-tuning ----------------------------------------------------------------------------------------


def _finetune(cfg: dict, ms, data: str, device: str, precision: str, settings, workers=0, out=None):
    import featx
    from featx.finetune.job import finetune

    model, size = ms
    return finetune(
        featx.ModelSettings(model, "none", size),
        data,
        settings,
        run=featx.RunSettings(device=device, precision=precision, workers=workers),
        out=out,
        progress=False,
    )


def _weights_rel(a, b) -> float:
    num = den = 0.0
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in sa.items():
        if v.is_floating_point():
            num += float(((v.double() - sb[k].double()) ** 2).sum())
            den += float((v.double() ** 2).sum())
    return math.sqrt(num / max(den, 1e-30))


def step_finetune_match(rec: Record, cfg: dict) -> None:
    from featx.finetune.settings import FinetuneSettings

    dev, s = cfg["device"], cfg["sizes"]
    data = work(cfg, "data", "finetune")
    settings = FinetuneSettings(
        train_from="depth:0.5", epochs=1, warmup=0, batch_size=s["ft_batch"], augment=False, seed=0
    )
    ref = _finetune(cfg, s["ft_model"], data, "cpu", "fp32", settings)
    tf32 = tf32_on() if dev.startswith("cuda") else False
    for prec, tol in (
        ("fp32", TF32_TOL if tf32 else FT_LOSS_FP32_TOL),
        ("bf16" if dev != "cpu" else "fp32", FT_LOSS_BF16_TOL),
    ):
        r = _finetune(cfg, s["ft_model"], data, dev, prec, settings)
        h0, h1 = ref.results["history"][0], r.results["history"][0]
        d = {
            "train_loss": (h0["train_loss"], h1["train_loss"]),
            "val_loss": (h0["val_loss"], h1["val_loss"]),
            "accuracy": (ref.results["accuracy"], r.results["accuracy"]),
            "weights_rel": _weights_rel(ref.module, r.module),
            "precision": r.results["precision"],
        }
        rec.set(f"{dev}_{prec}", d)
        for k in ("train_loss", "val_loss"):
            a, b = d[k]
            rec.check(
                f"fine-tune {prec} on {dev} vs CPU fp32: {k} (rel)", abs(b - a) / max(abs(a), 1e-12), tol
            )


def step_finetune_speed(rec: Record, cfg: dict) -> None:
    from featx.finetune.settings import FinetuneSettings

    dev, s = cfg["device"], cfg["sizes"]
    settings = FinetuneSettings(
        train_from="depth:0",
        epochs=1,
        warmup=0,
        batch_size=s["ft_speed_batch"],
        max_images=s["ft_speed_images"],
        seed=0,
    )
    reset_peak(dev)
    r = _finetune(
        cfg,
        s["ft_speed_model"],
        work(cfg, "data", s["ft_speed_data"]),
        dev,
        "auto",
        settings,
        workers=s["workers"],
    )
    h = r.results["history"][0]
    rate = r.results["n_fit"] / h["seconds"]
    rec.set(
        "result",
        {
            "model": s["ft_speed_model"][0],
            "image_size": s["ft_speed_model"][1],
            "n_fit": r.results["n_fit"],
            "n_val": r.results["n_val"],
            "epoch_seconds": h["seconds"],
            "images_per_s": rate,
            "precision": r.results["precision"],
            "batch_size": s["ft_speed_batch"],
            "peak_mib": peak_mib(dev),
            "note": "training images / seconds of the epoch (its validation pass included)",
        },
    )


# -- steps: speed ----------------------------------------------------------------------------------------------


def _loop_seconds(result, timings) -> float:
    outside = sum(
        v
        for k, v in timings.seconds.items()
        if k.startswith(("plan", "load_model", "model to device", "finalize"))
    )
    return max(result.seconds - outside, 1e-9)


class BareForward:
    """featx's CodeComputer on uint8 batches already on the device (normalize, forward, codes to
    the host): the limit an extraction can reach, at any batch size. Built once per model."""

    def __init__(self, ms, device: str, precision: str):
        import torch

        import featx
        from featx.engine.compute import computer_for, load_backbone

        self.device = device
        plan = featx.resolve(featx.ModelSettings(ms[0], "none", ms[1]), featx.CodeSettings("depth:1.0"))
        backbone, plan = load_backbone(plan)
        self.size = plan.preprocess.crop_size
        self.computer = computer_for(
            plan, backbone.module, torch.device(device), precision, channels_last=True
        )

    def rate(self, batch: int, n_batches: int, rounds: int = 2) -> dict:
        import torch

        g = torch.Generator().manual_seed(0)
        s = self.size
        xs = [
            torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, generator=g).to(self.device)
            for _ in range(2)
        ]
        reset_peak(self.device)
        try:
            for k in range(2):
                self.computer(xs[k])
            sync(self.device)
            best = math.inf
            for _ in range(rounds):
                t = time.perf_counter()
                for k in range(n_batches):
                    self.computer(xs[k % 2])
                sync(self.device)
                best = min(best, time.perf_counter() - t)
            return {"images_per_s": n_batches * batch / best, "peak_mib": peak_mib(self.device)}
        finally:
            del xs
            reset_peak(self.device)

    def close(self) -> None:
        self.computer.close()


def _hand_loop(cfg: dict, ms, data: str, device: str, batch: int, workers: int) -> dict:
    """What people write by hand: ImageFolder + DataLoader (PIL) + the whole network in fp32."""
    import torch
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    import featx

    plan = featx.resolve(featx.ModelSettings(ms[0], "none", ms[1]), featx.CodeSettings("depth:1.0"))
    pre = plan.preprocess
    module = featx.load_model(ms[0], "none").module.eval().to(device)
    tf = T.Compose(
        [
            T.Resize(pre.resize_size, interpolation=T.InterpolationMode(pre.interpolation)),
            T.CenterCrop(pre.crop_size),
            T.ToTensor(),
            T.Normalize(list(pre.mean), list(pre.std)),
        ]
    )
    loader = torch.utils.data.DataLoader(ImageFolder(data, tf), batch_size=batch, num_workers=workers)
    t, out = time.perf_counter(), []
    with torch.no_grad():
        for x, _ in loader:
            out.append(module(x.to(device)).cpu().numpy())
    feats = np.concatenate(out)
    return {"images_per_s": len(feats) / (time.perf_counter() - t), "batch_size": batch, "workers": workers}


def _speed(rec: Record, cfg: dict, key: str) -> None:
    import featx
    from featx.engine.compute import resolve_workers

    dev, s = cfg["device"], cfg["sizes"]
    ms = s["speed_models"][key]
    rec.set("model", {"name": ms[0], "image_size": ms[1], "images": s["speed_n"]})
    data, n = work(cfg, "data", "speed"), s["speed_n"]
    # warm-up on other images: autotune's precision and batch decisions (remembered), CUDA context, kernels
    warm = extract(
        cfg,
        ms,
        work(cfg, "data", "speed_warm"),
        dev,
        cache=fresh(cfg, f"warm_{key}"),
        layers="depth:1.0",
        precision="auto",
        decoder="torchvision",
        batch_size="auto",
    )
    _, _, _, attrs = read_codes(warm.path)
    bs, prec = int(attrs["batch_size"]), str(attrs["precision"])
    rec.set("chosen", {"batch_size": bs, "precision": prec, "workers": attrs.get("workers")})
    runs = {}
    for decoder in ("torchvision", "pil"):
        timings = featx.Timings()
        reset_peak(dev)
        r = extract(
            cfg,
            ms,
            data,
            dev,
            cache=fresh(cfg, f"{key}_{decoder}"),
            layers="depth:1.0",
            precision="auto",
            decoder=decoder,
            batch_size="auto",
            timings=timings,
        )
        runs[decoder] = {
            "e2e_images_per_s": n / r.seconds,
            "loop_images_per_s": n / _loop_seconds(r, timings),
            "seconds": r.seconds,
            "rows": r.rows,
            "peak_mib": peak_mib(dev),
        }
        rec.set(f"featx_{decoder}", runs[decoder])
    forward = BareForward(ms, dev, prec)
    try:
        bare = forward.rate(bs, max(3, min(s["bare_batches"], math.ceil(n / bs))))
        rec.set("bare_forward", bare)
        scaling = []
        for b in s["scaling"]:
            try:
                scaling.append({"batch_size": b, **forward.rate(b, 3, rounds=1)})
            except Exception as e:  # noqa: BLE001 (out of memory at a large batch is a measurement)
                scaling.append({"batch_size": b, "error": one_line(e)})
                reset_peak(dev)
            rec.set("batch_scaling", scaling)
    finally:
        forward.close()
    hand = _hand_loop(cfg, ms, data, dev, s["hand_batch"], resolve_workers(s["workers"]))
    rec.set("hand_loop", hand)
    tv, pil = runs["torchvision"], runs["pil"]
    ratios = {
        "limit_ratio_loop": tv["loop_images_per_s"] / bare["images_per_s"],
        "limit_ratio_e2e": tv["e2e_images_per_s"] / bare["images_per_s"],
        "vs_hand_loop": tv["e2e_images_per_s"] / hand["images_per_s"],
        "gpu_over_cpu_decode": tv["e2e_images_per_s"] / pil["e2e_images_per_s"],
    }
    rec.set("ratios", ratios)
    rec.target("featx (GPU decode) loop / bare forward", ratios["limit_ratio_loop"], LIMIT_RATIO_TARGET)
    rec.target("featx (GPU decode) end to end / hand-written loop", ratios["vs_hand_loop"], HAND_LOOP_TARGET)


def step_speed_resnet50(rec, cfg):
    _speed(rec, cfg, "resnet50")


def step_speed_efficientnet_lite0(rec, cfg):
    _speed(rec, cfg, "efficientnet_lite0")


def step_speed_vit_small(rec, cfg):
    _speed(rec, cfg, "vit_small")


# -- step: torchrun --------------------------------------------------------------------------------------------


def step_torchrun(rec: Record, cfg: dict) -> None:
    dev, s = cfg["device"], cfg["sizes"]
    ms = s["torchrun_model"]
    data = work(cfg, "data", "speed_warm")
    plain = extract(
        cfg, ms, data, dev, cache=fresh(cfg, "torchrun_plain"), layers="depth:1.0", decoder="auto"
    )
    cache = fresh(cfg, "torchrun")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        "-m",
        "featx",
        "extract",
        "--model",
        ms[0],
        "--weights",
        "none",
        "--image-size",
        str(ms[1]),
        "--data",
        data,
        "--layers",
        "depth:1.0",
        "--device",
        dev,
        "--precision",
        "fp32",
        "--batch-size",
        "auto",
        "--workers",
        str(s["workers"]),
        "--cache-dir",
        cache,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    if s["threads"]:
        env["OMP_NUM_THREADS"] = str(s["threads"])
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    wall = time.perf_counter() - t
    print(p.stdout, p.stderr, sep="\n")
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"torchrun exited {p.returncode}: {tail}")
    path = p.stdout.strip().splitlines()[-1]
    rows = len(read_codes(path)[0])
    rec.set(
        "torchrun", {"wall_s": wall, "images": s["speed_warm"], "rows": rows, "path": os.path.basename(path)}
    )
    rec.set("plain", {"seconds": plain.seconds, "rows": plain.rows})
    cmp = compare_codes(plain.path, path)
    rec.set("vs_plain", cmp)
    rec.equal("torchrun entry has the plain run's rows", rows == plain.rows, f"{rows} vs {plain.rows}")
    rec.check(
        "torchrun codes vs plain run (fp32): batch rel err",
        worst(cmp),
        TF32_TOL if dev != "cpu" and tf32_on() else FP32_TOL,
    )


# -- the runner ------------------------------------------------------------------------------------------------


def _child(name: str, cfg: dict, result_path: str, log_path: str) -> None:
    """A step in a forked process: its own process group (the parent kills it whole at the timeout),
    its output in its log, its results in `result_path`."""
    os.setpgid(0, 0)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    import logging

    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s", force=True
    )
    if cfg["sizes"]["threads"]:
        import torch

        torch.set_num_threads(cfg["sizes"]["threads"])
    rec = Record(result_path, cfg)
    rec.flush()
    code = 0
    try:
        globals()[f"step_{name}"](rec, cfg)
        failed = [c for c in rec.checks if not c["ok"]]
        if failed:
            c = failed[0]
            rec.status = "failed"
            rec.reason = f"{c['name']}: {c['value']} (bound {c['op']} {c['bound']})" + (
                f"; {len(failed) - 1} more checks failed" if len(failed) > 1 else ""
            )
        else:
            rec.status = "ok"
    except BaseException as e:  # noqa: BLE001 (every failure is this step's result)
        traceback.print_exc()
        rec.status, rec.reason = "failed", one_line(e)
        code = 1
    rec.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_step(name: str, kind: str, timeout: float, cfg: dict) -> dict:
    res_path = work(cfg, "steps", f"{name}.json")
    log_path = os.path.join(cfg["out"], "logs", f"{name}.log")
    with _suppress(FileNotFoundError):
        os.remove(res_path)
    import torch

    # fork: the step starts without importing anything again; spawn if CUDA was initialised here anyway
    ctx = mp.get_context("spawn" if torch.cuda.is_initialized() else "fork")
    t0 = time.perf_counter()
    p = ctx.Process(target=_child, args=(name, cfg, res_path, log_path))
    p.start()
    p.join(timeout)
    timed_out = p.is_alive()
    if timed_out:
        with _suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        p.join(10)
    seconds = time.perf_counter() - t0
    try:
        with open(res_path, encoding="utf-8") as f:
            res = json.load(f)
    except (OSError, ValueError):
        res = {"status": "failed", "reason": "", "data": {}, "checks": [], "targets": []}
    if timed_out:
        res["status"], res["reason"] = (
            "timed out",
            f"no result within {timeout:.0f} s (what it measured is kept)",
        )
    elif res.get("status") == "running":
        code = p.exitcode
        why = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        res["status"], res["reason"] = "failed", f"the step's process died ({why}); see logs/{name}.log"
    return {"name": name, "kind": kind, "seconds": round(seconds, 1), "timeout_s": round(timeout), **res}


class _suppress:
    def __init__(self, *exc):
        self.exc = exc

    def __enter__(self):
        return self

    def __exit__(self, t, v, tb):
        return t is not None and issubclass(t, self.exc)


def find_datasets(given: str | None) -> str | None:
    for cand in (
        [given] if given else [str(REPO.parent / "shared" / "datasets"), str(REPO / "shared" / "datasets")]
    ):
        if cand and os.path.isdir(cand):
            return os.path.abspath(cand)
    return None


# -- the report ------------------------------------------------------------------------------------------------


def _fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return format(v, spec)
    return str(v).replace("|", "/")


def markdown(results: dict) -> str:
    m = results["meta"]
    lines = [
        f"# featx GPU check ({'dry run, CPU' if m['dry_run'] else m['device']})",
        "",
        f"Started {m['started']}, {m['total_seconds']:.0f} s in all. {m.get('gpu', '')}",
        "",
        "## Steps",
        "",
        "| step | kind | status | s | reason |",
        "|---|---|---|---:|---|",
    ]
    for s in results["steps"]:
        lines.append(
            f"| {s['name']} | {s['kind']} | {s['status']} | {s['seconds']:.1f} | {_fmt(s.get('reason') or '')} |"
        )
    lines += [
        "",
        "## Checks (correctness)",
        "",
        "| step | check | value | bound | ok |",
        "|---|---|---:|---:|---|",
    ]
    for s in results["steps"]:
        for c in s.get("checks", []):
            lines.append(
                f"| {s['name']} | {_fmt(c['name'])} | {_fmt(c['value'])} | {c['op']} {_fmt(c['bound'])} | "
                f"{'yes' if c['ok'] else '**no**'} |"
            )
    lines += [
        "",
        "## Targets (speed)",
        "",
        "| step | measure | value | target | met |",
        "|---|---|---:|---:|---|",
    ]
    for s in results["steps"]:
        for t in s.get("targets", []):
            lines.append(
                f"| {s['name']} | {t['name']} | {_fmt(t['value'], '.2f')} | >= {t['target']} | "
                f"{'yes' if t['met'] else '**no**'} |"
            )
    lines += [
        "",
        "## Extraction speed (images/s)",
        "",
        "| model | batch | precision | featx GPU decode e2e | loop | featx PIL workers e2e | bare forward | "
        "hand loop | loop / bare | e2e / bare | / hand loop | GPU / CPU decode | peak MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in results["steps"]:
        d = s.get("data", {})
        if not s["name"].startswith("speed_") or "ratios" not in d:
            continue
        tv, pil, r = d["featx_torchvision"], d["featx_pil"], d["ratios"]
        lines.append(
            f"| {d['model']['name']} | {d['chosen']['batch_size']} | {d['chosen']['precision']} | "
            f"{_fmt(tv['e2e_images_per_s'], '.0f')} | {_fmt(tv['loop_images_per_s'], '.0f')} | "
            f"{_fmt(pil['e2e_images_per_s'], '.0f')} | {_fmt(d['bare_forward']['images_per_s'], '.0f')} | "
            f"{_fmt(d['hand_loop']['images_per_s'], '.0f')} | {_fmt(r['limit_ratio_loop'], '.2f')} | "
            f"{_fmt(r['limit_ratio_e2e'], '.2f')} | {_fmt(r['vs_hand_loop'], '.2f')} | "
            f"{_fmt(r['gpu_over_cpu_decode'], '.2f')} | {_fmt(tv['peak_mib'], '.0f')} |"
        )
    lines += [
        "",
        "## Batch-size scaling of the bare forward",
        "",
        "| model | batch | images/s | peak MiB |",
        "|---|---:|---:|---:|",
    ]
    for s in results["steps"]:
        d = s.get("data", {})
        for row in d.get("batch_scaling", []) if s["name"].startswith("speed_") else []:
            lines.append(
                f"| {d['model']['name']} | {row['batch_size']} | {_fmt(row.get('images_per_s'), '.0f')} | "
                f"{_fmt(row.get('peak_mib') if 'error' not in row else row['error'], '.0f')} |"
            )
    for s in results["steps"]:
        d = s.get("data", {})
        if s["name"] == "solver_speed" and "torch" in d:
            lines += [
                "",
                f"## Solver ({d.get('shape')}, C grid {d.get('grid')})",
                "",
                "| solver | device | s | chosen C | test accuracy |",
                "|---|---|---:|---:|---:|",
            ]
            for k in ("torch", "sklearn"):
                if k in d:
                    lines.append(
                        f"| {k} | {d[k]['device']} | {d[k]['seconds']:.1f} | {d[k]['C']:g} | {d[k]['accuracy']:.4f} |"
                    )
        if s["name"] == "finetune_speed" and "result" in d:
            r = d["result"]
            lines += [
                "",
                "## Fine-tuning speed",
                "",
                f"{r['model']} at {r['image_size']} px, {r['precision']}, batch {r['batch_size']}: "
                f"{r['images_per_s']:.0f} images/s over {r['n_fit']} training images ({r['note']}).",
            ]
    return "\n".join(lines) + "\n"


# -- main ------------------------------------------------------------------------------------------------------


def merge_previous(path: str, steps: list[dict], dry_run: bool) -> list[dict]:
    """With --steps: the steps just run replace theirs in the results already in OUT (same kind of
    run), and the others are kept, so a rerun of a few steps completes the report."""
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        return steps
    if old.get("meta", {}).get("dry_run") != dry_run:
        return steps
    by_name = {s["name"]: s for s in old.get("steps", [])}
    by_name.update({s["name"]: {**s, "rerun": True} for s in steps})
    return [by_name[n] for n, _, _ in STEPS if n in by_name]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md, logs/ and work/")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at toy sizes")
    ap.add_argument("--device", default=None, help="the device under test (cuda; cpu with --dry-run)")
    ap.add_argument(
        "--datasets", default=None, help="image datasets folder (../shared/datasets from the repo root)"
    )
    ap.add_argument(
        "--steps", default=None, help="comma-separated steps to run (inputs run first when missing)"
    )
    ap.add_argument(
        "--budget", type=float, default=None, help="seconds for the whole run (GPU 450, dry run 300)"
    )
    ap.add_argument(
        "--size",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override one of sizes()' values, e.g. --size speed_n=2048 --size 'scaling=[64,256]'",
    )
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every step's timeout")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [n for n, _, _ in STEPS]
    chosen = names if not args.steps else [x.strip() for x in args.steps.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in names]
    if unknown:
        print(
            f"gpu_check: unknown steps {', '.join(unknown)}; choose from {', '.join(names)}", file=sys.stderr
        )
        return 2
    out = os.path.abspath(args.out)
    cfg = {
        "out": out,
        "work": os.path.join(out, "work"),
        "dry_run": args.dry_run,
        "device": args.device or ("cpu" if args.dry_run else "cuda"),
        "datasets": find_datasets(args.datasets),
        "sizes": sizes(args.dry_run),
    }
    for item in args.size:
        key, _, value = item.partition("=")
        if key not in cfg["sizes"]:
            print(
                f"gpu_check: --size {key}: not a size; choose from {', '.join(cfg['sizes'])}", file=sys.stderr
            )
            return 2
        try:
            cfg["sizes"][key] = json.loads(value)
        except ValueError:
            cfg["sizes"][key] = value  # a plain string (a data folder name)
    for d in ("steps", "scratch"):
        os.makedirs(os.path.join(cfg["work"], d), exist_ok=True)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    if not os.path.isdir(work(cfg, "data", "speed")) and "inputs" not in chosen:
        chosen = ["inputs", *chosen]
    os.environ.pop("FEATX_AUTOTUNE", None)
    if args.dry_run:  # measuring fp32 against bf16 on a CPU costs more than the rest of the dry run
        os.environ["FEATX_AUTOTUNE"] = "fp32"
    os.environ["XDG_CACHE_HOME"] = work(cfg, "xdg")
    os.environ.setdefault("FEATX_DIST_TIMEOUT", "60")
    import h5py  # noqa: F401 (imported once here, so the forked steps start fast)
    import sklearn.linear_model  # noqa: F401
    import timm  # noqa: F401
    import torch  # noqa: F401 (no CUDA call here: the steps initialise CUDA after the fork)
    import torchvision  # noqa: F401

    import featx

    featx.extract  # noqa: B018 (loads the extraction modules once, before the steps fork)

    budget = args.budget or (300.0 if args.dry_run else 450.0)
    t_start, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    steps = []
    for name, kind, timeout in STEPS:
        if name not in chosen:
            continue
        left = budget - (time.perf_counter() - t_start)
        limit = min((60.0 if args.dry_run else timeout) * args.timeout_scale, left)
        if limit < 5:
            steps.append(
                {
                    "name": name,
                    "kind": kind,
                    "status": "skipped",
                    "seconds": 0.0,
                    "reason": f"the run's {budget:.0f} s budget is spent",
                    "data": {},
                    "checks": [],
                    "targets": [],
                }
            )
            continue
        res = run_step(name, kind, limit, cfg)
        steps.append(res)
        print(
            f"{name:<26} {res['status']:<10} {res['seconds']:6.1f} s  {res.get('reason') or ''}", flush=True
        )
    steps = merge_previous(os.path.join(out, "gpu_check.json"), steps, args.dry_run) if args.steps else steps
    env = next((s["data"] for s in steps if s["name"] == "env"), {})
    gpu = env.get("gpu", {})
    results = {
        "meta": {
            "started": started,
            "total_seconds": time.perf_counter() - t_start,
            "dry_run": args.dry_run,
            "device": cfg["device"],
            "gpu": f"{gpu.get('name')}, {gpu.get('memory_gib')} GiB" if gpu else "",
            "datasets": cfg["datasets"],
            "budget_s": budget,
            "bounds": {
                "FP32_TOL": FP32_TOL,
                "TF32_TOL": TF32_TOL,
                "BF16_TOL": BF16_TOL,
                "FP16_TOL": FP16_TOL,
                "PIXEL_MEAN_TOL": PIXEL_MEAN_TOL,
                "SOLVER_OBJ_TOL": SOLVER_OBJ_TOL,
                "AGREE_MIN": AGREE_MIN,
            },
            "targets": {
                "limit_ratio": LIMIT_RATIO_TARGET,
                "vs_hand_loop": HAND_LOOP_TARGET,
                "solver_speedup": SOLVER_SPEED_TARGET,
            },
        },
        "steps": steps,
    }
    with open(os.path.join(out, "gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=_jsonable)
    with open(os.path.join(out, "gpu_check.md"), "w", encoding="utf-8") as f:
        f.write(markdown(results))
    bad = [s["name"] for s in steps if s["status"] != "ok"]
    print(
        f"{len(steps) - len(bad)} of {len(steps)} steps ok in {results['meta']['total_seconds']:.0f} s"
        + (f"; not ok: {', '.join(bad)}" if bad else "")
        + f"\n{os.path.join(out, 'gpu_check.md')}"
    )
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
