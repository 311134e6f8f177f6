"""featx.finetune and `featx finetune`: the freeze point, the recipe's guarantees, crash safety,
the saved model (predict, extract --weights) and bad input.

Tiny generated images and timm's tiny random-init `test_resnet` (470k parameters, batch norm)
at 32 px, so each fine-tune takes a few seconds."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, cli, make_images, sigkill_when
from featx.errors import UsageError
from featx.finetune.data import select_samples
from featx.finetune.job import finetune
from featx.finetune.settings import FinetuneSettings
from featx.settings import ModelSettings, RunSettings

MODEL = ModelSettings("timm:test_resnet", "none", image_size=32)
RUN = RunSettings(device="cpu", workers=0, precision="fp32")
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
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train/ and test/ folders, 3 classes x 8 training and 4 test images."""
    root = tmp_path_factory.mktemp("ft") / "imgs"
    make_images(root / "x", per_class=8, splits=("train",), seed=1)
    make_images(root / "x", per_class=4, splits=("test",), seed=2)
    return root / "x"


@pytest.fixture(scope="module")
def tuned(data, tmp_path_factory):
    """One fine-tune from depth:0.5, saved."""
    out = tmp_path_factory.mktemp("model") / "m"
    s = FinetuneSettings(train_from="depth:0.5", epochs=2, batch_size=4, lr=0.05)
    return finetune(MODEL, str(data), s, run=RUN, out=str(out), progress=False)


def _initial():
    from featx.models.build import load_model

    return load_model("timm:test_resnet", "none").module.state_dict()


def test_frozen_part_bitwise_unchanged_and_bn_stats_fixed(tuned):
    r = tuned.results
    assert r["train_from"] == "depth:0.5" and r["train_from_module"] == "after layer2.0"
    before, after = _initial(), tuned.module.state_dict()
    frozen = {n for n, p in tuned.module.named_parameters() if not p.requires_grad}
    trained = {n for n, p in tuned.module.named_parameters() if p.requires_grad} - {"fc.weight", "fc.bias"}
    assert frozen and trained and all(n.startswith(("conv1", "bn1", "layer1", "layer2")) for n in frozen)
    assert all(n.startswith(("layer3", "layer4")) for n in trained)
    for n in frozen:
        assert torch.equal(before[n], after[n]), n
    stats = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    frozen_stats = [k for k in stats if k.startswith(("conv1", "bn1", "layer1", "layer2"))]
    assert frozen_stats and all(torch.equal(before[k], after[k]) for k in frozen_stats)
    moved = [k for k in stats if k.startswith("layer3") and not torch.equal(before[k], after[k])]
    assert moved, "the trained part's batch norm should update its statistics"
    assert any(not torch.equal(before[n], after[n]) for n in trained)


def test_results_schema(tuned):
    r = tuned.results
    for key in (
        "accuracy",
        "balanced_accuracy",
        "per_class",
        "confusion_matrix",
        "seed",
        "train_size",
        "seconds",
        "test_ci_low",
        "test_ci_high",
        "val_source",
        "n_val",
        "n_test",
        "recipe",
        "epoch",
        "history",
    ):
        assert key in r, key
    assert r["n_test"] == 12 and r["test_split"] == "test" and r["val_source"] == "hold-out 20% of train"
    assert len(r["history"]) == 2 and 1 <= r["epoch"] <= 2
    assert r["test_ci_low"] <= r["accuracy"] <= r["test_ci_high"]
    assert tuned.path.endswith("m.safetensors") and not os.path.exists(
        tuned.path[: -len(".safetensors")] + ".ckpt"
    )


