"""Fine-tune methods (`--method full|lp-ft|bitfit|lora`): what each trains, what it saves, that each
resumes bit-identically after an interruption, and their bad input.

timm's tiny random-init `test_resnet` at 32 px on tiny generated images, as tests/finetune/test_finetune.py."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, cli, make_images
from featx.errors import UsageError
from featx.finetune.job import finetune
from featx.finetune.settings import FinetuneSettings
from featx.settings import ModelSettings, RunSettings

MODEL = ModelSettings("timm:test_resnet", "none", image_size=32)
RUN = RunSettings(device="cpu", workers=0, precision="fp32", batch_size=4)
HEAD = ("fc.weight", "fc.bias")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods") / "x"
    make_images(root, per_class=8, splits=("train",), seed=1)
    make_images(root, per_class=4, splits=("test",), seed=2)
    return root


def _settings(method: str, **kw) -> FinetuneSettings:
    return FinetuneSettings(
        **{
            "train_from": "depth:0",
            "epochs": 2,
            "batch_size": 4,
            "lr": 0.05,
            "threads": 1,
            "method": method,
            **kw,
        }
    )


@pytest.fixture(scope="module")
def tuned(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned")
    return {
        m: finetune(MODEL, str(data), _settings(m), run=RUN, out=str(out / m), progress=False)
        for m in ("full", "bitfit", "lora", "lp-ft")
    }


def _initial():
    from featx.models.build import load_model

    return load_model("timm:test_resnet", "none").module.state_dict()


def _load(path):
    from safetensors.torch import load_file

    return load_file(path)


def test_every_result_carries_its_cost(tuned):
    for m, t in tuned.items():
        r = t.results
        assert r["method"] == m
        assert 0 < r["trainable_params"] <= r["total_params"] == sum(p.numel() for p in t.module.parameters())
        assert r["train_seconds"] > 0 and r["inference_ms_per_image"] > 0 and r["inference_batch_size"] == 4
    full, bitfit, lora = (tuned[m].results["trainable_params"] for m in ("full", "bitfit", "lora"))
    assert full == tuned["full"].results["total_params"] and bitfit < lora < full
    assert tuned["lora"].results["lora_rank"] == 8 and tuned["lora"].results["lora_alpha"] == 16.0


def test_bitfit_changes_only_biases_norms_and_the_head(tuned):
    before, after = _initial(), _load(tuned["bitfit"].path)
    norms = {n.rsplit(".", 1)[0] for n in before if n.endswith("running_mean")}
    changed = {k for k in before if k not in HEAD and not torch.equal(before[k], after[k])}
    assert changed, "BitFit trained nothing"
    for k in changed:
        owner, leaf = k.rsplit(".", 1)
        assert leaf == "bias" or owner in norms, k
    weights = [
        k for k in before if k.endswith("weight") and k.rsplit(".", 1)[0] not in norms and k not in HEAD
    ]
    assert weights and all(torch.equal(before[k], after[k]) for k in weights)


def test_lora_saves_a_merged_network_of_the_original_layout(tuned, data):
    """No adapter tensors in the file, the same keys as the original, the weights moved by the
    merged adapters only (batch-norm statistics fixed), and predict reproduces the reported accuracy."""
    from featx.classifiers.predict import Predictor, collect_images

    before, after = _initial(), _load(tuned["lora"].path)
    assert set(after) == set(before)
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert all(torch.equal(before[k], after[k]) for k in stats)
    moved = [
        k for k in before if k.endswith("weight") and k not in HEAD and not torch.equal(before[k], after[k])
    ]
    assert moved and all(before[k].dim() == 4 for k in moved)
    paths = collect_images([str(data / "test")])
    p = Predictor(tuned["lora"].path[: -len(".safetensors")], device="cpu")
    try:
        preds = p.predict(paths, top_k=1, workers=0)
    finally:
        p.close()
    truth = [os.path.basename(os.path.dirname(x)) for x in paths]
    assert np.mean([q.label == t for q, t in zip(preds, truth)]) == pytest.approx(
        tuned["lora"].results["accuracy"]
    )


def test_lora_skips_grouped_convolutions_and_the_head():
    from featx.finetune.freeze import resolve_freeze_point
    from featx.finetune.methods import lora_targets
    from featx.models.build import load_model
    from featx.models.plan import resolve

    module = load_model("efficientnet_lite0", "none").module
    plan = resolve(ModelSettings("efficientnet_lite0", "none")).with_module(module)
    point = resolve_freeze_point(plan.taps, module, "depth:0")
    names = lora_targets(module, point, "classifier")
    kinds = {n: module.get_submodule(n) for n in names}
    assert "classifier" not in names and "conv_stem" in names and "conv_head" in names
    assert all(getattr(m, "groups", 1) == 1 for m in kinds.values())
    assert any(".conv_dw" in n for n, m in module.named_modules()) and not any(".conv_dw" in n for n in names)
    later = lora_targets(module, resolve_freeze_point(plan.taps, module, "depth:0.5"), "classifier")
    assert later and set(later) < set(names) and "conv_stem" not in later


def test_lp_ft_head_starts_as_the_probe(data, tmp_path):
    """The probe's folded head reproduces the logistic regression's predictions; with a
    learning rate of almost 0, the fine-tune's test accuracy is the probe's; where fine-tuning only
    hurts validation, the probe itself is the answer."""
    from featx.finetune.methods import _fit_probe

    rng = np.random.default_rng(0)
    x = rng.normal(3, 2, (60, 5)).astype(np.float32) * np.array([1, 10, 0.1, 1, 1], np.float32)
    y = (x[:, 0] + x[:, 1] / 10 > 6).astype(int) + (x[:, 3] > 3)
    w, b, info = _fit_probe(x[:40], y[:40], x[40:], y[40:], 4)  # class 3 never seen: never predicted
    from sklearn.linear_model import LogisticRegression

    scale = np.sqrt(np.mean(x[:40].var(0)))
    z = (x - x[:40].mean(0)) / scale
    ref = LogisticRegression(C=info["C"], max_iter=1000).fit(z[:40], y[:40])
    assert np.array_equal((x @ w.T + b).argmax(1), ref.predict(z))
    assert np.abs(w).max() < 100 * np.abs(ref.coef_).max() / scale  # no per-feature blow-up
    still = finetune(MODEL, str(data), _settings("lp-ft", lr=1e-9, epochs=1), run=RUN, progress=False).results
    assert still["lp_probe"]["C"] in (0.001, 0.01, 0.1, 1.0, 10.0) and still["accuracy"] > 0.5
    # a learning rate that wrecks the network: validation keeps the probe alone ("epoch 0")
    wrecked = finetune(
        MODEL, str(data), _settings("lp-ft", lr=10.0, epochs=2), run=RUN, progress=False
    ).results
    assert max(h["val_accuracy"] for h in wrecked["history"]) < wrecked["lp_probe"]["val_accuracy"]
    assert wrecked["epoch"] == 0 and wrecked["lp_probe"]["chosen"]
    assert wrecked["val_score"] == wrecked["lp_probe"]["val_accuracy"]
    assert wrecked["test_correct"] == still["test_correct"]  # both answered with the same probe


@pytest.mark.parametrize("method", ["lp-ft", "bitfit", "lora"])
def test_interrupted_run_resumes_bit_identical(method, data, tmp_path, monkeypatch):
    import featx.finetune.job as ft

    s = _settings(method, epochs=3)
    ref = finetune(MODEL, str(data), s, run=RUN, out=str(tmp_path / "ref"), progress=False)
    real = ft.train_epoch

    def dying(job, epoch, *a, **k):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(job, epoch, *a, **k)

    monkeypatch.setattr(ft, "train_epoch", dying)
    with pytest.raises(KeyboardInterrupt):
        finetune(MODEL, str(data), s, run=RUN, out=str(tmp_path / "cut"), progress=False)
    kept = sorted(os.listdir(tmp_path / "cut.ckpt"))
    assert "epoch-0000.safetensors" in kept and ("lp-head.safetensors" in kept) == (method == "lp-ft")
    monkeypatch.setattr(ft, "train_epoch", real)
    again = finetune(MODEL, str(data), s, run=RUN, out=str(tmp_path / "cut"), progress=False)
    a, b = _load(ref.path), _load(again.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["val_loss"] for h in ref.results["history"]] == [
        h["val_loss"] for h in again.results["history"]
    ]


def test_settings_validate_the_method():
    with pytest.raises(
        UsageError, match="--method 'adapter': unknown method; use one of full, lp-ft, bitfit, lora"
    ):
        FinetuneSettings(method="adapter")
    with pytest.raises(UsageError, match="--lora-rank"):
        FinetuneSettings(method="lora", lora_rank=0)
    with pytest.raises(UsageError, match="--lora-alpha"):
        FinetuneSettings(method="lora", lora_alpha=0)
    full = FinetuneSettings()
    assert (
        "method" not in full.key_dict() and "lora_rank" not in full.key_dict()
    )  # earlier cells keep their key
    assert FinetuneSettings(method="lora").key_dict()["lora_rank"] == 8


ARGS = [
    "--model",
    "timm:test_resnet",
    "--weights",
    "none",
    "--image-size",
    "32",
    "--device",
    "cpu",
    "--workers",
    "0",
]


def test_unknown_method_is_one_line(data, tmp_path):
    rc, _out, err = cli(
        "finetune", *ARGS, "--data", str(data), "--out", tmp_path / "m", "--method", "adapter"
    )
    assert_one_line_error(rc, err, code=2, needles=("--method", "full, lp-ft, bitfit, lora"))
    rc, _out, err = cli(
        "bench",
        "--model",
        "timm:test_resnet",
        "--data",
        str(data),
        "--finetune",
        "depth:0.5",
        "--finetune-method",
        "full,adapter",
        "--out",
        tmp_path / "b",
    )
    assert_one_line_error(
        rc, err, code=2, needles=("--finetune-method", "adapter", "full, lp-ft, bitfit, lora")
    )


def test_lora_without_peft_names_the_pip_command(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` meets where it is not installed
    rc, _out, err = cli(
        "finetune", *ARGS, "--data", str(data), "--out", tmp_path / "m", "--method", "lora", "--epochs", "1"
    )
    assert_one_line_error(rc, err, code=2, needles=("--method lora", "pip install 'featx[peft]'"))
    assert not os.path.exists(tmp_path / "m.ckpt")
    rc, _out, err = cli(
        "bench",
        "--model",
        "timm:test_resnet",
        "--data",
        str(data),
        "--finetune",
        "depth:0.5",
        "--finetune-method",
        "lora",
        "--out",
        tmp_path / "b",
    )
    assert_one_line_error(rc, err, code=2, needles=("pip install 'featx[peft]'",))
