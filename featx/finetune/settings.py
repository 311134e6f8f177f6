"""The fine-tune recipe (`FinetuneSettings`) and the result object.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from featx.settings import bad_value  # one table (settings.FLAGS) maps fields to their flags

OPTIMIZERS = ("sgd", "adamw")


MIN_VAL_PER_CLASS = 1  # every class must have validation images, or the epoch choice ignores it


def _number(name: str, value, low: float, high: float = math.inf, integer: bool = False, low_open: bool = False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value > high:
        bad_value(name, value, f"use {'an integer' if integer else 'a number'} from {low:g}" + (f" to {high:g}" if high < math.inf else ""))
    if value < low or (low_open and value == low):
        bad_value(name, value, f"use a value {'above' if low_open else 'from'} {low:g}")


@dataclass(frozen=True)
class FinetuneSettings:
    """The recipe of one fine-tune (defaults: docs/commands/finetune.md)."""

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
            bad_value("train_from", self.train_from, "use depth:F (F in [0, 1]) or a module name (featx layers MODEL)")
        _number("epochs", self.epochs, 1, 10_000, integer=True)
        _number("lr", self.lr, 0.0, 10.0, low_open=True)
        _number("backbone_lr_mult", self.backbone_lr_mult, 0.0, 100.0)
        _number("weight_decay", self.weight_decay, 0.0, 1.0)
        if self.optimizer not in OPTIMIZERS:
            bad_value("optimizer", self.optimizer, f"use one of {', '.join(OPTIMIZERS)}")
        _number("momentum", self.momentum, 0.0, 0.999)
        _number("warmup", self.warmup, 0, self.epochs if isinstance(self.epochs, int) else 0, integer=True)
        _number("batch_size", self.batch_size, 2, 65536, integer=True)
        _number("label_smoothing", self.label_smoothing, 0.0, 0.99)
        _number("seed", self.seed, 0, 2**31 - 1, integer=True)
        from featx.classifiers.protocol import parse_train_size

        parse_train_size(self.train_size)
        object.__setattr__(self, "train_size", str(self.train_size))
        if self.max_images is not None:
            _number("max_images", self.max_images, 2, integer=True)
        if not isinstance(self.val_fraction, float) or not 0.0 < self.val_fraction < 1.0:
            bad_value("val_fraction", self.val_fraction, "use a fraction between 0 and 1")
        if not isinstance(self.augment, bool):
            bad_value("augment", self.augment, "use True or False")

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
