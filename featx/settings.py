"""Settings objects: what to extract (model, codes) and how to run the forward (run).

Each is a small frozen dataclass validated once, at construction, with a one-line
`UsageError` that names the field (by its CLI flag, from `FLAGS`, so the CLI and the Python API
say the same thing). Everything downstream (`featx.models.plan.resolve`, `featx.engine.compute`, `extract`,
`bench`, `CNNCodes`, `Predictor`) takes these objects instead of loose keyword arguments, so a
new option is one field here plus one CLI line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

from featx.errors import UsageError

if TYPE_CHECKING:
    from featx.models.taps import TapInfo

DTYPES = ("float32", "float16")
# choices the CLI offers, kept here (not in the modules that use them) so that parsing a command line
# imports nothing heavy: a cache hit must answer without loading scikit-learn or torch
CLASSIFIERS = ("svm", "softmax", "sgd", "knn")  # knn: featx.classifiers.knn, DINOv2's weighted vote
SCALES = ("standardize", "l2", "none")
SOLVERS = ("auto", "sklearn", "torch")  # softmax: lbfgs in scikit-learn, or featx.classifiers.torch_softmax
PRESET_NAMES = (
    "kornblith",
    "vissl-svm",
)  # classify.PRESETS' keys (tests/classifiers/test_classify.py pins it)
DEFAULT_BENCH_LAYERS = "depth:0.1,0.25,0.4,0.55,0.7,0.85,1.0"
DECODERS = ("auto", "pil", "torchvision")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RELU_MODES = ("auto", "on", "off")
CHANNELS_LAST = ("auto", "on", "off")

# field -> how the CLI spells it; library errors name the field this way
FLAGS = {
    "name": "--model",
    "weights": "--weights",
    "image_size": "--image-size",
    "crop_pct": "--crop-pct",
    "layers": "--layers",
    "pool": "--pool",
    "relu": "relu",
    "dtype": "--dtype",
    "device": "--device",
    "batch_size": "--batch-size",
    "workers": "--workers",
    "precision": "--precision",
    "channels_last": "--channels-last",
    "decoder": "--decoder",
    "compile": "--compile",
    "distributed": "--distributed",
    "test_fraction": "--test-fraction",
    "per_class_limit": "--per-class-limit",
    "seed": "--seed",
    "data_root": "--data-root",
    "group_by": "--group-by",
    # featx.finetune.settings.FinetuneSettings
    "train_from": "--train-from",
    "epochs": "--epochs",
    "lr": "--lr",
    "backbone_lr_mult": "--backbone-lr-mult",
    "weight_decay": "--weight-decay",
    "optimizer": "--optimizer",
    "momentum": "--momentum",
    "warmup": "--warmup",
    "label_smoothing": "--label-smoothing",
    "train_size": "--train-size",
    "max_images": "--max-images",
    "val_fraction": "--val-fraction",
    "augment": "--augment",
    "max_epochs": "--max-epochs",
    "threads": "--threads",
    "method": "--method",
    "lora_rank": "--lora-rank",
    "lora_alpha": "--lora-alpha",
    # featx.classifiers.protocol.Protocol
    "classifier": "--classifier",
    "Cs": "--C",
    "scale": "--scale",
    "pca": "--pca",
    "cv": "--cv",
    "min_val_per_class": "min_val_per_class",
    "chunk_rows": "--chunk-rows",
    "max_iter": "--max-iter",
    "solver": "--solver",
    "ks": "--knn-k",
    "temperatures": "--knn-t",
}

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


# the one description of what --model accepts (CLI help, errors, bench)
MODEL_NAMES = "a torchvision name (resnet50), timm:NAME[.TAG], efficientnet_lite0/1/2 or pixels"


def bad_value(field: str, value, want: str):
    sep = "=" if FLAGS[field] == field else " "  # Python-only fields read as keyword arguments
    raise UsageError(f"{FLAGS[field]}{sep}{value!r}: {want}")


def choice(field: str, value, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        bad_value(field, value, f"use one of {', '.join(choices)}")


def _auto_or_count(field: str, value, minimum: int) -> None:
    if value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        bad_value(field, value, f"use auto or an integer >= {minimum}")


@dataclass(frozen=True)
class ModelSettings:
    """The network: its name, weights, and input-size / crop overrides of the weights' preprocessing."""

    name: str
    weights: str = "DEFAULT"
    image_size: int | None = None
    crop_pct: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            bad_value("name", self.name, f"give {MODEL_NAMES}")
        if not isinstance(self.weights, str) or not self.weights.strip():
            bad_value("weights", self.weights, "use DEFAULT, none, a weights name or a checkpoint path")
        size = self.image_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            bad_value("image_size", size, "use a positive number of pixels")
        pct = self.crop_pct
        if pct is not None and (
            isinstance(pct, bool)
            or not isinstance(pct, (int, float))
            or not math.isfinite(pct)
            or not 0 < pct <= 1
        ):
            bad_value("crop_pct", pct, "use a fraction in (0, 1]")


