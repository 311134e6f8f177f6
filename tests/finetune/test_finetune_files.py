"""Fine-tune files as safe as the cache: sealed checkpoints (OUT.ckpt/epoch-NNNN.safetensors) and
saved models (OUT.safetensors). A damaged or foreign checkpoint is set aside (`*.corrupt`) with a
warning and the run resumes from the last good one (or restarts) to the result of an uninterrupted
run; a damaged saved model is refused in one line by `predict` and `extract --weights`; a full
disk, an --out under a file and a second run on the same --out are one line each.

Tiny generated images and timm's random-init `test_resnet` at 32 px (a run takes about a second)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, cli, make_images
from featx.finetune.job import finetune
from featx.finetune.settings import FinetuneSettings
from featx.models.sealed import CHECKPOINT_KEY, DIGEST_KEY, FINETUNED_KEY, seal
from featx.settings import ModelSettings, RunSettings

MODEL = ModelSettings("timm:test_resnet", "none", image_size=32)
RUN = RunSettings(device="cpu", workers=0, precision="fp32")
SETTINGS = FinetuneSettings(train_from="depth:0.5", epochs=3, batch_size=4, lr=0.05)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftf") / "x"
    make_images(root, per_class=8, splits=("train",), seed=1)
    make_images(root, per_class=4, splits=("test",), seed=2)
    return root


@pytest.fixture(scope="module")
def ref(data, tmp_path_factory):
    """An uninterrupted run, saved."""
    return finetune(
        MODEL, str(data), SETTINGS, run=RUN, out=str(tmp_path_factory.mktemp("ref") / "m"), progress=False
    )


@pytest.fixture(scope="module")
def interrupted(data, tmp_path_factory):
    """The checkpoints of a run stopped during its third epoch, none pruned: epoch-0000 and epoch-0001."""
    import featx.finetune.job as ft

    folder = tmp_path_factory.mktemp("cut") / "m.ckpt"
    real_train, real_prune = ft.train_epoch, ft.prune_checkpoints

    def dying(job, epoch, *a, **k):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_train(job, epoch, *a, **k)

    ft.train_epoch, ft.prune_checkpoints = dying, lambda *a: None
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune(MODEL, str(data), SETTINGS, run=RUN, checkpoint_dir=str(folder), progress=False)
    finally:
        ft.train_epoch, ft.prune_checkpoints = real_train, real_prune
    assert sorted(os.listdir(folder)) == ["epoch-0000.safetensors", "epoch-0001.safetensors"]
    return folder


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
    return load_file(str(path)), header


def _write(path, tensors, header, reseal):
    """Write the damaged file back: with its old digest (damage), or resealed with a new one (a consistent
    forgery, which only the schema and structure checks can catch)."""
    if reseal:
        header = {k: json.loads(v) for k, v in header.items() if k != DIGEST_KEY}
        path.write_bytes(seal(tensors, header))
    else:
        save_file(tensors, str(path), metadata=header)


def _flip_bit(path, name_prefix, bit=0):
    """Flip one bit of the first float32 element of the first tensor whose name starts with `name_prefix`."""
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8 : 8 + n])
    name = sorted(k for k, v in head.items() if k.startswith(name_prefix) and v["dtype"] == "F32")[0]
    raw[8 + n + head[name]["data_offsets"][0]] ^= 1 << bit
    path.write_bytes(bytes(raw))


def _first_weight(tensors):
    return sorted(k for k in tensors if k.startswith("model.") and tensors[k].dim() == 4)[0]


def _damage_checkpoint(path, fault, reseal):
    if fault == "flipped mantissa bit":
        _flip_bit(path, "model.")
        return
    tensors, header = _read(path)
    state = json.loads(header[CHECKPOINT_KEY])
    w = _first_weight(tensors)
    if fault == "float16 tensor":
        tensors[w] = tensors[w].half()
    elif fault == "NaN":
        tensors[w].view(-1)[3] = float("nan")
    elif fault == "wrong shape":
        tensors[w] = tensors[w][:1].clone()
    elif fault == "missing tensor":
        del tensors[w]
    elif fault == "optimizer state removed":
        for k in [k for k in tensors if k.startswith("opt.")]:
            del tensors[k]
    elif fault == "history of the wrong type":
        state["history"] = {"epoch": 1}
    elif fault == "header epoch edited":
        state["epoch"] = 2
    header[CHECKPOINT_KEY] = json.dumps(state)
    _write(path, tensors, header, reseal)


def _equal_models(a, b):
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


CHECKPOINT_FAULTS = [
    "flipped mantissa bit",
    "float16 tensor",
    "NaN",
    "wrong shape",
    "missing tensor",
    "optimizer state removed",
    "history of the wrong type",
    "header epoch edited",
]


@pytest.mark.parametrize("reseal", [False, True], ids=["stale digest", "resealed"])
@pytest.mark.parametrize("fault", CHECKPOINT_FAULTS)
def test_a_damaged_checkpoint_is_set_aside_and_the_run_ends_as_an_uninterrupted_one(
    fault, reseal, data, ref, interrupted, tmp_path, caplog
):
    if reseal and fault == "flipped mantissa bit":
        pytest.skip("a resealed bit flip is a valid file: the digest is what finds it")
    folder = tmp_path / "m.ckpt"
    shutil.copytree(interrupted, folder)
    _damage_checkpoint(folder / "epoch-0001.safetensors", fault, reseal)
    caplog.set_level("INFO", logger="featx")
    res = finetune(
        MODEL,
        str(data),
        SETTINGS,
        run=RUN,
        out=str(tmp_path / "m"),
        checkpoint_dir=str(folder),
        progress=False,
    )
    assert "set aside the damaged checkpoint" in caplog.text and "epoch-0001.safetensors" in caplog.text
    assert "resuming from" in caplog.text and "epoch-0000.safetensors" in caplog.text
    assert (folder / "epoch-0001.safetensors.corrupt").exists()
    assert _equal_models(ref.path, res.path)
    assert [h["val_loss"] for h in ref.results["history"]] == [h["val_loss"] for h in res.results["history"]]


def test_every_checkpoint_damaged_restarts_and_a_stray_file_is_set_aside(
    data, ref, interrupted, tmp_path, caplog
):
    folder = tmp_path / "m.ckpt"
    shutil.copytree(interrupted, folder)
    for name in ("epoch-0000.safetensors", "epoch-0001.safetensors"):
        _flip_bit(folder / name, "model.", bit=3)
    shutil.copy(interrupted / "epoch-0001.safetensors", folder / "epoch-abcd.safetensors")
    caplog.set_level("INFO", logger="featx")
    res = finetune(
        MODEL,
        str(data),
        SETTINGS,
        run=RUN,
        out=str(tmp_path / "m"),
        checkpoint_dir=str(folder),
        progress=False,
    )
    assert "resuming from" not in caplog.text
    assert sorted(n for n in os.listdir(folder) if n.endswith(".corrupt")) == [
        "epoch-0000.safetensors.corrupt",
        "epoch-0001.safetensors.corrupt",
        "epoch-abcd.safetensors.corrupt",
    ]
    assert _equal_models(ref.path, res.path)


def test_another_runs_checkpoint_is_set_aside_and_the_own_older_one_resumes(
    data, ref, interrupted, tmp_path, caplog
):
    other = tmp_path / "other.ckpt"
    finetune(
        MODEL,
        str(data),
        FinetuneSettings(train_from="depth:0.5", epochs=3, batch_size=4, lr=0.01),
        run=RUN,
        checkpoint_dir=str(other),
        progress=False,
    )
    folder = tmp_path / "m.ckpt"
    shutil.copytree(interrupted, folder)
    shutil.copy(sorted(other.glob("epoch-*.safetensors"))[-1], folder / "epoch-0001.safetensors")
    caplog.set_level("INFO", logger="featx")
    res = finetune(
        MODEL,
        str(data),
        SETTINGS,
        run=RUN,
        out=str(tmp_path / "m"),
        checkpoint_dir=str(folder),
        progress=False,
    )
    assert "it belongs to another run" in caplog.text and "resuming from" in caplog.text
    assert (folder / "epoch-0001.safetensors.corrupt").exists()
    assert _equal_models(ref.path, res.path)


def test_an_undamaged_checkpoint_resumes(data, ref, interrupted, tmp_path, caplog):
    folder = tmp_path / "m.ckpt"
    shutil.copytree(interrupted, folder)
    caplog.set_level("INFO", logger="featx")
    res = finetune(
        MODEL,
        str(data),
        SETTINGS,
        run=RUN,
        out=str(tmp_path / "m"),
        checkpoint_dir=str(folder),
        progress=False,
    )
    assert "epoch-0001.safetensors (epoch 2 of 3 done)" in caplog.text and "set aside" not in caplog.text
    assert _equal_models(ref.path, res.path)


def _damage_model(path, fault, reseal):
    tensors, header = _read(path)
    meta = json.loads(header[FINETUNED_KEY])
    pre = meta["preprocessing"]
    if fault == "NaN head":
        k = sorted(k for k in tensors if k.startswith("fc."))[0]
        tensors[k].view(-1)[0] = float("nan")
    elif fault == "mean of length 1":
        pre["mean"] = [0.5]
    elif fault == "classes an int":
        meta["classes"] = 3
    elif fault == "preprocessing a string":
        meta["preprocessing"] = "resize 32"
    elif fault == "model an int":
        meta["model"] = 7
    elif fault == "crop abc":
        pre["crop_size"] = "abc"
    elif fault == "crop_size 1e9":
        pre["crop_size"] = 1_000_000_000
    elif fault == "mean 1e30":
        pre["mean"] = [1e30, 0.4, 0.4]
    header[FINETUNED_KEY] = json.dumps(meta)
    _write(path, tensors, header, reseal)


MODEL_FAULTS = [
    "flipped byte",
    "NaN head",
    "mean of length 1",
    "classes an int",
    "preprocessing a string",
    "model an int",
    "crop abc",
    "crop_size 1e9",
    "mean 1e30",
]


@pytest.mark.parametrize("fault", MODEL_FAULTS)
def test_a_damaged_saved_model_is_refused_in_one_line(fault, ref, data, tmp_path):
    path = tmp_path / "bad.safetensors"
    shutil.copy(ref.path, path)
    if fault == "flipped byte":
        _flip_bit(path, "fc.", bit=5)
    else:
        _damage_model(path, fault, reseal=fault != "NaN head")
    rc, _out, err = cli("predict", path, str(data / "test" / "cat"))
    assert_one_line_error(rc, err, code=1, needles=(str(path),))
    rc, _out, err = cli(
        "extract",
        "--model",
        "timm:test_resnet",
        "--weights",
        path,
        "--image-size",
        "32",
        "--data",
        data,
        "--layers",
        "layer1.0",
        "--cache-dir",
        tmp_path / "c",
        "--workers",
        "0",
        "--device",
        "cpu",
        "-q",
    )
    assert_one_line_error(rc, err, code=1, needles=(str(path),))


def test_the_undamaged_saved_model_predicts(ref, data):
    rc, out, err = cli("predict", ref.path, str(data / "test" / "cat"))
    assert rc == 0, err


def test_a_saved_model_is_sealed(ref):
    _tensors, header = _read(ref.path)
    assert len(header[DIGEST_KEY]) == 64 and json.loads(header[FINETUNED_KEY])["format"] == 2


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
    "--precision",
    "fp32",
    "--batch-size",
    "4",
    "--epochs",
    "1",
    "-q",
]


def test_out_under_a_file_is_one_line_and_a_missing_folder_is_made(data, tmp_path):
    (tmp_path / "afile").write_text("x")
    rc, _out, err = cli("finetune", *ARGS, "--data", data, "--out", tmp_path / "afile" / "m")
    assert_one_line_error(rc, err, code=2, needles=("--out", "afile", "is a file"))
    rc, out, err = cli("finetune", *ARGS, "--data", data, "--out", tmp_path / "new" / "deeper" / "m")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "new" / "deeper")) == ["m.safetensors"]


def test_a_second_run_on_the_same_out_is_refused(data, tmp_path):
    from featx.finetune.checkpoints import OutLock

    target = str(tmp_path / "m.safetensors")
    with OutLock(target):
        rc, _out, err = cli("finetune", *ARGS, "--data", data, "--out", tmp_path / "m")
        assert_one_line_error(
            rc, err, code=1, needles=("--out", "another featx finetune", f"pid {os.getpid()}")
        )
    assert not os.path.exists(target + ".lock")


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_rerun_resumes(data, tmp_path, monkeypatch):
    """The disk fills while the second checkpoint is written (ENOSPC from the write): one line, the
    first checkpoint kept, no temporary file; the rerun with space resumes from it."""
    import errno

    import featx.finetune.checkpoints as ck

    real = ck.write_file

    def full(path, data):
        if path.endswith("epoch-0001.safetensors"):
            with open(path + ".tmp", "wb") as f:
                f.write(data[: len(data) // 3])
            os.remove(path + ".tmp")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ck, "write_file", full)
    argv = ["finetune", *ARGS[:-3], "--epochs", "2", "--data", data, "--out", tmp_path / "m"]
    rc, _out, err = cli(*argv)
    assert_one_line_error(
        rc,
        err,
        code=1,
        needles=(
            "epoch-0001.safetensors",
            "No space left",
            "free some space",
            "resumes from the last checkpoint",
        ),
        only_error_lines=True,
    )
    assert os.listdir(tmp_path / "m.ckpt") == ["epoch-0000.safetensors"]
    monkeypatch.setattr(ck, "write_file", real)
    rc, _out, err = cli(*argv[:-1], tmp_path / "m")
    assert rc == 0 and "resuming from" in err and "epoch 1 of 2 done" in err, err


def test_a_file_size_limit_at_the_first_checkpoint_is_one_line(data, tmp_path):
    """RLIMIT_FSIZE (in a subprocess) below one checkpoint's size: the kernel refuses the write (EFBIG)."""
    argv = ["finetune", *ARGS, "--data", str(data), "--out", str(tmp_path / "m")]
    code = (
        "import resource, sys; from featx.cli.main import main; "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200000, 200000)); "
        f"sys.exit(main({argv!r}))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert_one_line_error(
        p.returncode, p.stderr, code=1, needles=("cannot write the checkpoint", "File too large")
    )
    assert os.listdir(tmp_path / "m.ckpt") == []
