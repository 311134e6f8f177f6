"""The extract job: one call's settled inputs (`Call`), its plan placed on a device (`Job`), the
loaded network at work (`Work`), and the steps from a journal to a finished entry: the batched
loop, resume, finalize. `featx.engine.extract` runs it, in one process or across torchrun ranks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from featx import __version__
from featx.engine import distributed
from featx.engine.compute import (
    ImageSequence,
    JournalWriter,
    Timings,
    collate,
    computer_for,
    decide_decoder,
    decide_precision,
    load_backbone,
    make_loader,
    resolve_device,
    resolve_workers,
    timed_batches,
)
from featx.engine.compute import phase as _phase
from featx.errors import FeatxError, Interrupted, UsageError, first_line
from featx.models.plan import Plan
from featx.settings import CodeSettings, DataOptions, ModelSettings, RunSettings
from featx.sources.autogroups import threshold_of
from featx.sources.cutting import regroup_journal
from featx.sources.dataset import Dataset
from featx.store.cache import (
    tidy_complete,
)
from featx.store.finalize import finalize
from featx.store.journal import Journal, journal_path, read_progress
from featx.store.meta import FORMAT_VERSION, FileMeta, LayerMeta
from featx.store.parts import parts_path

log = logging.getLogger("featx")


_HUGE_ROW_BYTES = 1 << 20


@dataclass
class ExtractResult:
    """What `extract` did. `path` is the complete HDF5 file."""

    path: str
    hit: bool
    rows: int
    samples: int
    layers: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    resolved: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    resumed_from: int = 0
    uncapped_train: int | None = None  # training images before --per-class-limit removed some
    rank: int = 0  # of a distributed job: only rank 0 reports the path


def lib_versions() -> dict[str, str]:
    out = {}
    for lib in ("torch", "torchvision", "timm", "h5py", "numpy", "pillow", "scikit-learn"):
        with contextlib.suppress(PackageNotFoundError):
            out[lib] = version(lib)
    out["featx"] = __version__
    out["python"] = sys.version.split()[0]
    return out


@dataclass(frozen=True)
class Call:
    """One `extract` call's inputs, settled once; every step below reads them from here."""

    model: ModelSettings
    codes: CodeSettings
    run: RunSettings
    precision: str  # the requested precision ('auto' unless given or forced)
    ds: Dataset
    opts: DataOptions
    strict: bool
    wait: bool
    progress: bool
    t0: float
    timings: Timings | None


@dataclass(frozen=True)
class Job:
    """A plan placed on a device: the decisions `auto` left open, and the entry's key."""

    plan: Plan
    device: object  # torch.device
    precision: str
    decoder: str  # 'pil' | 'torchvision'
    key: str


def place_job(call: Call, plan: Plan, rset: RunSettings, precision: str) -> Job:
    dev = resolve_device(rset.device)
    prec = decide_precision(precision, plan.model, dev, plan.preprocess.crop_size)
    dec = decide_decoder(rset.decoder, dev)
    row_bytes = sum(plan.dims) * np.dtype(plan.dtype).itemsize
    n = len(call.ds)
    if row_bytes > _HUGE_ROW_BYTES:
        log.warning(
            "codes take %.1f MiB per image (%.1f GiB for %d images) with --pool %s; consider --pool avg or avg2x2",
            row_bytes / 2**20,
            row_bytes * n / 2**30,
            n,
            plan.pool,
        )
    return Job(plan, dev, prec, dec, plan.cache_key(prec, dec, data_key(call.ds)))


@dataclass
class Work:
    """A job being computed: the call, the placed plan (taps of the loaded module), the backbone and
    its code computer, and the entry's path."""

    call: Call
    job: Job
    backbone: object  # models.build.Backbone
    computer: object  # engine.compute.CodeComputer
    path: str

    @classmethod
    @contextlib.contextmanager
    def start(cls, call: Call, job: Job, path: str):
        """Load the weights and place the network; the computer is closed when the block ends."""
        with _phase(call.timings, "load_model (build + init weights)"):
            backbone, plan = load_backbone(
                job.plan
            )  # a checkpoint may rebuild the head: taps of what was loaded
        job = replace(job, plan=plan)
        with _phase(call.timings, "model to device / hooks"):
            computer = computer_for(
                plan,
                backbone.module,
                job.device,
                job.precision,
                cls.channels_last(call),
                call.run.compile,
                call.timings,
            )
        try:
            yield cls(call, job, backbone, computer, path)
        finally:
            computer.close()

    @staticmethod
    def channels_last(call: Call) -> bool:
        return call.run.channels_last in ("on", "auto")

    @property
    def workers(self) -> int:
        return resolve_workers(self.call.run.workers)


def data_key(ds: Dataset) -> str:
    """The data's part of the cache keys: its fingerprint, plus the image size limits when they are not
    the defaults (FEATX_MAX_IMAGE_PIXELS / FEATX_MAX_ASPECT_RATIO decide which images are skipped)."""
    from featx.sources.decode import limits_key

    return ds.fingerprint + limits_key()


