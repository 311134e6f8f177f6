"""`bench`: layer transferability over datasets x layers x train sizes x classifiers x seeds.

Each dataset is extracted once (through the cache, so reruns reuse it), together with the
ImageNet classifier head when the weights have one (its confidence on the target images is one
of the similarity signals). Then every cell is fitted with `classify.fit_cell`, in parallel with
joblib. Finished cells are appended to `cells.jsonl` in the results directory as they complete
(one JSON line each, fsync'ed), keyed by a hash of everything that determines the result (the
codes file's cache key, layer, train size, protocol, seed), so an interrupted bench resumes without
refitting finished cells, and cells already computed by an earlier bench with other settings are
reused. The results files are rebuilt from the cells of the current grid, in a fixed order, so a
resumed bench writes the same results as an uninterrupted one (apart from the measured fit
seconds, which are whatever the run that fitted each cell measured).

With `scheduler` (`--scheduler tcp://HOST:8786`, or `$DASK_SCHEDULER_ADDRESS`) the cells go to an
existing Dask cluster through joblib's Dask backend instead (`pip install "featx[dask]"`); this
process still owns the bench and appends `cells.jsonl`, so resume and results are the same. The
workers open the codes files by path: the cache directory must be on a filesystem they all see,
and they need the same featx installed.

Several models (`--model NAME[@WEIGHTS]`, repeatable) make one bench: every (model, dataset) is
extracted once through the cache, and the cells, results and report gain a `model` column (the cell
key already hashes the codes file's cache key, which holds the model, so a single-model bench's
cells.jsonl keeps resuming). `control="random"` adds, for every pretrained model, the same
architecture with featx's seeded random initialisation (`--weights none`) as a model of its own.
Every (model, dataset, layer) is also scored by featx.scores on the training rows of the largest
train size (seed 0's draw, as the probes' seed-0 cell draws it, before any validation hold-out),
resumably in `scores.jsonl`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from featx.cache import digest
from featx.classify import Protocol, TrainSize, fit_cell, parse_train_size
from featx.errors import FeatxError, UsageError
from featx.settings import DEFAULT_BENCH_LAYERS, CodeSettings, DataOptions, ModelSettings, RunSettings, gather
from featx.store import CodesFile

log = logging.getLogger("featx")

SIMILARITY_LABELS = ("similar", "different")
CELLS_FILE = "cells.jsonl"


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
SCORES_FILE = "scores.jsonl"
MODEL_SPEC_HELP = "use NAME or NAME@WEIGHTS (efficientnet_lite0@imagenet, timm:resnet18@none)"


def split_model_spec(text: str) -> tuple[str, str | None]:
    """'NAME' -> (NAME, None); 'NAME@WEIGHTS' -> (NAME, WEIGHTS). `@` because `timm:NAME` uses the colon."""
    name, sep, weights = str(text).strip().partition("@")
    if not name.strip():
        raise UsageError(f"--model {text!r}: no model name before @; {MODEL_SPEC_HELP}")
    if sep and not weights.strip():
        raise UsageError(f"--model {text!r}: no weights after @; {MODEL_SPEC_HELP}")
    return name.strip(), (weights.strip() or None)


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
            item, weights = split_model_spec(item)
            if weights is not None:
                kw["weights"] = weights
        m, c, r = gather(item, codes, run, kw, "BenchConfig")
        models.append(m)
    return tuple(dict.fromkeys(models)), c, r


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
    finetune: list[str]  # freeze points of the fine-tune cells (featx.bench_finetune); [] for none

    def __init__(self, model: ModelSettings | str | Sequence[ModelSettings | str], datasets: list[BenchData], codes: CodeSettings | str | None = None,
                 run: RunSettings | None = None, *, train_sizes: Sequence[str] = ("all",),
                 protocols: Sequence[Protocol] = (Protocol(),), seeds: Sequence[int] = (0,),
                 data_options: DataOptions | None = None, baseline_pixels: bool = False, pixel_size: int = 32,
                 out: str = "results/bench", cache_dir: str | None = None, jobs: int = 1, scheduler: str | None = None,
                 control: str | None = None, finetune: Sequence[str] | str = (), finetune_settings=None,
                 **settings):  # fmt: skip
        from featx.bench_finetune import parse_points
        from featx.finetune import FinetuneSettings

        self.models, self.codes, self.run = _gather_models(model, codes or DEFAULT_LAYERS, run, settings)
        # fine-tune cells (freeze points, for the first model) and their recipe
        self.finetune = parse_points(",".join(finetune) if not isinstance(finetune, str) else finetune) if finetune else []
        self.finetune_settings = finetune_settings or FinetuneSettings()
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
                    out.insert(out.index(bm) + 1,
                               BenchModel(twin, f"{model_label(twin)} (random control)", bm.label))  # fmt: skip
        return out


DEMO_FASHION = "/usr/share/datasets/fashion-mnist"


def demo_config(extra_data: Sequence[str] = (), out: str = "results/demo", cache_dir: str | None = None,
                jobs: int = 2) -> BenchConfig:  # fmt: skip
    """`featx demo`: a small bench that works offline on a fresh install (scikit-learn's digits,
    plus Fashion-MNIST where the Debian package is installed, plus `extra_data`)."""
    from featx.classify import protocol_for

    datasets = [BenchData("sklearn:digits", "different")]
    if os.path.isdir(DEMO_FASHION):
        datasets.append(BenchData(DEMO_FASHION, "different"))
    else:
        log.warning(
            "Fashion-MNIST is not installed (sudo apt-get install dataset-fashion-mnist); the demo runs without it"
        )
    datasets += [parse_bench_data(d) for d in extra_data]
    return BenchConfig(
        ModelSettings("efficientnet_lite0", "imagenet", image_size=112), datasets, DEFAULT_LAYERS,
        train_sizes=["10/class", "50/class", "all"], protocols=[protocol_for("softmax", Cs=(0.001, 0.01, 0.1, 1.0, 10.0))],
        seeds=(0, 1), data_options=DataOptions(per_class_limit={"train": 200, "test": 100, "val": 100}),
        baseline_pixels=True, pixel_size=28, out=out, cache_dir=cache_dir, jobs=jobs,
    )  # fmt: skip


@dataclass
class Source:
    """A dataset of the bench with its codes files."""

    data: BenchData
    name: str
    codes: str  # the model's codes file
    layers: list[str]  # the layers of the grid, in depth order
    depth: dict[str, float]
    dims: dict[str, int]
    head: str | None  # the ImageNet head's layer in `codes`, if extracted
    pixels: str | None = None  # the raw-pixel baseline's codes file
    n_train: int = 0
    n_classes: int = 0
    uncapped_train: int | None = None  # training images before --per-class-limit (when it removed some)
    cap: str = ""  # the limit that did, as the user wrote it
    model: str = ""  # the model's label (NAME@WEIGHTS, '(random control)' for a control)
    control_of: str = ""  # for a random-init control: the pretrained model's label
    rows_digest: str = ""  # which images in which split, in order: equal digests pair test images


def _head_layer(model: ModelSettings) -> str | None:
    """The classifier head's module name, when the weights come with ImageNet classes."""
    from featx.plan import resolve

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
    from featx.extraction import extract

    head = _head_layer(bm.settings)
    codes = replace(config.codes, layers=config.codes.layers + (f",{head}" if head else ""))
    pixels_model = ModelSettings("pixels", "DEFAULT", image_size=config.pixel_size)
    common = dict(
        run=config.run, data_options=config.data_options, cache_dir=config.cache_dir, progress=progress
    )
    sources = []
    for bd in config.datasets:
        res = extract(bm.settings, bd.spec, codes, **common)
        with CodesFile(res.path) as f:
            layers = [n for n in f.layers if n != head]
            depth = {n: f.layer_meta(n).depth for n in layers}
            dims = {n: f.dim(n) for n in layers}
            name = str(f.meta.dataset_name or os.path.basename(bd.spec.rstrip("/")))
            n_train = int((f.split == "train").sum())
            n_classes = len(f.classes)
            rows_digest = digest({"paths": f.paths, "split": f.split.tolist()})
        layers.sort(key=lambda n: depth[n])
        pix = extract(pixels_model, bd.spec, CodeSettings("pixels", pool="none"), **common).path if pixels else None
        sources.append(
            Source(bd, name, res.path, layers, depth, dims, head if head else None, pix, n_train, n_classes,
                   res.uncapped_train, _limit_text(config.data_options.per_class_limit) if res.uncapped_train else "",
                   bm.label, bm.control_of, rows_digest)
        )  # fmt: skip
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        for i, s in enumerate(sources):
            s.name = f"{s.name}#{i + 1}" if names.count(s.name) > 1 else s.name
    return sources