def test_trains_and_saves_at_the_image_size_asked_for(data, tmp_path):
    """--image-size 32 (test_resnet's default is larger): every image tensor the network sees is 32 px,
    and the saved model and its results say 32."""
    from featx.models.build import load_model
    from featx.models.saved import finetuned_description

    assert load_model("timm:test_resnet", "none").preprocess.crop_size != 32
    sizes: set[tuple[int, int]] = set()

    def record(module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4 and args[0].shape[1] == 3:
            sizes.add(tuple(args[0].shape[-2:]))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        s = FinetuneSettings(train_from="depth:0.5", epochs=1, batch_size=4)
        res = finetune(MODEL, str(data), s, run=RUN, out=str(tmp_path / "m"), progress=False)
    finally:
        handle.remove()
    assert sizes == {(32, 32)}
    assert res.results["image_size"] == 32 and res.results["preprocessing"]["crop_size"] == 32
    assert finetuned_description(res.path)["preprocessing"]["crop_size"] == 32


def test_same_training_images_as_fit(data, tmp_path):
    """A fine-tune cell and a probe cell with the same seed and train size see the same rows."""
    from featx.classifiers.protocol import Protocol, parse_train_size
    from featx.classifiers.rows import select_rows
    from featx.engine.extract import extract
    from featx.sources.spec import open_source
    from featx.store.codes import CodesFile

    ds = open_source(str(data))
    codes = extract(MODEL, str(data), "depth:1.0", run=RUN, cache_dir=str(tmp_path), progress=False).path
    for size, seed in (("all", 0), ("4/class", 3)):
        ours = select_samples(ds, FinetuneSettings(train_size=size, seed=seed))
        with CodesFile(codes) as f:
            theirs = select_rows(f, Protocol(min_val_per_class=0), parse_train_size(size), seed)
        for a, b in ((ours.train, theirs.train), (ours.val, theirs.val), (ours.test, theirs.test)):
            assert np.array_equal(a, b)


def test_head_only_close_to_fit_softmax(data, tmp_path):
    """depth:1.0 trains only the head: a probe by SGD. On the same images (eval transform, no
    augmentation) it lands within 0.25 accuracy of fit's softmax on the depth:1.0 codes (loose:
    SGD for a few epochs on raw codes vs lbfgs on standardized ones with C chosen on validation)."""
    from featx.classifiers.fit import fit_cell
    from featx.classifiers.protocol import protocol_for
    from featx.engine.extract import extract

    s = FinetuneSettings(train_from="depth:1.0", epochs=8, lr=0.5, batch_size=8, augment=False, warmup=0)
    r = finetune(MODEL, str(data), s, run=RUN, progress=False).results
    codes = extract(MODEL, str(data), "depth:1.0", run=RUN, cache_dir=str(tmp_path), progress=False)
    probe = fit_cell(codes.path, list(codes.layers), protocol_for("softmax"))
    assert r["trainable_params"] == probe["dim"] * 3 + 3  # the new head alone
    assert abs(r["accuracy"] - probe["accuracy"]) <= 0.25, (r["accuracy"], probe["accuracy"])
    assert r["accuracy"] > 0.5


def test_test_split_read_only_at_the_end(data, caplog):
    """Instrument the reader: no test image is read before the last training/validation read,
    and each test image is read once. (On the CPU the run time is estimated up front.)"""
    import logging

    from featx.sources.spec import open_source

    caplog.set_level(logging.INFO, logger="featx")

    ds = open_source(str(data))
    reads: list[int] = []
    inner = ds.loader
    ds.loader = lambda i: (reads.append(i), inner(i))[1]
    r = finetune(MODEL, ds, FinetuneSettings(epochs=2, batch_size=4), run=RUN, progress=False).results
    test = set(np.flatnonzero(ds.splits == "test").tolist())
    first = next(k for k, i in enumerate(reads) if i in test)
    assert all(i in test for i in reads[first:]) and len(reads[first:]) == len(test) == r["n_test"]
    assert first > 0
    assert "fine-tuning on the CPU: about" in caplog.text and "first batch" in caplog.text


def test_max_images_caps_the_training_images(data):
    from featx.sources.spec import open_source

    ds = open_source(str(data))
    full = select_samples(ds, FinetuneSettings(seed=2))
    capped = select_samples(ds, FinetuneSettings(seed=2, max_images=6))
    assert len(capped.train) == 6 and set(capped.train) <= set(full.train)
    assert sorted(np.bincount(ds.labels[capped.train]).tolist()) == [2, 2, 2]  # stratified
    assert np.array_equal(capped.val, full.val) and np.array_equal(capped.test, full.test)


def test_predict_uses_the_saved_model(tuned, data):
    """predict's top-1 on the test images gives exactly the accuracy the fine-tune reported."""
    from featx.classifiers.predict import Predictor, collect_images

    paths = collect_images([str(data / "test")])
    p = Predictor(tuned.path[: -len(".safetensors")], device="cpu")
    try:
        preds = p.predict(paths, top_k=2, workers=0)
    finally:
        p.close()
    truth = [os.path.basename(os.path.dirname(x)) for x in paths]
    acc = np.mean([q.label == t for q, t in zip(preds, truth)])
    assert acc == pytest.approx(tuned.results["accuracy"])
    assert all(abs(sum(s for _, s in q.top) - 1) < 1 and q.top[0][1] >= q.top[1][1] for q in preds)
    rc, out, err = cli("predict", tuned.path, str(data / "test" / "cat"), "--device", "cpu")
    assert rc == 0 and "cat_000" in out, err


def test_extract_taps_the_saved_backbone(tuned, data, tmp_path):
    """extract --weights OUT.safetensors loads the fine-tuned network: codes of the frozen part equal
    the original weights' codes, codes after the freeze point differ."""
    from featx.engine.extract import extract
    from featx.store.codes import CodesFile

    got = {}
    for w in ("none", tuned.path):
        res = extract(
            ModelSettings("timm:test_resnet", w, image_size=32),
            str(data),
            "layer1.0,layer4.0",
            run=RUN,
            cache_dir=str(tmp_path),
            progress=False,
        )
        with CodesFile(res.path) as f:
            got[w] = {k: f.codes(k) for k in ("layer1.0", "layer4.0")}
    assert np.array_equal(got["none"]["layer1.0"], got[tuned.path]["layer1.0"])
    assert not np.allclose(got["none"]["layer4.0"], got[tuned.path]["layer4.0"])


def _load(path):
    from safetensors.torch import load_file

    return load_file(path)


def test_interrupted_run_resumes_bit_identical(data, tmp_path, monkeypatch):
    """The fast in-process version: an exception after the first epoch's checkpoint, then a rerun."""
    import featx.finetune.job as ft

    s = FinetuneSettings(epochs=3, batch_size=4, lr=0.05)
    ref = finetune(MODEL, str(data), s, run=RUN, out=str(tmp_path / "ref"), progress=False)
    real = ft.train_epoch

    def dying(job, epoch, *a, **k):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(job, epoch, *a, **k)

    monkeypatch.setattr(ft, "train_epoch", dying)
    with pytest.raises(KeyboardInterrupt):
        finetune(MODEL, str(data), s, run=RUN, out=str(tmp_path / "cut"), progress=False)
    assert sorted(os.listdir(tmp_path / "cut.ckpt")) == ["epoch-0000.safetensors"]
    monkeypatch.setattr(ft, "train_epoch", real)
    again = finetune(MODEL, str(data), s, run=RUN, out=str(tmp_path / "cut"), progress=False)
    a, b = _load(ref.path), _load(again.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["val_loss"] for h in ref.results["history"]] == [
        h["val_loss"] for h in again.results["history"]
    ]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lp-ft", "bitfit", "lora"])
def test_sigkill_then_resume_equals_uninterrupted(method, data, tmp_path):
    """Kill -9 after the first checkpoint, leave a torn newer checkpoint and a .tmp behind, rerun:
    the model and results are bit-identical to an uninterrupted run (CPU, fp32, same seed), for
    every fine-tune method."""
    argv = [
        "finetune",
        *ARGS,
        "--data",
        str(data),
        "--train-from",
        "depth:0.5",
        "--epochs",
        "6",
        "--lr",
        "0.05",
        "--method",
        method,
    ]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert cli(*argv, "--out", ref, "-q")[0] == 0
    ckpt = tmp_path / "killed.ckpt"
    sigkill_when([*argv, "--out", killed], lambda: (ckpt / "epoch-0000.safetensors").exists())
    assert not (tmp_path / "killed.safetensors").exists(), "the run ended before the kill"
    done = sorted(os.listdir(ckpt))
    assert done and all(n.startswith("epoch-") or n == "lp-head.safetensors" for n in done)
    assert ("lp-head.safetensors" in done) == (method == "lp-ft")
    last = ckpt / [n for n in done if n.startswith("epoch-") and n.endswith(".safetensors")][-1]
    torn = ckpt / "epoch-0005.safetensors"
    torn.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    shutil.copy(last, ckpt / "epoch-0004.safetensors.tmp")
    rc, out, err = cli(*argv, "--out", killed, "--results", tmp_path / "r.json")
    assert rc == 0, err
    assert "resuming from" in err and "set aside the damaged checkpoint" in err
    a, b = _load(str(ref) + ".safetensors"), _load(str(killed) + ".safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from featx.models.saved import finetuned_description

    ra, rb = (finetuned_description(f"{p}.safetensors")["results"] for p in (ref, killed))
    for r in (ra, rb):
        (
            r.pop("seconds"),
            r.pop("fit_seconds"),
            r.pop("threads_measured"),
            r.pop("train_seconds"),
            r.pop("inference_ms_per_image"),
            r.get("lp_probe", {}).pop("seconds", None),
        )  # timings (the thread count itself stays)
        for h in r["history"]:
            h.pop("seconds")
    assert ra == rb


@pytest.mark.parametrize("case", ["freeze point", "one class", "few per class", "no head"])
def test_bad_input_is_one_line(case, data, tmp_path):
    argv = ["finetune", *ARGS, "--data", str(data), "--out", tmp_path / "m", "--epochs", "1"]
    if case == "freeze point":
        argv += ["--train-from", "layer9"]
        needles = ("--train-from layer9", "depth:F", "layer2.0", "global_pool")
    elif case == "one class":
        argv[argv.index("--data") + 1] = str(make_images(tmp_path / "one", classes=("cat",), per_class=4))
        needles = ("single class", "cat")
    elif case == "few per class":
        argv[argv.index("--data") + 1] = str(
            make_images(tmp_path / "few", per_class=1, splits=("train", "test"))
        )
        needles = ("too few images per class for a validation split",)
    else:
        argv[argv.index("--model") + 1] = "squeezenet1_0"
        needles = ("no recognisable classifier head",)
    rc, _out, err = cli(*argv)
    assert_one_line_error(rc, err, code=2, needles=needles)


def test_settings_validated():
    with pytest.raises(UsageError, match="--lr"):
        FinetuneSettings(lr=0)
    with pytest.raises(UsageError, match="--optimizer"):
        FinetuneSettings(optimizer="adam")
    with pytest.raises(UsageError, match="--train-size"):
        FinetuneSettings(train_size="lots")
    with pytest.raises(UsageError, match="--warmup"):
        FinetuneSettings(epochs=2, warmup=3)


def test_settings_validated_grid_and_epochs():
    s = FinetuneSettings(lr=(0.01, 0.03, 0.01), augment="none,light")
    assert s.lrs == (0.01, 0.03) and s.augments == ("none", "light") and len(s.points()) == 4
    assert (
        FinetuneSettings(augment=False).augment == "none"
        and FinetuneSettings(augment=True).augment == "default"
    )
    assert FinetuneSettings(lr=[0.02]).lr == 0.02
    for kw, flag in (
        ({"epochs": "auto", "max_epochs": 2}, "--max-epochs 2"),
        ({"augment": ""}, "--augment"),
        ({"augment": "none,mirror"}, "unknown augmentation 'mirror'"),
        ({"lr": (0.01, 0.0)}, "--lr"),
        ({"lr": -1.0}, "--lr"),
        ({"threads": 0}, "--threads"),
        ({"epochs": "many"}, "--epochs"),
    ):
        with pytest.raises(UsageError, match=flag):
            FinetuneSettings(**kw)
    # an unchanged recipe keeps the key earlier releases gave it
    assert (
        FinetuneSettings(epochs=5).key_dict()["augment"] is True
        and "max_epochs" not in FinetuneSettings(epochs=5).key_dict()
    )


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--epochs", "auto", "--max-epochs", "2"], ("--max-epochs 2", "patience")),
        (["--augment", ","], ("--augment", "give one or more of none, light, default")),
        (["--augment", "none,mirror"], ("--augment", "unknown augmentation 'mirror'")),
        (["--lr", "0.01,0"], ("--lr", "above 0")),
        (["--lr", "0.01,fast"], ("--lr", "comma-separated numbers")),
    ],
)
def test_bad_recipe_options_are_one_line(argv, needles, data, tmp_path):
    rc, _out, err = cli("finetune", *ARGS, "--data", str(data), "--out", tmp_path / "m", *argv)
    assert_one_line_error(rc, err, code=2, needles=needles)
    bench = [f"--finetune-{a[2:]}" if a.startswith("--") else a for a in argv]
    rc, _out, err = cli(
        "bench",
        "--model",
        "timm:test_resnet",
        "--weights",
        "none",
        "--data",
        str(data),
        "--finetune",
        "depth:1.0",
        "--out",
        tmp_path / "b",
        *bench,
    )
    assert_one_line_error(rc, err, code=2, needles=(needles[0].replace("--", "--finetune-", 1), *needles[1:]))