def hit_result(path: str, t0: float) -> ExtractResult:
    import h5py

    tidy_complete(path)
    with h5py.File(path, "r") as f:
        rows = int(f.attrs["rows"])
        samples = int(f.attrs.get("samples", rows))
        layers = [x.decode() if isinstance(x, bytes) else str(x) for x in f.attrs.get("layers", [])]
        skipped = list(zip(f["skipped/paths"].asstr()[:].tolist(), f["skipped/reasons"].asstr()[:].tolist()))
    log.info("cache hit: %s (%d rows, %d layers)", path, rows, len(layers))
    return ExtractResult(path, True, rows, samples, layers, skipped, seconds=time.perf_counter() - t0)


def run_loop(work: Work) -> ExtractResult:
    ds, path = work.call.ds, work.path
    prior = read_progress(path)
    bs = batch_size(work, prior["meta"] if prior is not None else None)
    if os.path.isdir(distributed.shards_path(path)):
        log.warning(
            "%s holds rows of an interrupted distributed run; only a run under torchrun resumes from them (this one removes them when done)",
            distributed.shards_path(path),
        )
    journal = open_journal(journal_path(path), journal_meta(work, bs))
    start = journal.samples_done
    if journal.resumed:
        log.info("resuming %s at image %d of %d", os.path.basename(path), start, len(ds))
    bar = progress_bar(work.call.progress, len(ds), start, os.path.basename(path))
    t_loop = time.perf_counter()
    try:
        fill(work, journal, start, len(ds), bs, lambda n: bar.update(n))
    finally:
        bar.close()
    loop_seconds = time.perf_counter() - t_loop
    check_rows(journal, ds)
    shutil.rmtree(
        parts_path(path), ignore_errors=True
    )  # an interrupted assembly's part files: this file holds the codes
    result = finish(work, journal, bs, start, loop_seconds)
    shutil.rmtree(distributed.shards_path(path), ignore_errors=True)  # the entry is complete: shards are moot
    return result


def batch_size(work: Work, prior_meta: dict | None) -> int:
    """The batch size of an interrupted run of this entry (resumed rows must come from identical
    batches), else the one asked for, or the autotuned one."""
    from featx.engine.autotune import choose_batch_size

    job, asked = work.job, work.call.run.batch_size
    if prior_meta is not None and prior_meta.get("key") == job.key:
        bs = int(prior_meta["batch_size"])
        if asked not in ("auto", bs):
            log.warning(
                "resuming with batch size %d of the interrupted run (not %s), so codes match an uninterrupted run",
                bs,
                asked,
            )
        return bs
    if asked == "auto":
        return choose_batch_size(work.computer, job.plan.preprocess, job.device, str(job.plan.model))
    return int(asked)


def journal_meta(work: Work, bs: int) -> dict:
    job = work.job
    return {
        "key": job.key,
        "layers": [[t.name, d] for t, d in zip(job.plan.chosen, work.computer.dims)],
        "dtype": job.plan.dtype,
        "samples": len(work.call.ds),
        "batch_size": bs,
        "featx": __version__,
    }


def open_journal(jpath: str, meta: dict) -> Journal:
    try:
        return Journal.open(jpath, meta)
    except OSError as e:
        raise FeatxError(
            f"cannot write {jpath} ({e.strerror or e}); free space or fix permissions and rerun"
        ) from None


def fill(work: Work, journal: Journal, start: int, stop: int, bs: int, advanced) -> None:
    """The batched loop: images [start, stop) of the data through the computer into `journal`
    (closed on any exit; Ctrl-C keeps what was committed). `advanced(n)` after each batch of n images."""
    job, ds, timings = work.job, work.call.ds, work.call.timings
    dev, pre = job.device, job.plan.preprocess
    if job.decoder == "torchvision":
        from featx.sources.decode import RawImages, collate_raw, decode_batch

        dataset, collate_fn = RawImages(ds.loader, stop, pre, start), collate_raw
    else:
        dataset, collate_fn = ImageSequence(ds.load, stop, pre, start), collate
    loader = make_loader(dataset, bs, work.workers, pin_memory=dev.type == "cuda", collate_fn=collate_fn)
    out_dtype = np.float16 if job.plan.dtype == "float16" else np.float32
    writer, at = JournalWriter(journal, timings=timings), start
    try:
        for index, images, bad, samples_done in timed_batches(loader, timings):
            if job.decoder == "torchvision":
                images, kept, failed = decode_batch(images, pre, dev)
                bad = bad + [(int(index[k]), reason) for k, reason in failed]
                index = index[kept]
            if bad and work.call.strict:
                i, reason = min(bad)
                raise FeatxError(f"{ds.ids[i]}: {reason} (--strict stops at the first undecodable image)")
            codes = [c.astype(out_dtype, copy=False) for c in work.computer(images)]
            writer.put(codes, index, samples_done, sorted(bad))
            advanced(samples_done - at)
            at = samples_done
    except KeyboardInterrupt:
        writer.close()
        journal.close()
        raise Interrupted(
            f"interrupted: {journal.samples_done} of {len(ds)} images are kept in {journal.path}; "
            f"rerun the same command to resume"
        ) from None
    except BaseException:
        try:
            writer.close()
        finally:
            journal.close()
        raise
    writer.close()


