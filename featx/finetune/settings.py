"""The fine-tune recipe (`FinetuneSettings`) and the result object.

A recipe may hold a small grid: several augmentations (`augment`) and learning rates (`lr`). Each
grid point is one ordinary recipe (`points()`); `featx.finetune.search` chooses among them on
validation, the test split is read once, on the chosen point's chosen epoch.

Epochs. `epochs="auto"` trains until validation stops improving, at most `max_epochs`:

- `PATIENCE` (3) epochs without an improvement stop the run. One epoch without improvement is
  common on a small validation split (one image more or less moves accuracy by several points);
  three in a row, with the learning rate still high, rarely turn back into a gain;
- an epoch improves when its validation accuracy beats the best so far (by one image or more), or
  ties it with a validation loss lower by more than `MIN_DELTA` (1e-3 nats per image): a smaller
  drop in loss is rounding-level movement on a few hundred images, not learning;
- the learning-rate schedule (warm-up, then cosine) spans `max_epochs`, whether or not the run
  stops before: a run that stops early is a prefix of the capped run, so the stopping rule never
  changes what the epochs it did train computed (and a resumed run stays bit-identical).

A result is `converged` when its last `PATIENCE` epochs did not improve on the best (for a fixed
`epochs=N` too): a run still improving at its end measured its budget, not the recipe.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from featx.settings import bad_value  # one table (settings.FLAGS) maps fields to their flags

OPTIMIZERS = ("sgd", "adamw")
AUGMENTS = (
    "none",
    "light",
    "default",
)  # featx.finetune.data: eval transform; small crops; RandomResizedCrop + flip
AUGMENT_TEXT = {
    "none": "no augmentation",
    "light": "light crops (no flip)",
    "default": "RandomResizedCrop + flip",
}

METHODS = ("full", "lp-ft", "bitfit", "lora")
METHOD_TEXT = {
    "full": "full fine-tune",
    "lp-ft": "linear probe, then full fine-tune (LP-FT)",
    "bitfit": "BitFit (biases, norms and head)",
    "lora": "LoRA adapters",
}  # finetune.methods says what each does

MIN_VAL_PER_CLASS = 1  # every class must have validation images, or the epoch choice ignores it
PATIENCE = 3  # epochs without improvement that stop an `epochs="auto"` run (see the module docstring)
MIN_DELTA = (
    1e-3  # validation loss (nats per image) an epoch must gain, at tied accuracy, to count as improving
)
MAX_EPOCHS = 30  # the default cap of `epochs="auto"`


def _number(
    name: str, value, low: float, high: float = math.inf, integer: bool = False, low_open: bool = False
):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value > high:
        bad_value(
            name,
            value,
            f"use {'an integer' if integer else 'a number'} from {low:g}"
            + (f" to {high:g}" if high < math.inf else ""),
        )
    if value < low or (low_open and value == low):
        bad_value(name, value, f"use a value {'above' if low_open else 'from'} {low:g}")


def _grid(value) -> tuple:
    """A single value or a sequence (a comma-separated string for text) as a tuple, order kept, repeats dropped."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    return tuple(dict.fromkeys(value))


def _lr_grid(value) -> tuple[float, ...]:
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    values = _grid(value)
    try:
        values = tuple(float(v) if isinstance(v, str) else v for v in values)
    except ValueError:
        bad_value("lr", text, "give numbers, comma-separated (0.01,0.03)")
    if not values:
        bad_value("lr", text, "give one or more learning rates, comma-separated (0.01,0.03)")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= 10:
            bad_value("lr", text, "every learning rate must be a number above 0 (at most 10)")
    return tuple(float(v) for v in values)


def _augment_grid(value) -> tuple[str, ...]:
    if value is True or value is False:  # the boolean of older releases: RandomResizedCrop + flip, or none
        return ("default",) if value else ("none",)
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    values = _grid(value)
    if not values:
        bad_value("augment", text, f"give one or more of {', '.join(AUGMENTS)}, comma-separated")
    for v in values:
        if v not in AUGMENTS:
            bad_value(
                "augment", text, f"unknown augmentation {v!r}; use {', '.join(AUGMENTS)} (comma-separated)"
            )
    return values


