"""Shared fixtures: tiny generated image folders and fast extraction settings.

Models in unit tests are randomly initialised (`weights="none"`, seeded by featx) and run at
32 px, so a forward costs milliseconds; real ImageNet weights appear only in the lite0 sanity test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# measured choices (featx.engine.autotune) go to a per-session folder, not the user's ~/.cache
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="featx-tests-xdg-")
# `--precision auto` resolves to what featx.engine.autotune measures faster on this CPU (bf16 where the CPU
# has bf16 units): pin the decision so no test depends on the machine. `FEATX_AUTOTUNE=bf16 python
# -m pytest` runs the whole suite under the other decision; tests/engine/test_autotune_decisions.py runs the
# cache, store and reliability paths under both in every run.
os.environ.setdefault("FEATX_AUTOTUNE", "fp32")
# fast, deterministic settings shared by extraction tests
FAST = dict(weights="none", image_size=32, workers=0, batch_size=4, precision="fp32")


def make_images(
    root: Path, classes=("cat", "dog", "owl"), per_class=5, size=(40, 30), splits=None, seed=0, ext=".jpg"
):
    """Write a tiny ImageFolder: each class has its own mean colour plus noise, so it is learnable."""
    rng = np.random.default_rng(seed)
    groups = [root / s for s in splits] if splits else [root]
    for g in groups:
        for ci, cls in enumerate(classes):
            d = g / cls
            d.mkdir(parents=True, exist_ok=True)
            base = np.array(
                [(60 + 80 * ci) % 256, (200 - 70 * ci) % 256, (30 + 110 * ci) % 256], dtype=np.float64
            )
            for k in range(per_class):
                arr = np.clip(base + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{cls}_{k:03d}{ext}", quality=92)
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """3 classes x 5 images, no split folders."""
    return make_images(tmp_path_factory.mktemp("imgs") / "tiny")


@pytest.fixture(scope="session")
def split_folder(tmp_path_factory) -> Path:
    """train/ and test/ folders, 3 classes x 4 images each."""
    return make_images(tmp_path_factory.mktemp("split") / "tinysplit", per_class=4, splits=("train", "test"))


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    d = tmp_path / "cache"
    d.mkdir()
    return d


FAST_ARGS = [
    "--model",
    "resnet18",
    "--weights",
    "none",
    "--image-size",
    "32",
    "--workers",
    "0",
    "--batch-size",
    "4",
    "--precision",
    "fp32",
]


def cli(*argv) -> tuple[object, str, str]:
    """`featx ARGV` in this process: (exit code, stdout, stderr). A SystemExit (only --help and
    --version should raise one) comes back as 'SystemExit(CODE)', an escaping exception as
    'exception' with its traceback on stderr: both are what a user would see go wrong."""
    import contextlib
    import io
    import traceback

    from featx.cli import main as featx_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = featx_main([str(a) for a in argv])
        except SystemExit as e:
            rc = f"SystemExit({e.code})"
        except BaseException:  # noqa: BLE001
            err.write(traceback.format_exc())
            rc = "exception"
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc, err: str, code=1, needles=(), only_error_lines: bool = False) -> str:
    """A user mistake's outcome: exit `code` (or one of a tuple of codes), no traceback, and stderr
    exactly one 'featx...' line holding every needle; `only_error_lines` counts only the
    'featx: error' lines (documented warnings may precede them). Returns that line."""
    codes = code if isinstance(code, tuple) else (code,)
    assert "Traceback" not in err, err
    assert rc in codes, (rc, err)
    lines = [ln for ln in err.strip().split("\n") if ln.strip()]
    if only_error_lines:
        lines = [ln for ln in lines if "featx: error" in ln]
    assert len(lines) == 1 and lines[0].startswith("featx"), err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def run_cli(*args: str, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run `python -m featx.cli ARGS` in a fresh process (what a user's shell does)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "featx.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
    )


def sigkill_when(argv, ready, timeout: float = 120) -> None:
    """Start `featx ARGV` in a fresh process and SIGKILL it as soon as `ready()` holds (or it has
    ended, or `timeout` seconds passed): the kill half of every kill-then-resume test."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "featx.cli", *map(str, argv)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while not ready() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


TIMINGS = ("fit_seconds", "train_seconds", "inference_ms_per_image")  # result columns that vary run to run


def csv_without_timing(path) -> list[dict]:
    """A results.csv's rows without the timing columns (`TIMINGS`): what two equal runs share."""
    import csv

    with open(path, encoding="utf-8") as f:
        return [{k: v for k, v in r.items() if k not in TIMINGS} for r in csv.DictReader(f)]


def cells_written(out) -> int:
    """Lines in a bench's cells.jsonl so far (0 before it exists)."""
    try:
        with open(os.path.join(str(out), "cells.jsonl"), encoding="utf-8") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def write_codes(
    path,
    layers: dict,
    labels,
    splits,
    classes,
    model="resnet18",
    weights="none",
    groups=None,
    depths: dict | None = None,
):
    """A featx codes file from arrays, written by featx's own journal + finalize (`depths`: each
    layer's relative depth in the network; default 0)."""
    import json as _json

    from featx.store.finalize import finalize
    from featx.store.journal import Journal

    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    meta = {
        "key": "test",
        "layers": [[k, int(v.shape[1])] for k, v in layers.items()],
        "dtype": "float32",
        "samples": n,
        "batch_size": n,
    }
    j = Journal.open(str(path) + ".partial", meta)
    j.append([np.asarray(v, np.float32) for v in layers.values()], np.arange(n), n, [])
    attrs = {
        "model": model,
        "weights": weights,
        "weights_source": "random",
        "weights_ident": "x",
        "weights_sha256": "",
        "pool": "avg",
        "preprocessing": _json.dumps(
            {
                "crop_size": 32,
                "resize_size": 32,
                "interpolation": "bilinear",
                "mean": [0.5] * 3,
                "std": [0.5] * 3,
                "crop_mode": "center",
            }
        ),
        "layers": np.array(list(layers), dtype=object),
        "dataset": "synthetic",
        "samples": n,
    }
    finalize(
        str(path),
        j,
        classes=classes,
        labels=labels,
        splits=np.asarray(splits),
        ids=[f"s{i}" for i in range(n)],
        layer_attrs={
            k: {"activation": "none", "pool": "avg", **({"depth": float(depths[k])} if depths else {})}
            for k in layers
        },
        attrs=attrs,
        groups=None if groups is None else np.asarray(groups, dtype=str),
    )
    return str(path)


def blobs(n_per_class=30, n_classes=3, dim=16, sep=4.0, seed=0):
    """Gaussian blobs: class c centred at sep * e_c (plus noise dims)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_per_class * n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per_class)
    X[np.arange(len(y)), y % dim] += sep
    return X, y