# -- cells ---------------------------------------------------------------------------------------


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
        return digest({"codes": self.cache_key, "layer": self.layer, "train_size": str(self.train_size),
                       "protocol": self.protocol.to_dict(), "seed": self.seed})  # fmt: skip


def _cache_key(path: str) -> str:
    with CodesFile(path) as f:
        return str(f.meta.cache_key or path)


def grid(config: BenchConfig, sources: list[Source]) -> tuple[list[Cell], list[str]]:
    """Every cell of the bench, in a fixed order, and notes on cells that cannot exist."""
    sizes = [parse_train_size(s) for s in config.train_sizes]
    cells, notes = [], []
    for i, src in enumerate(sources):
        entries = [(src.codes, _cache_key(src.codes), src.layers)]
        if src.pixels:
            entries.append((src.pixels, _cache_key(src.pixels), ["pixels"]))
        per_class_min = _min_class_count(src.codes)
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


def _min_class_count(path: str) -> int:
    with CodesFile(path) as f:
        counts = np.bincount(f.labels[f.split == "train"])
    counts = counts[counts > 0]
    return int(counts.min()) if len(counts) else 0


# -- transferability scores ---------------------------------------------------------------------


def _scored_size(config: BenchConfig, src: Source) -> TrainSize | None:
    """The train size whose training rows the scores use: the largest of the grid this data
    supports (by images), as the analysis's largest size."""
    sizes = [parse_train_size(s) for s in config.train_sizes]
    per_class_min = _min_class_count(src.codes)

    def count(t: TrainSize) -> int:
        return {"all": src.n_train, "total": t.n, "per_class": t.n * src.n_classes}[t.kind]

    fits = [t for t in sizes if t.kind == "all" or (t.kind == "total" and t.n <= src.n_train)
            or (t.kind == "per_class" and t.n <= per_class_min)]  # fmt: skip
    return max(fits, key=count) if fits else None