@dataclass(frozen=True)
class FinetuneSettings:
    """The recipe of one fine-tune, or a small grid of them (`augment` and `lr` may hold several
    values; validation chooses). Defaults: docs/commands/finetune.md."""

    train_from: str = "depth:0.5"
    epochs: int | str = "auto"  # N, or "auto": until validation stops improving, at most max_epochs
    max_epochs: int = MAX_EPOCHS  # the cap of epochs="auto" (the schedule spans it)
    lr: float | tuple[float, ...] = (
        0.01  # the new head's learning rate (peak of the schedule); several: a grid
    )
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
    augment: str | tuple[str, ...] = "default"  # none, light, default; several: a grid
    threads: int | str = (
        "auto"  # CPU threads: "auto" measures 1 vs all cores (speed only: not part of the recipe)
    )
    method: str = (
        "full"  # how the part after the freeze point adapts: full, lp-ft, bitfit, lora (finetune.methods)
    )
    lora_rank: int = 8  # LoRA only: the adapters' rank
    lora_alpha: float = 16.0  # LoRA only: the adapters' scale is lora_alpha / lora_rank

    def __post_init__(self) -> None:
        if not isinstance(self.train_from, str) or not self.train_from.strip():
            bad_value(
                "train_from",
                self.train_from,
                "use depth:F (F in [0, 1]) or a module name (featx layers MODEL)",
            )
        if self.epochs != "auto":
            _number("epochs", self.epochs, 1, 10_000, integer=True)
        _number("max_epochs", self.max_epochs, 1, 10_000, integer=True)
        if self.epochs == "auto" and self.max_epochs < PATIENCE:
            bad_value(
                "max_epochs",
                self.max_epochs,
                f"when the epochs are auto, the cap must be at least the patience "
                f"({PATIENCE} epochs), or the run stops before it can see validation stop improving",
            )
        lrs, augments = _lr_grid(self.lr), _augment_grid(self.augment)
        object.__setattr__(self, "lr", lrs[0] if len(lrs) == 1 else lrs)
        object.__setattr__(self, "augment", augments[0] if len(augments) == 1 else augments)
        _number("backbone_lr_mult", self.backbone_lr_mult, 0.0, 100.0)
        _number("weight_decay", self.weight_decay, 0.0, 1.0)
        if self.optimizer not in OPTIMIZERS:
            bad_value("optimizer", self.optimizer, f"use one of {', '.join(OPTIMIZERS)}")
        _number("momentum", self.momentum, 0.0, 0.999)
        _number(
            "warmup",
            self.warmup,
            0,
            self.schedule_epochs if isinstance(self.schedule_epochs, int) else 0,
            integer=True,
        )
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
        if self.threads != "auto":
            _number("threads", self.threads, 1, 4096, integer=True)
        if self.method not in METHODS:
            bad_value("method", self.method, f"unknown method; use one of {', '.join(METHODS)}")
        _number("lora_rank", self.lora_rank, 1, 4096, integer=True)
        _number("lora_alpha", self.lora_alpha, 0.0, 1e6, low_open=True)
        object.__setattr__(self, "lora_alpha", float(self.lora_alpha))

    @property
    def auto(self) -> bool:
        return self.epochs == "auto"

    @property
    def schedule_epochs(self) -> int:
        """The epochs the learning-rate schedule spans: N, or the cap of `auto`."""
        return self.max_epochs if self.epochs == "auto" else self.epochs

    @property
    def adapted_lr_mult(self) -> float:
        """The backbone's trained parameters' learning rate, as a multiple of the head's: BitFit's and
        LoRA's few adapted parameters train at the head's rate, full and LP-FT's at backbone_lr_mult."""
        return 1.0 if self.method in ("bitfit", "lora") else self.backbone_lr_mult

    @property
    def lrs(self) -> tuple[float, ...]:
        return self.lr if isinstance(self.lr, tuple) else (self.lr,)

    @property
    def augments(self) -> tuple[str, ...]:
        return self.augment if isinstance(self.augment, tuple) else (self.augment,)

    def points(self) -> list[FinetuneSettings]:
        """The grid's recipes (augmentation-major), each with one augmentation and one learning rate."""
        return [replace(self, augment=a, lr=lr) for a in self.augments for lr in self.lrs]

    def to_dict(self) -> dict:
        """The recipe (what determines the result; `threads` only changes speed and is left out)."""
        d = asdict(self)
        d.pop("threads")
        for k in ("lr", "augment"):
            d[k] = list(d[k]) if isinstance(d[k], tuple) else d[k]
        return d

    def key_dict(self) -> dict:
        """`to_dict` in the spelling of earlier releases where it means the same (a boolean `augment`,
        no cap for a fixed number of epochs), so an unchanged recipe keeps its cell key."""
        d = self.to_dict()
        if d["augment"] in ("default", "none"):
            d["augment"] = d["augment"] == "default"
        if not self.auto:
            d.pop("max_epochs")
        if self.method != "lora":
            d.pop("lora_rank"), d.pop("lora_alpha")
        if self.method == "full":
            d.pop("method")
        return d

    def recipe_text(self) -> str:
        """The recipe in one line, for reports."""
        opt = f"sgd (momentum {self.momentum:g})" if self.optimizer == "sgd" else self.optimizer
        cap = f", at most {self.max_images} training images" if self.max_images else ""
        epochs = (
            f"epochs until validation stops improving (patience {PATIENCE}, at most {self.max_epochs})"
            if self.auto
            else f"{self.epochs} epochs"
        )
        lr = "/".join(f"{v:g}" for v in self.lrs)
        aug = "/".join(AUGMENT_TEXT[a] for a in self.augments)
        grid = (
            f"; augmentation and learning rate chosen on validation by successive halving over {len(self.points())} "
            f"recipes"
            if len(self.points()) > 1
            else ""
        )
        others = (
            "the same for adapted parameters"
            if self.method in ("bitfit", "lora")
            else f"x{self.adapted_lr_mult:g} for pretrained layers"
        )
        method = METHOD_TEXT[self.method] + (
            f" (rank {self.lora_rank}, alpha {self.lora_alpha:g})" if self.method == "lora" else ""
        )
        return (
            f"{method}; {opt}, {epochs}, {self.warmup} warm-up then cosine over {self.schedule_epochs}, lr {lr} for the head and {others}, weight decay {self.weight_decay:g}, batch {self.batch_size}, {aug}{cap}; the "
            f"epoch chosen on validation{grid}"
        )