@dataclass(frozen=True)
class CodeSettings:
    """Which codes: layers (names and/or depth fractions), pooling, ReLU mode and stored dtype.
    `layers` may be given as a sequence; it is kept as the comma-joined text (part of the request key)."""

    layers: str = "depth:1.0"
    pool: str = "avg"
    relu: str = "auto"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.layers, str):
            if not isinstance(self.layers, Sequence) or not all(isinstance(x, str) for x in self.layers):
                bad_value("layers", self.layers, "give layer names and/or depth fractions, comma-separated")
            object.__setattr__(self, "layers", ",".join(self.layers))
        choice("dtype", self.dtype, DTYPES)
        choice("relu", self.relu, RELU_MODES)
        if not isinstance(self.pool, str):
            bad_value("pool", self.pool, "use avg (alias mean), max, avgNxN, none, cls or cls+mean")
        parse_pool(self.pool)


@dataclass(frozen=True)
class RunSettings:
    """How the forward runs; none of it changes the codes except precision and decoder (both in
    the cache key)."""

    device: str = "auto"
    batch_size: int | str = "auto"
    workers: int | str = "auto"
    precision: str = "auto"
    channels_last: str = "auto"
    decoder: str = "auto"
    compile: bool = False
    distributed: bool = (
        False  # one rank of a torchrun job (`featx extract` turns it on when RANK/WORLD_SIZE are set)
    )

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            bad_value("device", self.device, "use auto, cpu, cuda, cuda:N or mps")
        _auto_or_count("batch_size", self.batch_size, 1)
        _auto_or_count("workers", self.workers, 0)
        choice("precision", self.precision, PRECISIONS)
        choice("channels_last", self.channels_last, CHANNELS_LAST)
        choice("decoder", self.decoder, DECODERS)
        if not isinstance(self.compile, bool):
            bad_value("compile", self.compile, "use True or False")
        if not isinstance(self.distributed, bool):
            bad_value("distributed", self.distributed, "use True or False")


SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def layer_tokens(spec: str | Sequence[str]) -> list[str]:
    """`--layers`/`--finetune` text (or a list) -> tokens: 'layer1,depth:0.5,0.75' -> ['layer1',
    'depth:0.5', 'depth:0.75']. A `depth:` prefix carries over to the numbers after it; the first
    token that is not a number ends it (a name). Empty tokens are dropped; the order is kept."""
    raw = spec.split(",") if isinstance(spec, str) else spec
    out, in_depth = [], False
    for tok in (t.strip() for t in raw):
        if not tok:
            continue
        if tok.startswith("depth:"):
            in_depth, tok = True, tok[len("depth:") :].strip()
        if in_depth:
            try:
                float(tok)
            except ValueError:
                in_depth = False
            else:
                out.append(f"depth:{tok}")
                continue
        out.append(tok)
    return out


def depth_fraction(token: str) -> float | None:
    """The F of a `depth:F` token, or None for a layer name."""
    if not token.startswith("depth:"):
        return None
    try:
        return float(token[len("depth:") :])
    except ValueError:
        return None


def parse_per_class_limit(text: str | int | dict | None) -> int | dict[str, int] | None:
    """'200' -> 200; 'train=200,test=100' -> {'train': 200, 'test': 100} (split aliases accepted)."""
    if text is None:
        return None
    want = "use a positive integer K, or per split: train=200,test=100"
    if isinstance(text, dict):
        out = {SPLIT_ALIASES.get(str(k).lower()): v for k, v in text.items()}
        if None in out or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out.values()):
            bad_value("per_class_limit", text, want)
        return out
    if isinstance(text, int) and not isinstance(text, bool):
        return text if text >= 1 else bad_value("per_class_limit", text, want)
    try:
        if "=" not in str(text):
            k = int(str(text).strip())
            if k < 1:
                raise ValueError
            return k
        out = {}
        for part in str(text).split(","):
            split, _, k = part.partition("=")
            split = SPLIT_ALIASES.get(split.strip().lower())
            if split is None or int(k) < 1:
                raise ValueError
            out[split] = int(k)
        return out
    except ValueError:
        bad_value("per_class_limit", str(text).strip(), want)


