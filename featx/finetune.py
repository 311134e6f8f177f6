"""Fine-tuning from a freeze point: the large-data half of the four transfer cases, measured.

`finetune(model, data, settings)` trains a network from `settings.train_from` on (a point on the
same depth axis as taps: a module name, or `depth:F` resolved by `featx.taps.resolve_layers`;
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
  `featx.models` loads (`extract --weights OUT.safetensors` taps it again) with a JSON
  description in its header (`featx predict OUT` classifies with it).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from featx import __version__
from featx.errors import FeatxError, UsageError
from featx.settings import _bad  # one table (settings.FLAGS) maps fields to their flags

log = logging.getLogger("featx")

HEADER_KEY = "featx_finetuned"
FORMAT = 1
OPTIMIZERS = ("sgd", "adamw")
MIN_VAL_PER_CLASS = 1  # every class must have validation images, or the epoch choice ignores it
_RRC_SCALE, _RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop defaults


def _number(name: str, value, low: float, high: float = math.inf, integer: bool = False, low_open: bool = False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value > high:
        _bad(name, value, f"use {'an integer' if integer else 'a number'} from {low:g}" + (f" to {high:g}" if high < math.inf else ""))
    if value < low or (low_open and value == low):
        _bad(name, value, f"use a value {'above' if low_open else 'from'} {low:g}")


@dataclass(frozen=True)
class FinetuneSettings:
    """The recipe of one fine-tune (defaults: see the README's `featx finetune` section)."""

    train_from: str = "depth:0.5"
    epochs: int = 10
    lr: float = 0.01  # the new head's learning rate (peak of the schedule)
    backbone_lr_mult: float = 0.1  # pretrained layers train at lr * this
    weight_decay: float = 1e-4
    optimizer: str = "sgd"
    momentum: float = 0.9  # sgd only
    warmup: int = 1  # epochs of linear warm-up (0: none)
    batch_size: int = 32
    label_smoothing: float = 0.0
    seed: int = 0
    train_size: str = "all"
    max_images: int | None = None
    val_fraction: float = 0.2
    augment: bool = True  # RandomResizedCrop + flip; False: the eval transform for training too

    def __post_init__(self) -> None:
        if not isinstance(self.train_from, str) or not self.train_from.strip():
            _bad("train_from", self.train_from, "use depth:F (F in [0, 1]) or a module name (featx layers MODEL)")
        _number("epochs", self.epochs, 1, 10_000, integer=True)
        _number("lr", self.lr, 0.0, 10.0, low_open=True)
        _number("backbone_lr_mult", self.backbone_lr_mult, 0.0, 100.0)
        _number("weight_decay", self.weight_decay, 0.0, 1.0)
        if self.optimizer not in OPTIMIZERS:
            _bad("optimizer", self.optimizer, f"use one of {', '.join(OPTIMIZERS)}")
        _number("momentum", self.momentum, 0.0, 0.999)
        _number("warmup", self.warmup, 0, self.epochs if isinstance(self.epochs, int) else 0, integer=True)
        _number("batch_size", self.batch_size, 2, 65536, integer=True)
        _number("label_smoothing", self.label_smoothing, 0.0, 0.99)
        _number("seed", self.seed, 0, 2**31 - 1, integer=True)
        from featx.classify import parse_train_size

        parse_train_size(self.train_size)
        object.__setattr__(self, "train_size", str(self.train_size))
        if self.max_images is not None:
            _number("max_images", self.max_images, 2, integer=True)
        if not isinstance(self.val_fraction, float) or not 0.0 < self.val_fraction < 1.0:
            _bad("val_fraction", self.val_fraction, "use a fraction between 0 and 1")
        if not isinstance(self.augment, bool):
            _bad("augment", self.augment, "use True or False")

    def to_dict(self) -> dict:
        return asdict(self)

    def recipe_text(self) -> str:
        """The recipe in one line, for reports."""
        opt = f"sgd (momentum {self.momentum:g})" if self.optimizer == "sgd" else self.optimizer
        cap = f", at most {self.max_images} training images" if self.max_images else ""
        return (f"{opt}, {self.epochs} epochs ({self.warmup} warm-up, cosine), lr {self.lr:g} for the head and "
                f"{self.lr * self.backbone_lr_mult:g} for pretrained layers, weight decay {self.weight_decay:g}, batch "
                f"{self.batch_size}, {'RandomResizedCrop + flip' if self.augment else 'no augmentation'}{cap}; the "
                f"epoch chosen on validation")  # fmt: skip


@dataclass
class FinetuneResult:
    """What a fine-tune measured (`results`, the same fields as a `fit` cell plus the recipe, the
    chosen epoch, the resolved freeze point and the history) and where the model went."""

    results: dict
    path: str | None = None  # OUT.safetensors, when saved
    module: object = field(default=None, repr=False)  # the chosen checkpoint's network (CPU, eval)

    def summary(self) -> str:
        r = self.results
        return (f"{r['model']} from {r['train_from']} ({r['train_from_module']}): accuracy {r['accuracy']:.4f} "
                f"(95% CI {r['test_ci_low']:.3f}-{r['test_ci_high']:.3f}, {r['n_test']} test images), balanced "
                f"{r['balanced_accuracy']:.4f}, epoch {r['epoch']}/{r['epochs_run']} chosen on {r['val_source']} "
                f"(val acc {r['val_score']:.4f}), train size {r['train_size']}, {r['seconds']:.1f} s")  # fmt: skip


# -- the freeze point ----------------------------------------------------------------------------


def find_head(module) -> str:
    """The classifier head's module name: the last nn.Linear, whose weight and bias end the
    state dict (the layout `featx.models` reloads with another number of classes)."""
    import torch.nn as nn

    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    keys = list(module.state_dict())
    if not linears or module.get_submodule(linears[-1]).bias is None or keys[-2:] != [f"{linears[-1]}.weight", f"{linears[-1]}.bias"]:
        raise UsageError(f"{type(module).__name__} has no recognisable classifier head (a final nn.Linear with a bias, "
                         f"last in its state dict); featx finetune replaces that head, so use another model")  # fmt: skip
    return linears[-1]


def replace_head(module, head: str, n_classes: int, seed: int) -> None:
    import torch
    import torch.nn as nn

    old = module.get_submodule(head)
    parent, _, name = head.rpartition(".")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = nn.Linear(old.in_features, n_classes)
    setattr(module.get_submodule(parent) if parent else module, name, new)


@dataclass(frozen=True)
class FreezePoint:
    """`spec` resolved: train from module `first` on (None: everything trains), frozen module names."""

    spec: str
    cut: str | None  # the tap whose output the trained part consumes ('depth:F'), or None
    first: str | None  # the first module that trains ('name' specs), or None
    depth: float
    frozen: frozenset

    def describe(self) -> str:
        if self.cut is None and self.first is None:
            return "input (everything trains)"
        return f"after {self.cut}" if self.cut else self.first


def resolve_freeze_point(taps, module, spec: str, model: str = "the model") -> FreezePoint:
    """`depth:0` (full fine-tune), `depth:F` (the tap `resolve_layers` picks for F: its output and
    everything before it are frozen) or a module name (it and everything after it train)."""
    from featx.taps import resolve_layers

    spec = spec.strip()
    by_name = {t.name: t for t in taps}
    m = re.fullmatch(r"depth:\s*([0-9.eE+-]+)", spec)
    try:
        if m and float(m.group(1)) == 0.0:
            return FreezePoint(spec, None, None, 0.0, frozenset())
        if m or spec in by_name:
            names, _ = resolve_layers(taps, spec, model)
            return _freeze_set(spec, by_name[names[0]], bool(m), taps, module)
    except (UsageError, ValueError):
        pass
    names = [t.name for t in taps if t.candidate]
    raise UsageError(f"--train-from {spec}: not a freeze point of {model}; use depth:F with F from 0 (train everything) "
                     f"to 1.0 (head only), or one of its layers: {', '.join(names)}")  # fmt: skip


def _freeze_set(spec: str, tap, after: bool, taps, module) -> FreezePoint:
    order = {t.name: t.order for t in taps}

    def pos(name: str) -> int:  # modules without a tensor output: their nearest tapped ancestor's position
        while name and name not in order:
            name = name.rpartition(".")[0]
        return order.get(name, -1)

    cut = tap.name
    frozen = set()
    for name, _ in module.named_modules():
        if not name or cut.startswith(name + "."):  # the root and the cut's ancestors hold trained parts
            continue
        inside = name == cut or name.startswith(cut + ".")
        if (inside and after) or (not inside and pos(name) < order[cut]):
            frozen.add(name)
    return FreezePoint(spec, cut if after else None, None if after else cut, tap.depth, frozenset(frozen))


def apply_freeze(module, point: FreezePoint, head: str) -> tuple[list, list]:
    """requires_grad off in the frozen part; returns (trainable backbone params, head params).
    The root's and the freeze point's ancestors' own tensors (a ViT's class token and position
    embedding) are used first, so they freeze whenever anything does."""
    head_params = list(module.get_submodule(head).parameters())
    head_ids = {id(p) for p in head_params}
    point_name = point.cut or point.first or ""
    backbone = []
    for name, mod in module.named_modules():
        ancestor = not name or point_name.startswith(name + ".")
        for p in mod.parameters(recurse=False):
            if id(p) in head_ids:
                continue
            freeze = name in point.frozen or (ancestor and bool(point.frozen))
            p.requires_grad_(not freeze)
            if not freeze:
                backbone.append(p)
    return backbone, head_params


def set_train_mode(module, point: FreezePoint) -> None:
    """Train mode for the trained part, eval mode (batch-norm statistics fixed) for the frozen part."""
    module.train()
    for name, mod in module.named_modules():
        if name in point.frozen:
            mod.training = False


# -- data ----------------------------------------------------------------------------------------


class _RowsView:
    """A Dataset seen as `classify.select_rows` sees a codes file (same attributes), so a fine-tune
    picks exactly the training images, subsets and hold-out of a probe with the same seed."""

    def __init__(self, ds):
        self.path, self.split, self.labels = ds.spec, ds.splits, ds.labels
        self.classes, self.groups = ds.classes, ds.groups


def select_samples(ds, settings: FinetuneSettings):
    """`classify.Rows` for the dataset (train / val / test sample indices), checked for fine-tuning."""
    from featx.classify import Protocol, _subsample, parse_train_size, select_rows

    train = np.flatnonzero(ds.splits == "train")
    present = np.unique(ds.labels[train])
    if len(present) < 2:
        one = ds.classes[int(present[0])] if len(present) else "none"
        raise UsageError(f"--data {ds.spec}: the training images hold a single class ({one}); fine-tuning needs two or more")
    protocol = Protocol(min_val_per_class=0, val_fraction=settings.val_fraction)  # a hold-out, as fit's default
    try:
        rows = select_rows(_RowsView(ds), protocol, parse_train_size(settings.train_size), settings.seed)
    except FeatxError as e:
        if "validate on" not in str(e):
            raise UsageError(str(e)) from None
        rows = None
    if rows is not None:
        counts = np.bincount(ds.labels[rows.val], minlength=len(ds.classes))[present]
    if rows is None or counts.min() < MIN_VAL_PER_CLASS:
        smallest = int(np.bincount(ds.labels[train])[present].min())
        raise UsageError(f"--data {ds.spec}: too few images per class for a validation split ({smallest} training "
                         f"image(s) in the smallest class, --train-size {settings.train_size}); give every class at "
                         f"least 2 training images, a val split, or a larger --train-size")  # fmt: skip
    if settings.max_images is not None and settings.max_images < len(rows.train):
        size = parse_train_size(str(settings.max_images))
        rows.train = _subsample(rows.train, ds.labels, size, np.random.default_rng([settings.seed, 1]), ds.classes)
    return rows


def crop_box(w: int, h: int, rng) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (top, left, height, width), drawn from a numpy Generator."""
    area, lo, hi = w * h, math.log(_RRC_RATIO[0]), math.log(_RRC_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*_RRC_SCALE)
        ar = math.exp(rng.uniform(lo, hi))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    ratio = w / h
    if ratio < _RRC_RATIO[0]:
        cw, ch = w, int(round(w / _RRC_RATIO[0]))
    elif ratio > _RRC_RATIO[1]:
        cw, ch = int(round(h * _RRC_RATIO[1])), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class _Images:
    """Samples `rows` as (label, uint8 [3, S, S] or None): augmented for (seed, epoch) when
    `epoch` is given (each image's crop and flip a function of seed, epoch and sample), else the
    weights' eval transform."""

    def __init__(self, ds, rows, pre, seed: int, epoch: int | None = None):
        self.ds, self.rows, self.pre, self.seed, self.epoch = ds, rows, pre, seed, epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int):
        from featx.data import ImageError

        i = int(self.rows[k])
        try:
            image = self.ds.load(i)
            x = self.pre.to_uint8(image, self.ds.ids[i]) if self.epoch is None else self._augment(image, i)
        except ImageError as e:
            log.warning("skipped %s", e)
            x = None
        return int(self.ds.labels[i]), x

    def _augment(self, image, i: int):
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        from featx.data import check_size

        check_size(self.ds.ids[i], *image.size)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        top, left, h, w = crop_box(*image.size, rng)
        size = self.pre.crop_size
        out = TF.resized_crop(image, top, left, h, w, [size, size], InterpolationMode(self.pre.interpolation), antialias=True)
        if rng.random() < 0.5:
            out = TF.hflip(out)
        return TF.pil_to_tensor(out)


def _collate(items):
    import torch

    ok = [(y, x) for y, x in items if x is not None]
    if not ok:
        return None, None
    return torch.tensor([y for y, _ in ok]), torch.stack([x for _, x in ok])


def _batches(n: int, size: int) -> list[list[int]]:
    """Positions 0..n-1 in batches of `size`; a last batch of one joins the one before (batch norm
    cannot train on a single image)."""
    out = [list(range(s, min(n, s + size))) for s in range(0, n, size)]
    if len(out) > 1 and len(out[-1]) == 1:
        out[-2].extend(out.pop())
    return out


def _loader(images: _Images, batches, workers: int):
    import torch

    return torch.utils.data.DataLoader(images, batch_sampler=batches, num_workers=workers, collate_fn=_collate)


# -- checkpoints ---------------------------------------------------------------------------------


def _tensors_bytes(tensors: dict, header: dict) -> bytes:
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return save(flat, metadata={k: json.dumps(v) for k, v in header.items()})


def _write_file(path: str, data: bytes) -> None:
    from featx.store import fsync_dir, write_atomic

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write_atomic(path, write)
    fsync_dir(os.path.dirname(path))


def _read_file(path: str, key: str) -> tuple[dict, dict] | None:
    """(tensors, header[key]) of a complete file, or None for a missing, torn or foreign one."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            head = json.loads((f.metadata() or {})[key])
            return {k: f.get_tensor(k) for k in f.keys()}, head  # noqa: SIM118 (not a dict)
    except Exception:  # noqa: BLE001 (a torn file raises whatever safetensors meets first)
        return None


def save_checkpoint(folder: str, epoch: int, module, optimizer, state: dict) -> str:
    tensors = {f"model.{k}": v for k, v in module.state_dict().items()}
    scalars = {}
    for pid, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            if hasattr(v, "dtype"):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    path = os.path.join(folder, f"epoch-{epoch:04d}.safetensors")
    _write_file(path, _tensors_bytes(tensors, {"featx_checkpoint": {**state, "epoch": epoch, "opt_scalars": scalars}}))
    return path


def load_checkpoint(path: str, module, optimizer) -> dict:
    tensors, state = _read_file(path, "featx_checkpoint")
    module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            opt.setdefault(int(pid), {})[name] = v
    for k, v in state["opt_scalars"].items():
        pid, name = k.split(".", 1)
        opt.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": opt, "param_groups": optimizer.state_dict()["param_groups"]})
    return state


def latest_checkpoint(folder: str, fingerprint: str) -> tuple[str, dict] | None:
    """The newest complete checkpoint of this run (same fingerprint); torn files and `.tmp` files
    (a write that never finished) are never loaded."""
    for path in sorted(glob.glob(os.path.join(folder, "epoch-*.safetensors")), reverse=True):
        got = _read_file(path, "featx_checkpoint")
        if got is None:
            log.warning("ignoring the incomplete checkpoint %s", path)
            continue
        if got[1].get("fingerprint") != fingerprint:
            log.warning("ignoring the checkpoints in %s: they belong to another run (other settings or data)", folder)
            return None
        return path, got[1]
    return None


def _prune(folder: str, keep: set[int]) -> None:
    for path in glob.glob(os.path.join(folder, "epoch-*.safetensors")):
        if int(os.path.basename(path)[6:10]) not in keep:
            os.remove(path)


# -- training ------------------------------------------------------------------------------------


def _optimizer(settings: FinetuneSettings, backbone: list, head: list):
    import torch

    def groups(params, lr):
        decay = [p for p in params if p.dim() > 1]
        rest = [p for p in params if p.dim() <= 1]
        return [{"params": decay, "lr": lr, "base_lr": lr, "weight_decay": settings.weight_decay},
                {"params": rest, "lr": lr, "base_lr": lr, "weight_decay": 0.0}]  # fmt: skip

    pg = [g for g in groups(backbone, settings.lr * settings.backbone_lr_mult) + groups(head, settings.lr) if g["params"]]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(pg, lr=settings.lr, momentum=settings.momentum, nesterov=False)
    return torch.optim.AdamW(pg, lr=settings.lr)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@dataclass
class _Job:
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


def train_epoch(job: _Job, epoch: int, bar=None, on_batch=None) -> float:
    """One epoch in the order of (seed, epoch); returns the mean training loss."""
    import torch

    s = job.settings
    torch.manual_seed(s.seed * 100_003 + epoch)  # dropout in the trained part: a function of (seed, epoch)
    order = job.rows.train[np.random.default_rng([s.seed, epoch, 7]).permutation(len(job.rows.train))]
    batches = _batches(len(order), s.batch_size)
    total, warm = s.epochs * len(batches), s.warmup * len(batches)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=s.label_smoothing)
    set_train_mode(job.module, job.point)
    images = _Images(job.ds, order, job.pre, s.seed, epoch if s.augment else None)
    losses, count = 0.0, 0
    for b, (y, x) in enumerate(_loader(images, batches, job.workers)):
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


def predict_logits(job: _Job, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, K] float32, labels [N]) of `rows` with the eval transform (undecodable images left out)."""
    import torch

    job.module.eval()
    outs, ys = [], []
    batches = [list(range(s, min(len(rows), s + job.settings.batch_size))) for s in range(0, len(rows), job.settings.batch_size)]
    with torch.inference_mode():
        for y, x in _loader(_Images(job.ds, rows, job.pre, job.settings.seed), batches, job.workers):
            if y is None:
                continue
            with torch.autocast(job.device.type, dtype=job.amp, enabled=job.amp is not None):
                outs.append(job.module(job.inputs(x)).float().cpu().numpy())
            ys.append(y.numpy())
    k = len(job.ds.classes)
    return (np.concatenate(outs) if outs else np.empty((0, k), np.float32)), (np.concatenate(ys) if ys else np.empty(0, np.int64))


def _val_scores(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of logits."""
    if not len(y):
        return 0.0, math.inf
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(np.mean(logits.argmax(1) == y)), float(-logp[np.arange(len(y)), y].mean())


# -- the job -------------------------------------------------------------------------------------


def _precision(run, device):
    """bf16 autocast on CUDA (`auto` or `bf16`), fp32 elsewhere; fp16 would need loss scaling."""
    import torch

    if run.precision == "fp16" or (run.precision == "bf16" and device.type != "cuda"):
        raise UsageError(f"--precision {run.precision}: fine-tuning uses bf16 autocast on CUDA only; use auto, fp32 "
                         f"or (on CUDA) bf16")  # fmt: skip
    if device.type == "cuda" and run.precision in ("auto", "bf16"):
        return torch.bfloat16
    return None


def _prepare(model, data, settings, data_options):
    """(dataset, rows, backbone, plan taps, freeze point, head name): everything before training."""
    from featx.data import open_source
    from featx.engine import load_backbone
    from featx.plan import resolve

    ds = open_source(data, data_options) if isinstance(data, str) else data
    rows = select_samples(ds, settings)
    plan = resolve(model)
    backbone, plan = load_backbone(plan)
    module = backbone.module
    head = find_head(module)
    point = resolve_freeze_point(plan.taps, module, settings.train_from, str(plan.model))
    replace_head(module, head, len(ds.classes), settings.seed)
    return ds, rows, backbone, plan, point, head


def _fingerprint(backbone, ds, rows, settings, device, amp) -> str:
    parts = {"featx": __version__, "model": str(backbone.name), "weights": backbone.weights.ident,
             "preprocess": backbone.preprocess.to_dict(), "data": ds.fingerprint, "settings": settings.to_dict(),
             "rows": [r.tolist() for r in (rows.train, rows.val, rows.test)], "device": device.type, "amp": str(amp)}  # fmt: skip
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _estimate(job: _Job, start_epoch: int):
    """On the CPU, log the run time estimated from the first timed batch (once)."""
    if job.device.type != "cpu":
        return None
    done = [False]

    def on_batch(b: int, n: int, seconds: float) -> None:
        if done[0]:
            return
        done[0] = True
        epochs = job.settings.epochs - start_epoch
        # an evaluation batch counted as a training batch: measured about equal for head-only training,
        # a third of one for full fine-tuning on this CPU, so the estimate errs long, not short
        evals = (len(job.rows.val) * epochs + len(job.rows.test)) / max(1, job.settings.batch_size)
        total = seconds * (n * epochs + evals)
        log.info("fine-tuning on the CPU: about %.0f min for %d epochs of %d images (first batch %.2f s); "
                 "--max-images caps the training images", total / 60, epochs, len(job.rows.train), seconds)  # fmt: skip

    return on_batch


def _run_epochs(job: _Job, folder: str | None, fingerprint: str, progress: bool) -> dict:
    """Train every epoch not yet checkpointed; returns the state (history, best epoch, its weights)."""
    from tqdm.auto import tqdm

    s, state, start = job.settings, {"fingerprint": fingerprint, "history": [], "best_epoch": None, "best": None}, 0
    found = latest_checkpoint(folder, fingerprint) if folder else None
    if found:
        state = load_checkpoint(found[0], job.module, job.optimizer)
        start = state["epoch"] + 1
        log.info("resuming from %s (epoch %d of %d done)", found[0], start, s.epochs)
    n_batches = len(_batches(len(job.rows.train), s.batch_size))
    bar = tqdm(total=s.epochs * n_batches, initial=start * n_batches, unit="batch", desc="finetune", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    on_batch = _estimate(job, start) if start < s.epochs else None
    try:
        for epoch in range(start, s.epochs):
            t0 = time.perf_counter()
            loss = train_epoch(job, epoch, bar, on_batch)
            acc, vloss = _val_scores(*predict_logits(job, job.rows.val))
            state["history"].append({"epoch": epoch + 1, "train_loss": loss, "val_accuracy": acc, "val_loss": vloss,
                                     "seconds": round(time.perf_counter() - t0, 3)})  # fmt: skip
            if state["best"] is None or (acc, -vloss) > tuple(state["best"]):
                state["best"], state["best_epoch"] = [acc, -vloss], epoch
            log.info("epoch %d/%d: train loss %.4f, val accuracy %.4f, val loss %.4f", epoch + 1, s.epochs, loss, acc, vloss)
            if folder:
                save_checkpoint(folder, epoch, job.module, job.optimizer,
                                {k: v for k, v in state.items() if k != "best_weights"})
                _prune(folder, {epoch, state["best_epoch"]})
            if state["best_epoch"] == epoch:
                state["best_weights"] = {k: v.detach().cpu().clone() for k, v in job.module.state_dict().items()}
    finally:
        bar.close()
    return state


def _best_weights(state: dict, folder: str | None):
    if "best_weights" in state:
        return state["best_weights"]
    tensors, _ = _read_file(os.path.join(folder, f"epoch-{state['best_epoch']:04d}.safetensors"), "featx_checkpoint")
    return {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}


def finetune(model, data, settings: FinetuneSettings | None = None, *, run=None, data_options=None,
             out: str | None = None, checkpoint_dir: str | None = None, progress: bool = True) -> FinetuneResult:  # fmt: skip
    """Fine-tune `model` (ModelSettings or a name) on `data` (a --data spec or a `featx.data.Dataset`)
    from `settings.train_from` on; evaluate the epoch chosen on validation once on the test split.

    `out`: save the model as OUT.safetensors (and checkpoint to OUT.ckpt/ while training, resuming
    from there after a crash); `checkpoint_dir` overrides that folder (checkpoints without `out` too).
    """
    import torch

    from featx.engine import resolve_device, resolve_workers
    from featx.settings import RunSettings, as_model

    settings, run, t0 = settings or FinetuneSettings(), run or RunSettings(workers=0), time.perf_counter()
    target = _target(out)
    ds, rows, backbone, plan, point, head = _prepare(as_model(model), data, settings, data_options)
    device = resolve_device(run.device)
    amp = _precision(run, device)
    module = backbone.module
    trained, head_params = apply_freeze(module, point, head)
    module.to(device)
    if device.type == "cuda":
        module.to(memory_format=torch.channels_last)
    job = _Job(module, _optimizer(settings, trained, head_params), point, ds, rows, backbone.preprocess, settings,
               device, amp, 0 if run.workers == "auto" and device.type == "cpu" else resolve_workers(run.workers))  # fmt: skip
    folder = checkpoint_dir or (target[: -len(".safetensors")] + ".ckpt" if target else None)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fp = _fingerprint(backbone, ds, rows, settings, device, amp)
    state = _run_epochs(job, folder, fp, progress)
    module.load_state_dict(_best_weights(state, folder))
    logits, y_test = predict_logits(job, rows.test)  # the test split's first and only read
    results = _results(job, plan, backbone, point, head, state, logits, y_test, time.perf_counter() - t0)
    module.to("cpu").eval()
    if target:
        save_model(target, module, backbone, head, ds.classes, settings, results)
        if folder and not checkpoint_dir:
            shutil.rmtree(folder, ignore_errors=True)
    return FinetuneResult(results, target, module)


def _target(out: str | None) -> str | None:
    from featx.classifier_io import classifier_path

    return classifier_path(out) if out else None


def _results(job: _Job, plan, backbone, point, head, state, logits, y_test, seconds: float) -> dict:
    from featx.classify import metrics
    from featx.stats import pack_correct, wilson_interval

    rows, s, ds = job.rows, job.settings, job.ds
    y_pred = logits.argmax(1) if len(logits) else np.empty(0, np.int64)
    low, high = wilson_interval(int(np.sum(y_pred == y_test)), len(y_test))
    trainable = sum(p.numel() for p in job.module.parameters() if p.requires_grad)
    best = state["best_epoch"]
    return {
        "kind": "finetune", "model": str(backbone.name), "weights": backbone.weights.spec,
        "train_from": point.spec, "train_from_module": point.describe(), "train_from_depth": point.depth,
        "frozen_modules": len(point.frozen), "trainable_params": int(trainable),
        "total_params": int(sum(p.numel() for p in job.module.parameters())), "head": head,
        "recipe": s.to_dict(), "epoch": best + 1, "epochs_run": len(state["history"]), "history": state["history"],
        "seed": s.seed, "train_size": len(rows.train) + len(rows.val), "train_size_spec": s.train_size,
        "n_fit": len(rows.train), "n_val": len(rows.val), "n_test": int(len(y_test)), "val_source": rows.val_source,
        "test_split": rows.test_split, "val_score": state["best"][0], "val_loss": -state["best"][1],
        **metrics(y_test, y_pred, ds.classes), "test_ci_low": low, "test_ci_high": high,
        "test_correct": pack_correct(y_pred == y_test), "seconds": round(seconds, 3), "fit_seconds": round(seconds, 3),
        "device": job.device.type, "precision": "bf16" if job.amp is not None else "fp32",
        "preprocessing": backbone.preprocess.to_dict(), "image_size": backbone.preprocess.crop_size,
        "resize_size": backbone.preprocess.resize_size, "classes": list(ds.classes),
    }  # fmt: skip


# -- the saved model -----------------------------------------------------------------------------


def save_model(target: str, module, backbone, head: str, classes, settings: FinetuneSettings, results: dict) -> str:
    """OUT.safetensors: the network's state dict (the layout `featx.models` loads: the new head
    in place of the old one) and, in the header, the description `featx predict` uses."""
    meta = {
        "format": FORMAT, "kind": "finetuned", "model": str(backbone.name), "weights": backbone.weights.spec,
        "weights_source": backbone.weights.source, "weights_ident": backbone.weights.ident,
        "weights_sha256": backbone.weights.sha256, "head": head, "classes": list(classes),
        "preprocessing": backbone.preprocess.to_dict(), "recipe": settings.to_dict(), "results": results,
        "featx_version": __version__,
    }  # fmt: skip
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _write_file(target, _tensors_bytes(module.state_dict(), {HEADER_KEY: meta}))
    except OSError as e:
        raise FeatxError(f"--out {target}: cannot write the model ({e.strerror or e})") from None
    return target


def finetuned_description(path: str) -> dict | None:
    """The description of a fine-tuned model file, or None when `path` is not one."""
    from safetensors import safe_open

    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
    except Exception:  # noqa: BLE001 (not a safetensors file: the classifier loader says so)
        return None
    if HEADER_KEY not in header:
        return None
    try:
        meta = json.loads(header[HEADER_KEY])
    except ValueError as e:
        raise FeatxError(f"{path}: its fine-tuned model description is not JSON ({e})") from None
    missing = [k for k in ("model", "classes", "preprocessing", "head", "featx_version") if k not in meta]
    if missing:
        raise FeatxError(f"{path}: its description lacks {', '.join(missing)}; fine-tune it again")
    return meta


def load_finetuned(path: str):
    """(module in eval mode on the CPU, head TapInfo, Preprocess, description) of a saved fine-tuned model."""
    from featx.models import load_model
    from featx.preprocess import Preprocess
    from featx.taps import list_taps

    meta = finetuned_description(path)
    backbone = load_model(meta["model"], path)
    pre = Preprocess.from_dict(meta["preprocessing"])
    taps = {t.name: t for t in list_taps(backbone.module, pre.crop_size, device="cpu")}
    tap = taps.get(meta["head"])
    if tap is None or tap.shape != (len(meta["classes"]),):
        raise FeatxError(f"{path}: its head {meta['head']} does not give {len(meta['classes'])} class scores; fine-tune it again")
    return backbone.module, tap, pre, meta