def test_stopping_rule():
    from featx.finetune.settings import MIN_DELTA, PATIENCE
    from featx.finetune.train import converged, epochs_without_improvement

    h = lambda *pairs: [{"val_accuracy": a, "val_loss": v} for a, v in pairs]  # noqa: E731
    assert epochs_without_improvement(h((0.5, 1.0), (0.6, 1.0), (0.6, 0.9))) == 0  # accuracy, then loss
    assert (
        epochs_without_improvement(h((0.5, 1.0), (0.5, 1.0 - MIN_DELTA / 2), (0.4, 0.5))) == 2
    )  # too small, lower acc
    assert not converged(h(*[(0.5 + i / 100, 1.0) for i in range(10)]))  # still rising at the end
    assert converged(h((0.9, 0.3), *[(0.8, 0.5)] * PATIENCE))


def test_auto_epochs_stop_when_validation_stops_improving(data, monkeypatch):
    """A flat validation score: epoch 1 is the best, PATIENCE more epochs show no gain, the run stops
    (converged), well before the cap."""
    import featx.finetune.job as ft
    from featx.finetune.settings import PATIENCE

    monkeypatch.setattr(ft, "val_scores", lambda logits, y: (0.5, 1.0))
    s = FinetuneSettings(epochs="auto", max_epochs=20, batch_size=4, threads=1)
    r = finetune(MODEL, str(data), s, run=RUN, progress=False).results
    assert r["epochs_run"] == 1 + PATIENCE and r["epoch"] == 1 and r["converged"] and r["epochs_cap"] == 20
    assert r["threads"] == 1