def _score_key(cache_key: str, layer: str, size: TrainSize) -> str:
    from featx.scores import METRICS

    return digest({"scores": cache_key, "layer": layer, "train_size": str(size), "seed": 0, "metrics": list(METRICS)})


def _score_source(src: Source, size: TrainSize, todo: list[str]) -> dict[str, dict]:
    """Every score of each layer in `todo`, on the training rows `size` draws with seed 0."""
    import time

    from featx.classify import _subsample
    from featx.scores import METRICS, score

    out = {}
    with CodesFile(src.codes) as f:
        train = np.flatnonzero(f.split == "train")
        rows = _subsample(train, f.labels, size, np.random.default_rng(0), f.classes)
        for layer in todo:
            t0 = time.perf_counter()
            X, y, errors = f.codes(layer, rows), f.labels[rows], {}
            try:  # a metric undefined on these codes scores None with its reason; the others are kept
                values = score(X, y, METRICS, errors=errors)
            except FeatxError as e:  # no metric can be computed (one class, non-finite codes, too many dims)
                out[layer] = {"error": str(e)}
                continue
            if all(v is None for v in values.values()):
                out[layer] = {"error": "; ".join(f"{m}: {e}" for m, e in errors.items())}
                continue
            out[layer] = {"scores": values, "rows": int(len(rows)), "train_size": str(size),
                          "seconds": round(time.perf_counter() - t0, 3), **({"errors": errors} if errors else {})}  # fmt: skip
    return out


def score_sources(config: BenchConfig, sources: list[Source]) -> dict[tuple[int, str], dict]:
    """(source index, layer) -> its scores record, computed where scores.jsonl lacks them (appended
    as they finish, so a killed bench keeps them)."""
    done = load_done(config.out, SCORES_FILE)
    out = {}
    with open_log(config.out, SCORES_FILE) as fh:
        for i, src in enumerate(sources):
            size = _scored_size(config, src)
            if size is None:
                continue
            ck = _cache_key(src.codes)
            keys = {layer: _score_key(ck, layer, size) for layer in src.layers}
            todo = [layer for layer in src.layers if keys[layer] not in done]
            for layer, rec in (_score_source(src, size, todo) if todo else {}).items():
                _append(fh, {"key": keys[layer], "result": rec})
                done[keys[layer]] = rec
            out.update({(i, layer): done[keys[layer]] for layer in src.layers})
    return out


def _run_cell(cell: Cell) -> dict:
    """One fit; a cell the data cannot support (too few images to hold out validation images,
    say) is recorded with its reason instead of stopping the bench. A codes file this process
    cannot see (a Dask worker on another machine) stops the bench instead: recorded, it would
    pass for a finished cell on every resume."""
    if not os.path.isfile(cell.codes):
        raise FeatxError(
            f"cannot read the codes file {cell.codes} on {socket.gethostname()}: with --scheduler, the cache"
            " directory (--cache-dir) must be on a filesystem every Dask worker sees"
        )
    try:
        result = fit_cell(cell.codes, [cell.layer], cell.protocol, cell.train_size, cell.seed)
    except FeatxError as e:
        return {"key": cell.key, "result": {"error": str(e)}}
    return {"key": cell.key, "result": result}


