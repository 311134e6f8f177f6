"""A bench's configuration: models, data, grid; the demo configuration."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

from featx.classifiers.protocol import Protocol
from featx.errors import UsageError
from featx.finetune.settings import FinetuneSettings
from featx.models.spec import split_weights
from featx.settings import (
    DEFAULT_BENCH_LAYERS,
    CodeSettings,
    DataOptions,
    ModelSettings,
    RunSettings,
    gather,
    layer_tokens,
)

log = logging.getLogger("featx")


SIMILARITY_LABELS = ("similar", "different")


@dataclass(frozen=True)
class BenchData:
    """One `--data` of a bench: the spec and the user's similar/different label, if any."""

    spec: str
    label: str | None = None


def parse_bench_data(text: str) -> BenchData:
    """'PATH', 'PATH:similar' or 'PATH:different' (also after sklearn:/torchvision: specs)."""
    head, sep, tail = text.rpartition(":")
    if sep and tail.lower() in SIMILARITY_LABELS and head:
        return BenchData(head, tail.lower())
    if sep and tail.lower() in ("same", "dissimilar", "similiar"):
        raise UsageError(f"--data {text}: label a dataset :similar or :different")
    return BenchData(text, None)


DEFAULT_LAYERS = DEFAULT_BENCH_LAYERS


CONTROLS = ("random",)


def model_label(m: ModelSettings) -> str:
    return f"{m.name}@{m.weights}"


@dataclass(frozen=True)
class BenchModel:
    """One model of a bench: its settings, its label in results, and, for a random-init control,
    the label of the pretrained model it controls."""

    settings: ModelSettings
    label: str
    control_of: str = ""


def _gather_models(model, codes, run, settings: dict):
    """The bench's models (deduplicated, in order), codes and run settings; a string model may be
    NAME@WEIGHTS, whose weights win over a flat `weights=`."""
    items = [model] if isinstance(model, (str, ModelSettings)) else list(model or ())
    if not items:
        raise UsageError("featx bench: give at least one --model")
    models = []
    for item in items:
        kw = dict(settings)
        if isinstance(item, str):
            item, weights = split_weights(item)
            if weights is not None:
                kw["weights"] = weights
        m, c, r = gather(item, codes, run, kw, "BenchConfig")
        models.append(m)
    return tuple(dict.fromkeys(models)), c, r


def parse_points(text: str) -> list[str]:
    """--finetune 'depth:0,0.5,1.0' or 'layer3,depth:0.5' -> distinct freeze points, in order
    (a `depth:` prefix carries over as in --layers)."""
    out = layer_tokens(text or "")
    if not out:
        raise UsageError("--finetune is empty; give freeze points, e.g. depth:0,0.5,1.0")
    return list(dict.fromkeys(out))


def parse_methods(methods, settings: FinetuneSettings) -> tuple[str, ...]:
    """--finetune-method 'full,lora' -> distinct methods, in order (None: the recipe's own); LoRA's
    missing library is named now, before the probe cells run."""
    from featx.finetune.methods import require_peft
    from featx.finetune.settings import METHODS

    text = ",".join(methods) if isinstance(methods, (list, tuple)) else methods
    out = tuple(dict.fromkeys(m.strip() for m in (text or settings.method).split(",") if m.strip()))
    bad = [m for m in out if m not in METHODS]
    if bad or not out:
        raise UsageError(
            f"--finetune-method {text!r}: unknown method {', '.join(bad) or '(none given)'}; use one or more "
            f"of {', '.join(METHODS)}, comma-separated"
        )
    if "lora" in out:
        require_peft()
    return out


