"""The bench grid: extracting every source through the cache, then one cell per (source, layer, size, seed)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np

from featx.bench.config import BenchConfig, BenchData, BenchModel
from featx.classifiers.protocol import Protocol, TrainSize, parse_train_size
from featx.settings import CodeSettings, ModelSettings
from featx.store.cache import digest
from featx.store.codes import CodesFile


@dataclass
class Source:
    """A dataset of the bench with its codes files."""

    data: BenchData
    name: str
    codes: str  # the model's codes file
    layers: list[str]  # the layers of the grid, in depth order
    depth: dict[str, float]
    dims: dict[str, int]
    head: str | None  # the ImageNet head's layer, when --head-confidence extracted it (into `head_codes`)
    pixels: str | None = None  # the raw-pixel baseline's codes file
    n_train: int = 0
    n_classes: int = 0
    uncapped_train: int | None = None  # training images before --per-class-limit (when it removed some)
    cap: str = ""  # the limit that did, as the user wrote it
    model: str = ""  # the model's label (NAME@WEIGHTS, '(random control)' for a control)
    control_of: str = ""  # for a random-init control: the pretrained model's label
    rows_digest: str = ""  # which images in which split, in order: equal digests pair test images
    leakage: dict | None = None  # the near-duplicate check of its rows (featx.classifiers.neardup.check_rows)
    head_codes: str | None = None  # a second, one-layer entry holding the head's outputs


def _head_layer(model: ModelSettings) -> str | None:
    """The classifier head's module name, when the weights come with ImageNet classes."""
    from featx.models.plan import resolve

    return resolve(model).head_layer()


def _limit_text(limit) -> str:
    return str(limit) if isinstance(limit, int) else ",".join(f"{k}={v}" for k, v in (limit or {}).items())


def prepare(config: BenchConfig, progress: bool = False) -> list[Source]:
    """Extract (or find in the cache) the codes of every (model, dataset); the raw-pixel baseline
    once per dataset (with the first model's sources)."""
    sources = []
    for k, bm in enumerate(config.bench_models()):
        sources += _prepare_model(config, bm, progress, pixels=config.baseline_pixels and k == 0)
    return sources


def _prepare_model(config: BenchConfig, bm: BenchModel, progress: bool, pixels: bool) -> list[Source]:
    from featx.engine.extract import extract

    # the grid's layers alone, so `featx extract` with the same model, data and layers made this very
    # entry (a cache hit); the ImageNet head, when asked for, goes into an entry of its own
    head = _head_layer(bm.settings) if config.head_confidence else None
    codes = config.codes
    pixels_model = ModelSettings("pixels", "DEFAULT", image_size=config.pixel_size)
    common = dict(
        run=config.run, data_options=config.data_options, cache_dir=config.cache_dir, progress=progress
    )
    sources = []
    for bd in config.datasets:
        res = extract(bm.settings, bd.spec, codes, **common)
        with CodesFile(res.path) as f:
            f.require_labels("bench")
            layers = [n for n in f.layers if n != head]
            depth = {n: f.layer_meta(n).depth for n in layers}
            dims = {n: f.dim(n) for n in layers}
            name = str(f.meta.dataset_name or os.path.basename(bd.spec.rstrip("/")))
            n_train = int((f.split == "train").sum())
            n_classes = len(f.classes)
            rows_digest = digest({"paths": f.paths, "split": f.split.tolist()})
        layers.sort(key=lambda n: depth[n])
        # a random-init control's codes say nothing about near-copies (random features make everything
        # look alike); its pretrained model's check covers the same rows
        leak = None if bm.control_of else _leak_check(config, res.path, f"{bm.label} {name}")
        pix = (
            extract(pixels_model, bd.spec, CodeSettings("pixels", pool="none"), **common).path
            if pixels
            else None
        )
        head_codes = (
            extract(bm.settings, bd.spec, replace(codes, layers=head), **common).path if head else None
        )
        sources.append(
            Source(
                bd,
                name,
                res.path,
                layers,
                depth,
                dims,
                head,
                pix,
                n_train,
                n_classes,
                res.uncapped_train,
                _limit_text(config.data_options.per_class_limit) if res.uncapped_train else "",
                bm.label,
                bm.control_of,
                rows_digest,
                leak,
                head_codes,
            )
        )
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        for i, s in enumerate(sources):
            s.name = f"{s.name}#{i + 1}" if names.count(s.name) > 1 else s.name
    return sources


def _leak_check(config: BenchConfig, path: str, where: str) -> dict | None:
    """Before any cell is fitted: are the rows the first protocol and seed validate and test on
    (at the largest train size, `all`) near-copies of training rows? One warning when they are."""
    import logging

    from featx.classifiers.neardup import leak_check, leak_warning

    leak = leak_check(path, config.protocols[0].validate(), parse_train_size("all"), int(config.seeds[0]))
    if leak and leak["leaky"]:
        logging.getLogger("featx").warning(leak_warning(leak, where))
    return leak


@dataclass(frozen=True)
class Cell:
    source: int  # index into the sources
    codes: str
    cache_key: str
    layer: str
    train_size: TrainSize
    protocol: Protocol
    seed: int

    @property
    def key(self) -> str:
        return digest(
            {
                "codes": self.cache_key,
                "layer": self.layer,
                "train_size": str(self.train_size),
                "protocol": self.protocol.to_dict(),
                "seed": self.seed,
            }
        )


def cache_key(path: str) -> str:
    with CodesFile(path) as f:
        return str(f.meta.cache_key or path)


def grid(config: BenchConfig, sources: list[Source]) -> tuple[list[Cell], list[str]]:
    """Every cell of the bench, in a fixed order, and notes on cells that cannot exist."""
    sizes = [parse_train_size(s) for s in config.train_sizes]
    cells, notes = [], []
    for i, src in enumerate(sources):
        entries = [(src.codes, cache_key(src.codes), src.layers)]
        if src.pixels:
            entries.append((src.pixels, cache_key(src.pixels), ["pixels"]))
        per_class_min = min_class_count(src.codes)
        for size in sizes:
            if size.kind == "total" and size.n > src.n_train:
                notes.append(f"{src.name}: train size {size} skipped (only {src.n_train} training images)")
                continue
            if size.kind == "per_class" and size.n > per_class_min:
                notes.append(
                    f"{src.name}: train size {size} skipped (a class has only {per_class_min} training images)"
                )
                continue
            for codes, key, layers in entries:
                for layer in layers:
                    for proto in config.protocols:
                        for seed in config.seeds:
                            cells.append(Cell(i, codes, key, layer, size, proto, int(seed)))
    return cells, notes


def min_class_count(path: str) -> int:
    with CodesFile(path) as f:
        counts = np.bincount(f.labels[f.split == "train"])
    counts = counts[counts > 0]
    return int(counts.min()) if len(counts) else 0