def test_fixed_epochs_still_improving_is_not_converged(tuned):
    r = tuned.results
    assert r["converged"] is False  # 2 epochs < PATIENCE: it cannot have seen validation stop improving
    assert "NOT CONVERGED" in tuned.summary()


def test_successive_halving_keeps_the_best_third_and_finishes_one():
    from featx.finetune.search import ETA, SCREEN_EPOCHS, successive_halving

    calls = []
    quality = [0.1, 0.9, 0.5, 0.3, 0.8, 0.2]

    def advance(i, until):
        calls.append((i, until))
        return {"best": [quality[i], -1.0]}

    winner, rungs = successive_halving(6, advance, cap=30)
    assert winner == 1
    assert rungs[0] == {"epochs": SCREEN_EPOCHS, "points": list(range(6)), "kept": [1, 4]}
    assert rungs[1] == {"epochs": SCREEN_EPOCHS * ETA, "points": [1, 4], "kept": [1]}
    assert calls[-1] == (1, None)


def test_grid_chooses_on_validation_reads_test_once_and_resumes(data, tmp_path, monkeypatch):
    """Two augmentations x two learning rates: successive halving on validation, the test split read
    once (for the chosen point), every point checkpointed; a run killed inside the search resumes
    to the uninterrupted result."""
    import featx.finetune.job as ft
    from featx.sources.spec import open_source

    s = FinetuneSettings(epochs=4, batch_size=4, augment="none,light", lr=(0.01, 0.05), threads=1)
    ds = open_source(str(data))
    reads: list[int] = []
    inner = ds.loader
    ds.loader = lambda i: (reads.append(i), inner(i))[1]
    ref = finetune(MODEL, ds, s, run=RUN, out=str(tmp_path / "ref"), progress=False)
    r = ref.results
    test = set(np.flatnonzero(ds.splits == "test").tolist())
    assert sum(i in test for i in reads) == len(test)  # once
    assert len(r["grid"]) == 4 and sum(g["chosen"] for g in r["grid"]) == 1
    chosen = next(g for g in r["grid"] if g["chosen"])
    assert (r["augment"], r["lr"]) == (chosen["augment"], chosen["lr"]) and r["epochs_run"] == 4
    assert r["rungs"][0]["epochs"] == 2 and len(r["rungs"][0]["kept"]) == 2
    assert r["screening_epochs"] == sum(g["epochs_run"] for g in r["grid"]) - 4

    real, calls = ft.train_epoch, [0]

    def dying(job, epoch, *a, **k):
        calls[0] += 1
        if calls[0] == 6:  # inside the first rung, the third point's second epoch
            raise KeyboardInterrupt
        return real(job, epoch, *a, **k)

    monkeypatch.setattr(ft, "train_epoch", dying)
    with pytest.raises(KeyboardInterrupt):
        finetune(MODEL, str(data), s, run=RUN, out=str(tmp_path / "cut"), progress=False)
    assert len(os.listdir(tmp_path / "cut.ckpt")) == 3  # a folder per grid point started
    monkeypatch.setattr(ft, "train_epoch", real)
    again = finetune(MODEL, str(data), s, run=RUN, out=str(tmp_path / "cut"), progress=False)
    a, b = _load(ref.path), _load(again.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.results["grid"] == r["grid"]


def test_light_augmentation_keeps_most_of_the_image_and_never_flips():
    from featx.finetune.data import AUGMENT_PARAMS, crop_box

    scale, ratio, flip = AUGMENT_PARAMS["light"]
    assert not flip and AUGMENT_PARAMS["default"][2]
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = crop_box(100, 100, rng, scale, ratio)
        assert h * w >= 0.78 * 100 * 100 and 0 <= top <= 100 - h and 0 <= left <= 100 - w