@dataclass(init=False)
class BenchConfig:
    """A bench: the model(s) and codes settings, how to run the forward, the data, and the grid.

    `model` is one `ModelSettings` or a sequence of them (a name, or NAME@WEIGHTS, is accepted as a
    shorthand); `codes` and `run` are `featx.settings` objects (a layers string is a shorthand);
    their fields may also be given flat (`weights=`, `layers=`, `image_size=`, `device=`, ...), as
    `extract` takes them, and then apply to every model. `control="random"` adds each pretrained
    model's random-init twin. `models` holds them all; `model` is the first."""

    models: tuple[ModelSettings, ...]
    control: str | None
    datasets: list[BenchData]
    codes: CodeSettings
    run: RunSettings
    train_sizes: Sequence[str]
    protocols: Sequence[Protocol]
    seeds: Sequence[int]
    data_options: DataOptions
    baseline_pixels: bool
    pixel_size: int
    out: str
    cache_dir: str | None
    jobs: int
    scheduler: str | None  # a Dask scheduler's address; None: $DASK_SCHEDULER_ADDRESS, else local joblib
    finetune: list[str]  # freeze points of the fine-tune cells (featx.bench.finetune_cells); [] for none
    finetune_settings: FinetuneSettings  # their recipe (train_from, train_size and seed set per cell)
    finetune_methods: tuple[str, ...]  # one fine-tune cell per method (featx.finetune.methods), each point

    def __init__(
        self,
        model: ModelSettings | str | Sequence[ModelSettings | str],
        datasets: list[BenchData],
        codes: CodeSettings | str | None = None,
        run: RunSettings | None = None,
        *,
        train_sizes: Sequence[str] = ("all",),
        protocols: Sequence[Protocol] = (Protocol(),),
        seeds: Sequence[int] = (0,),
        data_options: DataOptions | None = None,
        baseline_pixels: bool = False,
        pixel_size: int = 32,
        out: str = "results/bench",
        cache_dir: str | None = None,
        jobs: int = 1,
        scheduler: str | None = None,
        control: str | None = None,
        finetune: Sequence[str] | str = (),
        finetune_settings=None,
        finetune_methods: Sequence[str] | str | None = None,
        head_confidence: bool = False,
        **settings,
    ):
        self.models, self.codes, self.run = _gather_models(model, codes or DEFAULT_LAYERS, run, settings)
        # fine-tune cells (freeze points, for the first model) and their recipe
        self.finetune = (
            parse_points(",".join(finetune) if not isinstance(finetune, str) else finetune)
            if finetune
            else []
        )
        self.finetune_settings = FinetuneSettings() if finetune_settings is None else finetune_settings
        if not isinstance(self.finetune_settings, FinetuneSettings):
            raise TypeError(
                f"finetune_settings: give a FinetuneSettings, not {type(self.finetune_settings).__name__}"
            )
        self.finetune_methods = parse_methods(finetune_methods, self.finetune_settings)
        if control is not None and control not in CONTROLS:
            raise UsageError(f"--control {control!r}: use random (or leave it out)")
        self.control = control
        self.datasets, self.train_sizes, self.protocols = datasets, train_sizes, protocols
        self.seeds = tuple(
            dict.fromkeys(int(s) for s in seeds)
        )  # a repeated seed would fit the same cells twice
        self.data_options = data_options or DataOptions()
        self.baseline_pixels, self.pixel_size, self.out, self.cache_dir, self.jobs = (
            baseline_pixels,
            pixel_size,
            out,
            cache_dir,
            jobs,
        )
        self.scheduler = scheduler
        self.head_confidence = head_confidence  # the ImageNet head's confidence, from an entry of its own

    @property
    def model(self) -> ModelSettings:
        return self.models[0]

    def bench_models(self) -> list[BenchModel]:
        """Every model of the bench with its label; with control='random', each pretrained model
        is followed by its random-init twin (`--weights none`, featx's seed 0)."""
        out = [BenchModel(m, model_label(m)) for m in self.models]
        if self.control == "random":
            have = set(self.models)
            for bm in list(out):
                twin = replace(bm.settings, weights="none")
                if bm.settings.weights.lower() != "none" and twin not in have:
                    have.add(twin)
                    out.insert(
                        out.index(bm) + 1, BenchModel(twin, f"{model_label(twin)} (random control)", bm.label)
                    )
        return out


DEMO_FASHION = "/usr/share/datasets/fashion-mnist"


def demo_config(
    extra_data: Sequence[str] = (), out: str = "results/demo", cache_dir: str | None = None, jobs: int = 2
) -> BenchConfig:
    """`featx demo`: a small bench that works offline on a fresh install (scikit-learn's digits,
    plus Fashion-MNIST where the Debian package is installed, plus `extra_data`)."""
    from featx.classifiers.protocol import protocol_for

    datasets = [BenchData("sklearn:digits", "different")]
    if os.path.isdir(DEMO_FASHION):
        datasets.append(BenchData(DEMO_FASHION, "different"))
    else:
        log.warning(
            "Fashion-MNIST is not installed (sudo apt-get install dataset-fashion-mnist); the demo runs without it"
        )
    datasets += [parse_bench_data(d) for d in extra_data]
    return BenchConfig(
        ModelSettings("efficientnet_lite0", "imagenet", image_size=112),
        datasets,
        DEFAULT_LAYERS,
        train_sizes=["10/class", "50/class", "all"],
        protocols=[protocol_for("softmax", Cs=(0.001, 0.01, 0.1, 1.0, 10.0))],
        seeds=(0, 1),
        data_options=DataOptions(per_class_limit={"train": 200, "test": 100}),  # neither set has a val split
        baseline_pixels=True,
        pixel_size=28,
        out=out,
        cache_dir=cache_dir,
        jobs=jobs,
    )
