"""One training epoch, evaluation logits and the validation score."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from featx.finetune.data import TrainImages, batch_loader, batch_positions
from featx.finetune.freeze import FreezePoint, train_mode
from featx.finetune.settings import MIN_DELTA, PATIENCE, FinetuneSettings


def make_optimizer(settings: FinetuneSettings, backbone: list, head: list):
    """SGD or AdamW over the head (at lr) and the trained backbone parameters (at lr *
    backbone_lr_mult; BitFit's and LoRA's few adapted parameters at lr), weight decay on matrices only."""
    import torch

    def groups(params, lr):
        decay = [p for p in params if p.dim() > 1]
        rest = [p for p in params if p.dim() <= 1]
        return [
            {"params": decay, "lr": lr, "base_lr": lr, "weight_decay": settings.weight_decay},
            {"params": rest, "lr": lr, "base_lr": lr, "weight_decay": 0.0},
        ]

    pg = [
        g
        for g in groups(
            backbone,
            settings.lr * settings.adapted_lr_mult,
        )
        + groups(head, settings.lr)
        if g["params"]
    ]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(pg, lr=settings.lr, momentum=settings.momentum, nesterov=False)
    return torch.optim.AdamW(pg, lr=settings.lr)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@dataclass
class TrainJob:
    """What one run's epochs share."""

    module: object
    optimizer: object
    point: FreezePoint
    ds: object
    rows: object
    pre: object
    settings: FinetuneSettings
    device: object
    amp: object  # torch dtype for autocast, or None
    workers: int

    def inputs(self, x):
        import torch

        x = x.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return self.pre.normalize(x)


def train_epoch(job: TrainJob, epoch: int, bar=None, on_batch=None) -> float:
    """One epoch in the order of (seed, epoch); returns the mean training loss."""
    import torch

    s = job.settings
    torch.manual_seed(s.seed * 100_003 + epoch)  # dropout in the trained part: a function of (seed, epoch)
    order = job.rows.train[np.random.default_rng([s.seed, epoch, 7]).permutation(len(job.rows.train))]
    batches = batch_positions(len(order), s.batch_size)
    total, warm = s.schedule_epochs * len(batches), s.warmup * len(batches)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=s.label_smoothing)
    train_mode(job.module, job.point, s.method)
    images = TrainImages(job.ds, order, job.pre, s.seed, epoch, augment=s.augment)
    losses, count = 0.0, 0
    for b, (y, x) in enumerate(batch_loader(images, batches, job.workers)):
        t0 = time.perf_counter()
        for g in job.optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(epoch * len(batches) + b, total, warm)
        if y is None:
            continue
        y = y.to(job.device)
        with torch.autocast(job.device.type, dtype=job.amp, enabled=job.amp is not None):
            loss = loss_fn(job.module(job.inputs(x)).float(), y)
        job.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        job.optimizer.step()
        losses, count = losses + loss.item() * len(y), count + len(y)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        if on_batch is not None:
            on_batch(b, len(batches), time.perf_counter() - t0)
    return losses / max(count, 1)


def predict_logits(job: TrainJob, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, K] float32, labels [N]) of `rows` with the eval transform (undecodable images left out)."""
    import torch

    job.module.eval()
    outs, ys = [], []
    batches = [
        list(range(s, min(len(rows), s + job.settings.batch_size)))
        for s in range(0, len(rows), job.settings.batch_size)
    ]
    with torch.inference_mode():
        for y, x in batch_loader(TrainImages(job.ds, rows, job.pre, job.settings.seed), batches, job.workers):
            if y is None:
                continue
            with torch.autocast(job.device.type, dtype=job.amp, enabled=job.amp is not None):
                outs.append(job.module(job.inputs(x)).float().cpu().numpy())
            ys.append(y.numpy())
    k = len(job.ds.classes)
    return (np.concatenate(outs) if outs else np.empty((0, k), np.float32)), (
        np.concatenate(ys) if ys else np.empty(0, np.int64)
    )


def val_scores(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of logits."""
    if not len(y):
        return 0.0, math.inf
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(np.mean(logits.argmax(1) == y)), float(-logp[np.arange(len(y)), y].mean())


def improves(acc: float, loss: float, best_acc: float, best_loss: float) -> bool:
    """Whether an epoch's validation (accuracy, loss) improves on the best so far: higher accuracy,
    or the same accuracy with a loss lower by more than MIN_DELTA."""
    return acc > best_acc or (acc == best_acc and loss < best_loss - MIN_DELTA)


def epochs_without_improvement(history: list[dict]) -> int:
    """How many epochs at the end of `history` did not improve on the best before them."""
    best, since = None, 0
    for h in history:
        if best is None or improves(h["val_accuracy"], h["val_loss"], *best):
            best, since = (h["val_accuracy"], h["val_loss"]), 0
        else:
            since += 1
    return since


def converged(history: list[dict]) -> bool:
    """Validation stopped improving: the last PATIENCE epochs did not improve on the best."""
    return epochs_without_improvement(history) >= PATIENCE