@dataclass(frozen=True)
class DataOptions:
    """How to cut a source into the samples of one extraction: the test share for data without
    splits, per-class caps (K, or per split; the CLI's text form is accepted), the seed of the
    split and caps, where torchvision:NAME datasets live, and the group regex (`--group-by`)."""

    test_fraction: float = 0.2
    per_class_limit: int | dict[str, int] | None = None
    seed: int = 0
    data_root: str | None = None
    group_by: str | None = (
        None  # regex: its first match on an image's relative path is its group; auto[:T]: near-copies
    )

    def __post_init__(self) -> None:
        tf = self.test_fraction
        if isinstance(tf, bool) or not isinstance(tf, (int, float)) or not 0.0 < tf < 1.0:
            bad_value("test_fraction", tf, "must be between 0 and 1 (exclusive)")
        object.__setattr__(self, "per_class_limit", parse_per_class_limit(self.per_class_limit))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            bad_value("seed", self.seed, "use an integer")
        if self.data_root is not None and not isinstance(self.data_root, str):
            bad_value("data_root", self.data_root, "use a directory path")
        if self.group_by == "":
            object.__setattr__(self, "group_by", None)
        if isinstance(self.group_by, str) and (self.group_by == "auto" or self.group_by.startswith("auto:")):
            t = self.group_by[5:]  # auto[:T]: near-duplicate groups from the codes (featx.sources.autogroups)
            try:
                ok = self.group_by == "auto" or 0.0 < float(t) <= 1.0
            except ValueError:
                ok = False
            if not ok:
                bad_value(
                    "group_by", self.group_by, "auto:T needs a cosine similarity T in (0, 1], e.g. auto:0.9"
                )
        elif self.group_by is not None:
            try:
                re.compile(self.group_by)
            except (re.error, TypeError) as e:
                bad_value("group_by", self.group_by, f"not a regular expression ({e})")

    def to_dict(self) -> dict:
        d = {
            "test_fraction": self.test_fraction,
            "per_class_limit": self.per_class_limit,
            "seed": self.seed,
            "data_root": self.data_root,
        }
        if self.group_by:  # only when set, so files and keys without groups stay as they were
            d["group_by"] = self.group_by
        return d


def as_model(value: ModelSettings | str, **overrides) -> ModelSettings:
    """A `ModelSettings`, from one or from a model name (the string shorthand)."""
    if isinstance(value, ModelSettings):
        return value
    return ModelSettings(value, **{k: v for k, v in overrides.items() if v is not None})


def as_codes(value: CodeSettings | str | Sequence[str] | None, **overrides) -> CodeSettings:
    """A `CodeSettings`, from one or from a layers string/list (the shorthand)."""
    if isinstance(value, CodeSettings):
        return value
    kw = {k: v for k, v in overrides.items() if v is not None}
    return CodeSettings(value, **kw) if value is not None else CodeSettings(**kw)


def _field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def gather(
    model, codes, run, options: dict, caller: str = "extract"
) -> tuple[ModelSettings, CodeSettings, RunSettings]:
    """The three settings from a call's arguments: objects as given, strings as shorthands, and
    the flat keywords of the older API (`weights=`, `pool=`, `device=`, ...) folded into their
    group (replacing that field of a given object)."""
    owners = {ModelSettings: {}, CodeSettings: {}, RunSettings: {}}
    for key, value in options.items():
        owner = next((cls for cls in owners if key in _field_names(cls) and key != "name"), None)
        if owner is None:
            raise TypeError(f"{caller}() got an unexpected keyword argument {key!r}")
        owners[owner][key] = value
    m, c, r = owners[ModelSettings], owners[CodeSettings], owners[RunSettings]
    if not isinstance(codes, CodeSettings) and "layers" in c:
        codes = c.pop("layers")
    model = replace(model, **m) if isinstance(model, ModelSettings) else as_model(model, **m)
    codes = replace(codes, **c) if isinstance(codes, CodeSettings) else as_codes(codes, **c)
    run = replace(run, **r) if isinstance(run, RunSettings) else RunSettings(**r)
    return model, codes, run