def load_done(out_dir: str, name: str = CELLS_FILE) -> dict[str, dict]:
    """Finished cells (or scores) by key; a torn last line (a killed run) is ignored."""
    done = {}
    path = os.path.join(out_dir, name)
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    done[rec["key"]] = rec["result"]
                except (ValueError, KeyError, TypeError):
                    continue
    except OSError:
        pass
    return done


def open_log(out_dir: str, name: str = CELLS_FILE):
    """`out_dir/name` (cells.jsonl, scores.jsonl) opened for appending records with `_append`; a
    torn last line from a killed run is ended first, so it cannot swallow the next record."""
    path = os.path.join(out_dir, name)
    fh = open(path, "a", encoding="utf-8")
    if fh.tell() > 0 and not _ends_with_newline(path):
        fh.write("\n")
    return fh


def _append(fh, rec: dict) -> None:
    fh.write(json.dumps(rec) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def _make_out_dir(path: str) -> None:
    """--out is a folder: a file there, or one that cannot be made, is one line (not FileExistsError)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {path}: is a file; bench writes a folder of results, give a folder path")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {path}: cannot make the results folder ({e.strerror or e})") from None


def run(config: BenchConfig, progress: bool = False) -> BenchResult:
    """Extract, fit every missing cell, and return everything the report needs."""
    if not config.datasets:
        raise UsageError("featx bench: give at least one --data")
    _make_out_dir(config.out)
    # connected before the extraction, so that a wrong --scheduler fails at once, not hours later
    with _dask_client(config) as client:
        sources = prepare(config, progress)
        cells, notes = grid(config, sources)
        notes = list(dict.fromkeys(notes))  # a dataset's size notes, once for all its models
        for note in notes:
            log.warning(note)
        done = load_done(config.out)
        todo = [c for c in cells if c.key not in done]
        log.info("%d cells: %d done before, %d to fit", len(cells), len(cells) - len(todo), len(todo))
        if todo:
            _fit_cells(config, todo, len(cells), done, client, progress)
        layer_scores = score_sources(config, sources)
    ft_cells = []
    if config.finetune:  # after the probes: each fine-tune uses every core
        from featx.bench_finetune import run_finetune_cells

        ft_cells = run_finetune_cells(config, config.finetune, config.finetune_settings, progress)
        notes += [f"{bd.spec} fine-tune from {c.point}, train size {c.train_size}, seed {c.seed}: not run ({r['error']})"
                  for c, r in ft_cells if "error" in r for bd in [config.datasets[c.source]]]  # fmt: skip
    for (i, layer), rec in layer_scores.items():
        for m, err in ({"all scores": rec["error"]} if "error" in rec else rec.get("errors", {})).items():
            notes.append(f"{sources[i].model} {sources[i].name} {layer}: no {m} ({err})")
    failed = [(c, done[c.key]["error"]) for c in cells if "error" in done[c.key]]
    for c, err in failed[:20]:
        who = f"{sources[c.source].model} " if len(config.models) > 1 or config.control else ""
        notes.append(
            f"{who}{sources[c.source].name} {c.layer} train size {c.train_size} seed {c.seed}: not fitted ({err})"
        )
    if len(failed) > 20:
        notes.append(f"... {len(failed) - 20} more cells not fitted")
    return BenchResult(
        config, sources, [(c, done[c.key]) for c in cells if "error" not in done[c.key]], notes, layer_scores,
        ft_cells,
    )


def _fit_cells(config: BenchConfig, todo: list[Cell], total: int, done: dict, client, progress: bool) -> None:
    """Fit `todo` side by side (joblib's own backend, or its Dask backend on `client`), appending
    each record to cells.jsonl here, in this process, as it arrives."""
    from joblib import Parallel, delayed, parallel_config
    from tqdm.auto import tqdm

    with open_log(config.out, CELLS_FILE) as fh:
        # on a cluster, its workers decide how many cells run at once
        backend = parallel_config(backend="dask", client=client) if client else contextlib.nullcontext()
        # the bar is closed on an error too, so that the error starts a line of its own
        bar = tqdm(total=total, initial=total - len(todo), unit="cell", disable=not progress, desc="bench")
        with bar, backend:
            # absolute paths: a worker's working directory is not this one
            jobs = Parallel(n_jobs=-1 if client else config.jobs, return_as="generator_unordered")(
                delayed(_run_cell)(replace(c, codes=os.path.abspath(c.codes))) for c in todo
            )
            for rec in jobs:
                _append(fh, rec)
                done[rec["key"]] = rec["result"]
                bar.update(1)


def scheduler_address(config: BenchConfig) -> tuple[str | None, str]:
    """The Dask scheduler the cells go to (None: local joblib) and where that came from, for
    messages. 'local' ignores $DASK_SCHEDULER_ADDRESS."""
    if config.scheduler:
        address, origin = config.scheduler.strip(), f"--scheduler {config.scheduler.strip()}"
    else:
        address = os.environ.get("DASK_SCHEDULER_ADDRESS", "").strip()
        origin = f"--scheduler (DASK_SCHEDULER_ADDRESS={address})"
    return (None if address.lower() in ("", "local") else address), origin


WORKERS_TIMEOUT_S = 60


@contextlib.contextmanager
def _dask_client(config: BenchConfig) -> Iterator[object]:
    """A dask.distributed Client of the configured scheduler, with at least one worker, closed on
    exit (the cluster itself is the user's and stays up); None without a scheduler."""
    address, origin = scheduler_address(config)
    if address is None:
        yield None
        return
    try:
        from distributed import Client
        from distributed.comm.addressing import get_address_host_port
    except ImportError:
        raise UsageError(f'{origin}: Dask is not installed; pip install "featx[dask]"') from None
    try:
        get_address_host_port(address)
    except ValueError as e:
        raise UsageError(f"{origin}: {e}; give the scheduler as tcp://HOST:8786") from None
    try:
        client = Client(address, set_as_default=False)
    except (OSError, TimeoutError, asyncio.TimeoutError) as e:  # distinct classes before Python 3.11
        raise FeatxError(
            f"{origin}: cannot reach the Dask scheduler ({e}); start it (dask scheduler) or fix the address"
        ) from None
    try:
        try:
            client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
        except (TimeoutError, asyncio.TimeoutError):
            raise FeatxError(f"{origin}: the Dask scheduler has no workers after {WORKERS_TIMEOUT_S} s; "
                             f"start some (dask worker {address})") from None  # fmt: skip
        threads = sum(client.nthreads().values())
        log.info("the cells go to the Dask cluster at %s (%d worker threads)", address, threads)
        if threads == 1:  # joblib runs a one-job Parallel in the calling process
            log.warning("%s: the cluster has 1 worker thread, so joblib fits the cells here, in this process; "
                        "start more workers to fit them there", origin)  # fmt: skip
        yield client
    finally:
        client.close()


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


# selection and uncertainty of each cell (issue 17); absent from cells fitted by older releases
CELL_EXTRAS = ("val_tiebreak", "val_source", "n_val", "test_ci_low", "test_ci_high", "test_correct", "val_rule",
               "val_folds")


@dataclass
class BenchResult:
    config: BenchConfig
    sources: list[Source]
    cells: list[tuple[Cell, dict]]
    notes: list[str]
    scores: dict[tuple[int, str], dict] = field(default_factory=dict)  # (source, layer) -> scores record
    finetune: list[tuple] = field(default_factory=list)  # (FinetuneCell, result) of the fine-tune cells

    def _scores(self, cell: Cell, pixels: bool) -> dict:
        """`score_<metric>` columns: filled on the rows of the train size the scores were taken at."""
        from featx.scores import METRICS

        rec = {} if pixels else self.scores.get((cell.source, cell.layer), {})
        on = "scores" in rec and rec["train_size"] == str(cell.train_size)
        return {f"score_{m}": rec["scores"][m] if on else None for m in METRICS}

    def rows(self) -> list[dict]:
        """One flat row per cell, for results.csv/json."""
        out = []
        for cell, r in self.cells:
            src = self.sources[cell.source]
            pixels = cell.layer == "pixels" and cell.codes == src.pixels
            out.append({
                "kind": "probe", "model": "pixels" if pixels else src.model, "control_of": "" if pixels else src.control_of,
                "dataset": src.name, "similarity_label": src.data.label or "", "layer": cell.layer,
                "relative_depth": None if pixels else src.depth[cell.layer], "code_dim": r["dim"],
                "train_size": r["train_size"], "train_size_spec": str(cell.train_size), "classifier": r["classifier"],
                "preset": r["preset"] or "", "C": r["C"], "seed": cell.seed, "accuracy": r["accuracy"],
                "balanced_accuracy": r["balanced_accuracy"], "val_score": r["val_score"], "n_test": r["n_test"],
                "fit_seconds": r["fit_seconds"], "baseline": "pixels" if pixels else "",
                **{k: r.get(k) for k in CELL_EXTRAS}, **self._scores(cell, pixels),
            })  # fmt: skip
        if self.finetune:
            from featx.bench_finetune import finetune_rows

            out += finetune_rows(self.config, self.finetune)
        return out