@dataclass
class FinetuneResult:
    """What a fine-tune measured (`results`, the same fields as a `fit` cell plus the recipe, the
    chosen epoch, the resolved freeze point and the history) and where the model went."""

    results: dict
    path: str | None = None  # OUT.safetensors, when saved
    module: object = field(default=None, repr=False)  # the chosen checkpoint's network (CPU, eval)

    def summary(self) -> str:
        r = self.results
        conv = (
            ""
            if r.get("converged", True)
            else ", NOT CONVERGED (validation still improving at the last epoch)"
        )
        grid = (
            f", chosen recipe: augment {r['augment']}, lr {r['lr']:g}" if len(r.get("grid") or ()) > 1 else ""
        )
        method = r.get("method", "full")
        lora = f" rank {r['lora_rank']}" if method == "lora" and "lora_rank" in r else ""
        cost = (
            f"; {r['trainable_params']:,} of {r['total_params']:,} parameters trained in {r['train_seconds']:.1f} s, "
            f"inference {r['inference_ms_per_image']:.2f} ms/image (batch {r['inference_batch_size']})"
            if "inference_ms_per_image" in r
            else ""
        )
        return (
            f"{r['model']} {method}{lora} from {r['train_from']} ({r['train_from_module']}): accuracy {r['accuracy']:.4f} "
            f"(95% CI {r['test_ci_low']:.3f}-{r['test_ci_high']:.3f}, {r['n_test']} test images), balanced "
            f"{r['balanced_accuracy']:.4f}, epoch {r['epoch']}/{r['epochs_run']} chosen on {r['val_source']} "
            f"(val acc {r['val_score']:.4f}){conv}{grid}, train size {r['train_size']}, {r['seconds']:.1f} s{cost}"
        )