# -- pooling -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    """`avg` / `max` (global), `avgNxN` (adaptive average to an N x N grid, flattened channel-major),
    `none` (the whole map, flattened); for token maps [T, D] also `cls` (the class token) and
    `cls+mean` (the class token, then the mean of the patch tokens: 2 x D). On token maps `avg`
    (alias `mean`) and `max` pool the patch tokens only, never the prefix tokens."""

    kind: str  # 'avg' | 'max' | 'grid' | 'none' | 'cls' | 'cls+mean'
    grid: int = 0

    def __str__(self) -> str:
        return f"avg{self.grid}x{self.grid}" if self.kind == "grid" else self.kind

    def dim(self, shape: tuple[int, ...]) -> int:
        if len(shape) == 1:
            return shape[0]
        if self.kind == "none":
            return math.prod(shape)
        if len(shape) == 3 and self.kind == "grid":
            return shape[0] * self.grid * self.grid
        if len(shape) == 2 and self.kind == "cls+mean":
            return 2 * shape[1]
        return shape[-1] if len(shape) == 2 else shape[0]

    def problem(self, tap: TapInfo) -> str | None:
        """Why this pooling cannot make a code of `tap`'s output (one line), or None when it can."""
        shape = list(tap.shape)
        if len(tap.shape) not in (1, 2, 3):
            return f"layer {tap.name} outputs shape {tap.shape}; featx taps [C,H,W], [L,C] or [D] outputs"
        if self.kind == "grid" and len(tap.shape) != 3:
            return f"--pool {self} needs a spatial [C,H,W] output; layer {tap.name} outputs {shape}"
        if self.kind in ("cls", "cls+mean"):
            if not tap.tokens:
                other = "avg, max, avgNxN or none" if len(tap.shape) == 3 else "avg or none"
                return (
                    f"--pool {self} needs a token map [T, D] with a class token (ViT-style models); "
                    f"layer {tap.name} outputs {shape}, no tokens: use {other}"
                )
            if not tap.class_token:
                k = tap.prefix_tokens
                why = f"its {k} prefix tokens hold none" if k else "all are patch tokens"
                return (
                    f"--pool {self}: the {tap.shape[0]} tokens of layer {tap.name} have no class token ({why}); "
                    f"use mean or none, or a block after the class token joins"
                )
        return None

    def check(self, tap: TapInfo) -> None:
        msg = self.problem(tap)
        if msg:
            raise UsageError(msg)

    def apply(self, x, prefix_tokens: int = 0):
        """[N, C, H, W] / [N, T, D] / [N, D] -> [N, code_dim]; always a new tensor. `prefix_tokens`:
        the leading non-patch tokens of a token map, skipped by avg and max."""
        import torch
        import torch.nn.functional as F

        if x.dim() == 2 or self.kind == "none":
            return x.flatten(1).clone()
        if x.dim() == 3:  # a token map
            patches = x[:, prefix_tokens:]
            if self.kind == "cls":
                return x[:, 0].clone()
            if self.kind == "cls+mean":
                return torch.cat([x[:, 0], patches.mean(1)], dim=1)
            return patches.amax(1) if self.kind == "max" else patches.mean(1)
        if self.kind == "avg":
            return x.mean((2, 3))
        if self.kind == "max":
            return x.amax((2, 3))
        return F.adaptive_avg_pool2d(x, self.grid).flatten(1)


POOL_CHOICES = "avg (alias mean), max, avgNxN with N in 1..64 (e.g. avg2x2), none, cls or cls+mean"


def parse_pool(spec: str) -> Pool:
    s = (spec or "").strip().lower()
    if s in ("avg", "max", "none", "cls", "cls+mean"):
        return Pool(s)
    if s == "mean":  # the same codes as avg (and so the same cache entry)
        return Pool("avg")
    m = re.fullmatch(r"avg(\d+)x(\d+)", s)
    if m and m.group(1) == m.group(2) and 1 <= int(m.group(1)) <= 64:
        return Pool("grid", int(m.group(1)))
    raise UsageError(f"--pool {spec!r}: use {POOL_CHOICES}")
