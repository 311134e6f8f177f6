"""Fine-tuning from a freeze point: the large-data half of the four transfer cases, measured.

`finetune(model, data, settings)` trains a network from `settings.train_from` on (a point on the
same depth axis as taps: a module name, or `depth:F` resolved by `featx.models.taps.resolve_layers`;
`depth:0` trains everything, `depth:1.0` only the new head), with a new linear head sized to the
classes, and evaluates it as `featx fit` evaluates a probe:

- training images: the same train-size subset and seed as `fit` (`classify.select_rows` on the
  dataset's samples), validation: the file's val split, else the same seeded hold-out of train;
  `max_images` caps the training images further (a seeded stratified subset);
- the epoch is chosen on validation (accuracy, then loss, then the earlier epoch); the test split
  is read once, at the end, on the chosen checkpoint;
- frozen part: no gradients, and its modules (batch norm included) stay in eval mode, so its
  ImageNet statistics do not move;
- recipe: SGD with momentum (or AdamW), linear warm-up then cosine decay per step, the pretrained
  layers at `lr * backbone_lr_mult`, weight decay on weights (not on biases and norms),
  RandomResizedCrop + horizontal flip built from the weights' own `Preprocess` for training, the
  weights' eval transform for validation and test; bf16 autocast and channels_last on CUDA only;
- crash safety: a checkpoint per epoch (`OUT.ckpt/epoch-NNN.safetensors`: weights, optimizer
  tensors and RNG state as tensors, the rest as JSON in the header), written atomically; a rerun
  resumes from the last complete one. Augmentation and data order are functions of (seed, epoch,
  image), so a resumed run ends bit-identical to an uninterrupted one on CPU at fp32;
- the saved model `OUT.safetensors` is the whole network's state dict in the layout
  `featx.models.build` loads (`extract --weights OUT.safetensors` taps it again) with a JSON
  description in its header (`featx predict OUT` classifies with it).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time

import numpy as np

from featx import __version__
from featx.engine.cost import count_params
from featx.errors import UsageError
from featx.finetune.checkpoints import (
    OutLock,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_checkpoint_file,
    save_checkpoint,
)
from featx.finetune.data import batch_positions, select_samples
from featx.finetune.freeze import apply_freeze, find_head, replace_head, resolve_freeze_point
from featx.finetune.methods import adapt, lp_head, plain_module, require_peft
from featx.finetune.saved import save_model
from featx.finetune.search import successive_halving
from featx.finetune.settings import PATIENCE, FinetuneResult, FinetuneSettings
from featx.finetune.threads import choose_threads, torch_threads
from featx.finetune.train import TrainJob, converged, make_optimizer, predict_logits, train_epoch, val_scores

log = logging.getLogger("featx")


def _precision(run, device):
    """bf16 autocast on CUDA (`auto` or `bf16`), fp32 elsewhere; fp16 would need loss scaling."""
    import torch

    if run.precision == "fp16" or (run.precision == "bf16" and device.type != "cuda"):
        raise UsageError(
            f"--precision {run.precision}: fine-tuning uses bf16 autocast on CUDA only; use auto, fp32 "
            f"or (on CUDA) bf16"
        )
    if device.type == "cuda" and run.precision in ("auto", "bf16"):
        return torch.bfloat16
    return None


def _prepare(model, data, settings, data_options):
    """(dataset, rows, resolved plan): everything before the network."""
    from featx.models.plan import resolve
    from featx.sources.autogroups import OPTION, threshold_of
    from featx.sources.spec import open_source

    if threshold_of(getattr(data_options, "group_by", None)) is not None:  # auto groups come from codes
        raise UsageError(
            f"{OPTION}: fine-tuning computes no codes to find near-copies in; use --group-by REGEX "
            "or a CSV group column"
        )
    if settings.method == "lora":  # before the data is read: the missing library is the first thing to fix
        require_peft()
    ds = open_source(data, data_options) if isinstance(data, str) else data
    if not ds.labelled:
        raise UsageError(
            f"--data {ds.spec}: unlabelled images (no classes); finetune needs labels: give class "
            f"folders or a CSV with a label column"
        )
    rows = select_samples(ds, settings)
    return ds, rows, resolve(model)


def build_network(plan, ds, settings, device):
    """(backbone, plan, freeze point, head name, trainable params, head params): a fresh network
    with a new head, frozen at `settings.train_from`, adapted by `settings.method`
    (`backbone.module` is the network to train: LoRA's wraps the original), on `device`."""
    import dataclasses

    import torch

    from featx.engine.compute import load_backbone

    backbone, plan = load_backbone(plan)
    module = backbone.module
    head = find_head(module)
    point = resolve_freeze_point(plan.taps, module, settings.train_from, str(plan.model))
    replace_head(module, head, len(ds.classes), settings.seed)
    trained, head_params = apply_freeze(module, point, head)
    module, trained, head_params = adapt(module, point, head, settings, trained, head_params)
    backbone = dataclasses.replace(backbone, module=module)
    module.to(device)
    if device.type == "cuda":
        module.to(memory_format=torch.channels_last)
    return backbone, plan, point, head, trained, head_params


def _fingerprint(backbone, ds, rows, settings, device, amp) -> str:
    parts = {
        "featx": __version__,
        "model": str(backbone.name),
        "weights": backbone.weights.ident,
        "preprocess": backbone.preprocess.to_dict(),
        "data": ds.fingerprint,
        "settings": settings.to_dict(),
        "rows": [r.tolist() for r in (rows.train, rows.val, rows.test)],
        "device": device.type,
        "amp": str(amp),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _estimate(job: TrainJob, start_epoch: int):
    """On the CPU, log the run time estimated from the first timed batch (once)."""
    if job.device.type != "cpu":
        return None
    done = [False]

    def on_batch(b: int, n: int, seconds: float) -> None:
        if done[0]:
            return
        done[0] = True
        epochs = job.settings.schedule_epochs - start_epoch
        # an evaluation batch counted as a training batch: measured about equal for head-only training,
        # a third of one for full fine-tuning on this CPU, so the estimate errs long, not short
        evals = (len(job.rows.val) * epochs + len(job.rows.test)) / max(1, job.settings.batch_size)
        total = seconds * (n * epochs + evals)
        log.info(
            "fine-tuning on the CPU: about %.0f min for %s%d epochs of %d images (first batch %.2f s); "
            "--max-images caps the training images",
            total / 60,
            "up to " if job.settings.auto else "",
            epochs,
            len(job.rows.train),
            seconds,
        )

    return on_batch


def _run_epochs(
    job: TrainJob,
    folder: str | None,
    fingerprint: str,
    progress: bool,
    state: dict | None = None,
    until: int | None = None,
    threads: tuple[int, dict] = (1, {}),
) -> dict:
    """Train the epochs not yet done, up to `until` (default: the budget), stopping early under
    `epochs="auto"` once validation stops improving; continues `state` (in memory) or the newest
    checkpoint in `folder`. Returns the state (history, best epoch, its weights)."""
    from tqdm.auto import tqdm

    s = job.settings
    until = s.schedule_epochs if until is None else min(until, s.schedule_epochs)
    if state is None:
        state = {"fingerprint": fingerprint, "history": [], "best_epoch": None, "best": None}
        found = (
            latest_checkpoint(folder, fingerprint, job.module, job.optimizer, s.schedule_epochs)
            if folder
            else None
        )
        if found:
            state = load_checkpoint(found, job.module, job.optimizer)
            log.info(
                "resuming from %s (epoch %d of %s%d done)",
                found.path,
                len(state["history"]),
                "up to " if s.auto else "",
                s.schedule_epochs,
            )
    state.setdefault("threads", threads[0])  # checkpointed: a resumed run keeps the count it started with
    state.setdefault("threads_measured", {str(k): round(v, 2) for k, v in threads[1].items()})
    start = len(state["history"])
    if start >= until or (s.auto and converged(state["history"])):
        return state
    n_batches = len(batch_positions(len(job.rows.train), s.batch_size))
    bar = tqdm(
        total=until * n_batches,
        initial=start * n_batches,
        unit="batch",
        desc="finetune",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    on_batch = _estimate(job, start) if start == 0 else None
    try:
        for epoch in range(start, until):
            if s.auto and converged(state["history"]):
                log.info("validation stopped improving: %d epochs without a gain", PATIENCE)
                break
            t0 = time.perf_counter()
            loss = train_epoch(job, epoch, bar, on_batch)
            acc, vloss = val_scores(*predict_logits(job, job.rows.val))
            state["history"].append(
                {
                    "epoch": epoch + 1,
                    "train_loss": loss,
                    "val_accuracy": acc,
                    "val_loss": vloss,
                    "seconds": round(time.perf_counter() - t0, 3),
                }
            )
            if state["best"] is None or (acc, -vloss) > tuple(state["best"]):
                state["best"], state["best_epoch"] = [acc, -vloss], epoch
            log.info(
                "epoch %d/%s%d: train loss %.4f, val accuracy %.4f, val loss %.4f",
                epoch + 1,
                "up to " if s.auto else "",
                s.schedule_epochs,
                loss,
                acc,
                vloss,
            )
            if folder:
                save_checkpoint(
                    folder,
                    epoch,
                    job.module,
                    job.optimizer,
                    {k: v for k, v in state.items() if k != "best_weights"},
                )
                prune_checkpoints(folder, {epoch, state["best_epoch"]})
            if state["best_epoch"] == epoch:
                state["best_weights"] = {
                    k: v.detach().cpu().clone() for k, v in job.module.state_dict().items()
                }
    finally:
        bar.close()
    return state


def _best_weights(state: dict, folder: str | None):
    if "best_weights" in state:
        return state["best_weights"]
    tensors, _ = read_checkpoint_file(
        os.path.join(folder, f"epoch-{state['best_epoch']:04d}.safetensors"), "featx_checkpoint"
    )
    return {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}


def finetune(
    model,
    data,
    settings: FinetuneSettings | None = None,
    *,
    run=None,
    data_options=None,
    out: str | None = None,
    checkpoint_dir: str | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune `model` (ModelSettings or a name) on `data` (a --data spec or a `featx.sources.dataset.Dataset`)
    from `settings.train_from` on; evaluate the epoch chosen on validation once on the test split.
    A grid recipe (several `augment` / `lr` values) is searched on validation first
    (featx.finetune.search); only the chosen point's chosen epoch sees the test split.

    `out`: save the model as OUT.safetensors (and checkpoint to OUT.ckpt/ while training, resuming
    from there after a crash; a grid point per subfolder; a second run on the same `out` meanwhile is
    refused); `checkpoint_dir` overrides that folder (checkpoints without `out` too).
    """
    with OutLock(_target(out)) if out else contextlib.nullcontext():
        return _finetune(
            model,
            data,
            settings,
            run=run,
            data_options=data_options,
            out=out,
            checkpoint_dir=checkpoint_dir,
            progress=progress,
        )


def _finetune(
    model,
    data,
    settings: FinetuneSettings | None = None,
    *,
    run=None,
    data_options=None,
    out: str | None = None,
    checkpoint_dir: str | None = None,
    progress: bool = True,
) -> FinetuneResult:
    from featx.engine.compute import resolve_device, resolve_workers
    from featx.settings import RunSettings, as_model

    settings, run, t0 = settings or FinetuneSettings(), run or RunSettings(workers=0), time.perf_counter()
    target = _target(out)
    ds, rows, plan = _prepare(as_model(model), data, settings, data_options)
    device = resolve_device(run.device)
    amp = _precision(run, device)
    workers = 0 if run.workers == "auto" and device.type == "cpu" else resolve_workers(run.workers)
    folder = checkpoint_dir or (target[: -len(".safetensors")] + ".ckpt" if target else None)
    points = settings.points()
    runs: dict[int, dict] = {}  # grid point -> {"job", "folder", "fingerprint", "state", "backbone", ...}
    memo: dict = {}  # LP-FT: its probe ((head tensors, what it measured), shared by the grid's points), its val, weights

    def open_point(i: int) -> dict:
        if i not in runs:
            s = points[i]
            backbone, resolved, point, head, trained, head_params = build_network(plan, ds, s, device)
            job = TrainJob(
                backbone.module,
                make_optimizer(s, trained, head_params),
                point,
                ds,
                rows,
                backbone.preprocess,
                s,
                device,
                amp,
                workers,
            )
            sub = folder if len(points) == 1 or not folder else os.path.join(folder, _point_dir(i, s))
            if sub:
                os.makedirs(sub, exist_ok=True)
            if s.method == "lp-ft":  # one probe for every grid point (same rows, same features)
                if folder:
                    os.makedirs(folder, exist_ok=True)
                lp_head(job, head, folder, memo)
                if "val" not in memo:  # "epoch 0": the probe alone, a candidate like every epoch
                    memo["val"] = val_scores(*predict_logits(job, rows.val))
                    memo["weights"] = {
                        k: v.detach().cpu().clone() for k, v in job.module.state_dict().items()
                    }
            runs[i] = {
                "job": job,
                "folder": sub,
                "fingerprint": _fingerprint(backbone, ds, rows, s, device, amp),
                "state": None,
                "backbone": backbone,
                "plan": resolved,
                "point": point,
                "head": head,
            }
        return runs[i]

    def advance(i: int, until: int | None) -> dict:
        r = open_point(i)
        r["state"] = _run_epochs(
            r["job"], r["folder"], r["fingerprint"], progress, r["state"], until, (threads, rates)
        )
        return r["state"]

    threads, rates = _threads(settings, open_point(0), folder, device)
    with torch_threads(threads) if device.type == "cpu" else contextlib.nullcontext():
        if len(points) == 1:
            winner, rungs = 0, []
            advance(0, None)
        else:
            winner, rungs = successive_halving(len(points), advance, settings.schedule_epochs)
        w = runs[winner]
        job, module = w["job"], w["job"].module
        best = w["state"]["best"]
        probe_wins = "val" in memo and (memo["val"][0], -memo["val"][1]) >= tuple(best)  # ties: the earlier
        module.load_state_dict(memo["weights"] if probe_wins else _best_weights(w["state"], w["folder"]))
        train_seconds = time.perf_counter() - t0
        logits, y_test = predict_logits(job, rows.test)  # the test split's first and only read
    grid = (
        [_grid_entry(points[i], runs[i]["state"], i == winner) for i in sorted(runs)]
        if len(points) > 1
        else []
    )
    results = _results(
        job,
        w["plan"],
        w["backbone"],
        w["point"],
        w["head"],
        w["state"],
        logits,
        y_test,
        time.perf_counter() - t0,
    )
    # timed after _results counted the trainable parameters (merging LoRA drops its adapters), at
    # the process's own thread count, as extraction runs
    plain = plain_module(module, settings.method)  # LoRA: adapters merged into the weights
    timed = _inference_cost(plain, job, run)
    results.update(
        grid=grid,
        rungs=rungs,
        threads=w["state"]["threads"],
        threads_measured=w["state"]["threads_measured"],
        screening_epochs=sum(g["epochs_run"] for g in grid if not g["chosen"]),
        train_seconds=round(train_seconds, 3),
        total_params=count_params(plain),
        **timed,
    )
    if settings.method == "lora":
        results.update(lora_rank=settings.lora_rank, lora_alpha=settings.lora_alpha)
    if "probe" in memo:
        results["lp_probe"] = {**memo["probe"][1], "val_loss": memo["val"][1], "chosen": probe_wins}
        if probe_wins:  # fine-tuning never beat the probe on validation: the answer is the probe itself
            results.update(epoch=0, val_score=memo["val"][0], val_loss=memo["val"][1])
    module = plain.to("cpu").eval()
    if target:
        save_model(target, module, w["backbone"], w["head"], ds.classes, points[winner], results)
        if folder and not checkpoint_dir:
            shutil.rmtree(folder, ignore_errors=True)
    return FinetuneResult(results, target, module)


def _inference_cost(module, job: TrainJob, run) -> dict:
    """Milliseconds per image of the fine-tuned network's forward pass, as training feeds it, on the
    job's device (featx.engine.cost)."""
    import torch

    from featx.engine.cost import inference_batch, inference_ms

    batch = inference_batch(run.batch_size)
    module.eval()

    def forward(x):
        with torch.autocast(job.device.type, dtype=job.amp, enabled=job.amp is not None):
            return module(job.inputs(x))

    return {
        "inference_ms_per_image": inference_ms(forward, job.pre.crop_size, batch, job.device),
        "inference_batch_size": batch,
    }


def _point_dir(i: int, s: FinetuneSettings) -> str:
    return f"{i:02d}-{s.augment}-lr{s.lr:g}"


def _grid_entry(s: FinetuneSettings, state: dict | None, chosen: bool) -> dict:
    h = (state or {}).get("history") or []
    best = (state or {}).get("best") or [0.0, -math.inf]
    return {
        "augment": s.augment,
        "lr": s.lr,
        "epochs_run": len(h),
        "val_accuracy": best[0],
        "val_loss": -best[1],
        "chosen": chosen,
    }


def _threads(settings: FinetuneSettings, first: dict, folder: str | None, device) -> tuple[int, dict]:
    """The CPU thread count: the one a checkpointed run started with (a resumed run keeps it),
    `settings.threads` when given, else the faster of 1 and all cores measured here
    (featx.finetune.threads)."""
    if device.type != "cpu":
        return 1, {}
    if folder:
        for path in sorted(glob.glob(os.path.join(folder, "**", "epoch-*.safetensors"), recursive=True)):
            got = read_checkpoint_file(path)
            if got and isinstance(got[1].get("threads"), int):
                return got[1]["threads"], {
                    int(k): v for k, v in (got[1].get("threads_measured") or {}).items()
                }
    if settings.threads != "auto":
        return settings.threads, {}
    job = first["job"]
    key = (
        str(first["backbone"].name),
        first["point"].spec,
        job.pre.crop_size,
        settings.batch_size,
        len(job.ds.classes),
    )
    return choose_threads(
        job.module,
        first["point"],
        job.pre.crop_size,
        settings.batch_size,
        len(job.ds.classes),
        key + (settings.method,),
        settings.method,
    )


def _target(out: str | None) -> str | None:
    from featx.classifiers.description import classifier_path

    return classifier_path(out) if out else None


def _results(job: TrainJob, plan, backbone, point, head, state, logits, y_test, seconds: float) -> dict:
    from featx.classifiers.fit import metrics
    from featx.stats import pack_correct, wilson_interval

    rows, s, ds = job.rows, job.settings, job.ds
    y_pred = logits.argmax(1) if len(logits) else np.empty(0, np.int64)
    low, high = wilson_interval(int(np.sum(y_pred == y_test)), len(y_test))
    trainable = sum(p.numel() for p in job.module.parameters() if p.requires_grad)
    best = state["best_epoch"]
    return {
        "kind": "finetune",
        "model": str(backbone.name),
        "weights": backbone.weights.spec,
        "train_from": point.spec,
        "train_from_module": point.describe(),
        "train_from_depth": point.depth,
        "frozen_modules": len(point.frozen),
        "trainable_params": int(trainable),
        "method": s.method,
        "head": head,
        "recipe": s.to_dict(),
        "epoch": best + 1,
        "epochs_run": len(state["history"]),
        "history": state["history"],
        "converged": converged(state["history"]),
        "epochs_cap": s.schedule_epochs,
        "augment": s.augment,
        "lr": s.lr,
        "seed": s.seed,
        "train_size": len(rows.train) + len(rows.val),
        "train_size_spec": s.train_size,
        "n_fit": len(rows.train),
        "n_val": len(rows.val),
        "n_test": int(len(y_test)),
        "val_source": rows.val_source,
        "test_split": rows.test_split,
        "val_score": state["best"][0],
        "val_loss": -state["best"][1],
        **metrics(y_test, y_pred, ds.classes),
        "test_ci_low": low,
        "test_ci_high": high,
        "test_correct": pack_correct(y_pred == y_test),
        "seconds": round(seconds, 3),
        "fit_seconds": round(seconds, 3),
        "device": job.device.type,
        "precision": "bf16" if job.amp is not None else "fp32",
        "preprocessing": backbone.preprocess.to_dict(),
        "image_size": backbone.preprocess.crop_size,
        "resize_size": backbone.preprocess.resize_size,
        "classes": list(ds.classes),
    }