def check_rows(journal, ds: Dataset) -> None:
    if journal.rows_done == 0:
        first = journal.skipped[0] if journal.skipped else None
        detail = f" (first: {ds.ids[first[0]]}: {first[1]})" if first else ""
        journal.close()
        raise FeatxError(f"none of the {len(ds)} images could be decoded{detail}")


def finish(work: Work, journal, bs: int, start: int, loop_seconds: float, parts=None) -> ExtractResult:
    """Finalize `journal` (a Journal or a distributed.ShardSet) into the entry; the result. `parts`:
    the sealed part files of a distributed run, which the entry then references instead of a copy."""
    ds, path, plan, opts = work.call.ds, work.path, work.job.plan, work.call.opts
    splits, groups = ds.splits, ds.groups
    if (auto := threshold_of(opts.group_by)) is not None:  # groups from the codes, split redone around them
        with _phase(work.call.timings, "auto groups (--group-by auto)"):
            try:
                splits, groups, notes = regroup_journal(
                    journal, {t.name: t.depth for t in plan.chosen}, ds, auto, opts.test_fraction, opts.seed
                )
            except UsageError as e:  # the journal stays complete: a rerun of this command recomputes nothing
                if hasattr(journal, "close"):
                    journal.close()
                raise UsageError(
                    f"{first_line(e)} (the codes of {journal.rows_done} images are kept as this entry's "
                    f"complete partial journal: rerunning this command reuses them; featx cache rm removes them)"
                ) from None
        for note in notes:
            log.warning(note)
    with _phase(work.call.timings, "finalize (HDF5 gzip + fsync + rename)"):
        finalize(
            path,
            journal,
            classes=ds.classes,
            labels=ds.labels,
            splits=splits,
            ids=ds.ids,
            groups=groups,
            layer_attrs=_layer_attrs(plan),
            attrs=_file_attrs(work, bs),
            parts=parts,
        )
    skipped = [(ds.ids[i], r) for i, r in journal.skipped]
    for ident, reason in skipped:
        log.warning("skipped %s: %s", ident, reason)
    seconds = time.perf_counter() - work.call.t0
    log.info(
        "wrote %s: %d rows x %d layers in %.1fs (%.1f images/s)",
        path,
        journal.rows_done,
        len(plan.chosen),
        seconds,
        (len(ds) - start) / max(loop_seconds, 1e-9),
    )
    return ExtractResult(
        path, False, journal.rows_done, len(ds), list(plan.layers), skipped, plan.resolved, seconds, start
    )


def progress_bar(enabled: bool, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="img",
        desc=desc[:40],
        file=sys.stderr,
        disable=not enabled,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
        dynamic_ncols=True,
    )


def _layer_attrs(plan: Plan) -> dict[str, dict]:
    return {
        t.name: LayerMeta.from_tap(t, plan.activations[t.name], plan.pool).to_attrs() for t in plan.chosen
    }


def _file_attrs(work: Work, bs: int) -> dict:
    job, call, ds, plan = work.job, work.call, work.call.ds, work.job.plan
    return FileMeta(
        featx_version=__version__,
        format_version=FORMAT_VERSION,
        cache_key=job.key,
        model=str(plan.model),
        weights=plan.weights.spec,
        weights_source=plan.weights.source,
        weights_ident=plan.weights.ident,
        weights_sha256=work.backbone.weights.sha256 or "",
        preprocessing=plan.preprocess.to_dict(),
        preprocessing_text=str(plan.preprocess),
        image_size=plan.preprocess.crop_size,
        dataset=ds.spec,
        dataset_name=ds.name,
        dataset_fingerprint=ds.fingerprint,
        split_source=ds.split_source,
        data_options=call.opts.to_dict(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        library_versions=lib_versions(),
        layers=plan.layers,
        layer_resolution=plan.resolved,
        pool=str(plan.pool),
        relu_mode=plan.relu_mode,
        dtype=plan.dtype,
        precision=job.precision,
        device=str(job.device),
        batch_size=bs,
        workers=work.workers,
        channels_last=Work.channels_last(call),
        compile=call.run.compile,
        decoder=job.decoder,
        samples=len(ds),
        labelled=None if ds.labelled else False,
        config={"layers": list(plan.layers), "activations": plan.activations, "pool": str(plan.pool)},
    ).to_attrs()
