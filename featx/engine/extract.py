"""`extract`: the job that turns images into one HDF5 cache entry of CNN codes.

The flow: settings (`featx.settings`) -> list the data (cheap) -> try the request memo (a repeat
command returns here, without importing torch) -> plan (`featx.models.plan.resolve`: skeleton on the
meta device, layers, preprocessing) placed on a device (precision, decoder, cache key) -> lock the
entry -> load weights -> the batched loop of `featx.engine.compute` (decode and resize in loader workers,
normalize on the device, one forward for all taps, a background thread appending to the
journal) -> finalize the HDF5 file atomically (`featx.store.finalize`).

Interrupted runs resume from the last committed batch with the batch size they started with, so
a resumed file holds exactly the codes an uninterrupted run gives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from featx import __version__
from featx.engine import distributed
from featx.engine.autotune import forced_precision
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
from featx.errors import FeatxError, Interrupted, first_line
from featx.models.plan import Plan, request_key, resolve
from featx.settings import CodeSettings, DataOptions, ModelSettings, RunSettings, gather
from featx.sources.dataset import Dataset
from featx.sources.spec import open_source
from featx.store.cache import (
    CacheEntry,
    EntryLock,
    default_cache_dir,
    ensure_writable,
    entry_path,
    is_locked,
    remove_stale_temporaries,
    tidy_complete,
)
from featx.store.finalize import finalize
from featx.store.journal import Journal, journal_path, read_progress
from featx.store.meta import FORMAT_VERSION, FileMeta, LayerMeta

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




def _lib_versions() -> dict[str, str]:
    out = {}
    for lib in ("torch", "torchvision", "timm", "h5py", "numpy", "pillow", "scikit-learn"):
        with contextlib.suppress(PackageNotFoundError):
            out[lib] = version(lib)
    out["featx"] = __version__
    out["python"] = sys.version.split()[0]
    return out


def extract(
    model: ModelSettings | str,
    data: str | Dataset,
    codes: CodeSettings | str | Sequence[str] = "depth:1.0",
    *,
    run: RunSettings | None = None,
    data_options: DataOptions | None = None,
    cache_dir: str | None = None,
    strict: bool = False,
    wait: bool = True,
    progress: bool = True,
    timings: Timings | None = None,
    **options,
) -> ExtractResult:
    """Extract the codes of `model` (a `ModelSettings` or a model name) for every image of `data`
    into the cache; return the file. A repeated call returns the cached file (`hit=True`) at once.

    `codes`: a `CodeSettings`, or its layers as a string/list: module names and/or `depth:`
    fractions ("layer2,layer4" or "depth:0.25,0.5,1.0"). `run`: a `RunSettings` (device, batch
    size, workers, precision, channels-last, decoder, compile). Any field of the three settings
    may also be passed as a keyword (`weights="none", pool="avg2x2", precision="fp32"`).
    `timings`: an `engine.Timings` that receives the seconds of each phase (benchmarks).
    `progress`: a progress bar on stderr (tqdm) while images are computed; `progress=False` silences it.
    """
    t0 = time.perf_counter()
    mset, cset, rset = gather(model, codes, run, options, caller="extract")
    opts = data_options or DataOptions()
    ds = data if isinstance(data, Dataset) else open_source(data, opts)
    for note in ds.notes:
        log.warning(note)
    cache_dir = ensure_writable(cache_dir or default_cache_dir())
    precision = rset.precision
    if precision == "auto":
        precision = forced_precision() or "auto"  # a forced decision is a different request
    call = _Call(mset, cset, rset, precision, ds, opts, strict, wait, progress, t0, timings)
    request = request_key(mset, cset, precision, rset.decoder, _data_key(ds), _lib_versions())
    entry = CacheEntry(cache_dir, request)
    if distributed.requested(rset.distributed):
        return replace(_extract_distributed(call, entry), uncapped_train=ds.uncapped_train)
    if entry.remembered():
        return replace(_hit_result(entry.path, t0), uncapped_train=ds.uncapped_train)

    with _phase(timings, "plan (meta skeleton, probe on meta, key)"):
        job = _job(call, resolve(mset, cset), rset, precision)
    if entry.find(ds.name, str(job.plan.model), job.key):
        return replace(_hit_result(entry.path, t0), uncapped_train=ds.uncapped_train)
    with entry.locked(wait=wait):
        if entry.ready():  # another process finished it while we waited (a damaged file is set aside)
            return replace(_hit_result(entry.path, t0), uncapped_train=ds.uncapped_train)
        with _Work.start(call, job, entry.path) as work:
            result = _loop(work)
    entry.remember()
    return replace(result, uncapped_train=ds.uncapped_train)


@dataclass(frozen=True)
class _Call:
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
class _Job:
    """A plan placed on a device: the decisions `auto` left open, and the entry's key."""

    plan: Plan
    device: object  # torch.device
    precision: str
    decoder: str  # 'pil' | 'torchvision'
    key: str


def _job(call: _Call, plan: Plan, rset: RunSettings, precision: str) -> _Job:
    dev = resolve_device(rset.device)
    prec = decide_precision(precision, plan.model, dev, plan.preprocess.crop_size)
    dec = decide_decoder(rset.decoder, dev)
    row_bytes = sum(plan.dims) * np.dtype(plan.dtype).itemsize
    n = len(call.ds)
    if row_bytes > _HUGE_ROW_BYTES:
        log.warning(
            "codes take %.1f MiB per image (%.1f GiB for %d images) with --pool %s; consider --pool avg or avg2x2",
            row_bytes / 2**20, row_bytes * n / 2**30, n, plan.pool,
        )  # fmt: skip
    return _Job(plan, dev, prec, dec, plan.cache_key(prec, dec, _data_key(call.ds)))


@dataclass
class _Work:
    """A job being computed: the call, the placed plan (taps of the loaded module), the backbone and
    its code computer, and the entry's path."""

    call: _Call
    job: _Job
    backbone: object  # models.build.Backbone
    computer: object  # engine.compute.CodeComputer
    path: str

    @classmethod
    @contextlib.contextmanager
    def start(cls, call: _Call, job: _Job, path: str):
        """Load the weights and place the network; the computer is closed when the block ends."""
        with _phase(call.timings, "load_model (build + init weights)"):
            backbone, plan = load_backbone(job.plan)  # a checkpoint may rebuild the head: taps of what was loaded
        job = replace(job, plan=plan)
        with _phase(call.timings, "model to device / hooks"):
            computer = computer_for(plan, backbone.module, job.device, job.precision, cls.channels_last(call),
                                    call.run.compile, call.timings)  # fmt: skip
        try:
            yield cls(call, job, backbone, computer, path)
        finally:
            computer.close()

    @staticmethod
    def channels_last(call: _Call) -> bool:
        return call.run.channels_last in ("on", "auto")

    @property
    def workers(self) -> int:
        return resolve_workers(self.call.run.workers)


def _data_key(ds: Dataset) -> str:
    """The data's part of the cache keys: its fingerprint, plus the image size limits when they are not
    the defaults (FEATX_MAX_IMAGE_PIXELS / FEATX_MAX_ASPECT_RATIO decide which images are skipped)."""
    from featx.sources.decode import limits_key

    return ds.fingerprint + limits_key()


def _hit_result(path: str, t0: float) -> ExtractResult:
    import h5py

    tidy_complete(path)
    with h5py.File(path, "r") as f:
        rows = int(f.attrs["rows"])
        samples = int(f.attrs.get("samples", rows))
        layers = [x.decode() if isinstance(x, bytes) else str(x) for x in f.attrs.get("layers", [])]
        skipped = list(zip(f["skipped/paths"].asstr()[:].tolist(), f["skipped/reasons"].asstr()[:].tolist()))
    log.info("cache hit: %s (%d rows, %d layers)", path, rows, len(layers))
    return ExtractResult(path, True, rows, samples, layers, skipped, seconds=time.perf_counter() - t0)


# -- the job -------------------------------------------------------------------------------------


def _loop(work: _Work) -> ExtractResult:
    ds, path = work.call.ds, work.path
    prior = read_progress(path)
    bs = _batch_size(work, prior["meta"] if prior is not None else None)
    if os.path.isdir(distributed.shards_path(path)):
        log.warning("%s holds rows of an interrupted distributed run; only a run under torchrun resumes from them (this one removes them when done)",
                    distributed.shards_path(path))  # fmt: skip
    journal = _open_journal(journal_path(path), _journal_meta(work, bs))
    start = journal.samples_done
    if journal.resumed:
        log.info("resuming %s at image %d of %d", os.path.basename(path), start, len(ds))
    bar = _progress_bar(work.call.progress, len(ds), start, os.path.basename(path))
    t_loop = time.perf_counter()
    try:
        _fill(work, journal, start, len(ds), bs, lambda n: bar.update(n))
    finally:
        bar.close()
    loop_seconds = time.perf_counter() - t_loop
    _check_rows(journal, ds)
    result = _finish(work, journal, bs, start, loop_seconds)
    shutil.rmtree(distributed.shards_path(path), ignore_errors=True)  # the entry is complete: shards are moot
    return result


def _batch_size(work: _Work, prior_meta: dict | None) -> int:
    """The batch size of an interrupted run of this entry (resumed rows must come from identical
    batches), else the one asked for, or the autotuned one."""
    from featx.engine.autotune import choose_batch_size

    job, asked = work.job, work.call.run.batch_size
    if prior_meta is not None and prior_meta.get("key") == job.key:
        bs = int(prior_meta["batch_size"])
        if asked not in ("auto", bs):
            log.warning("resuming with batch size %d of the interrupted run (not %s), so codes match an uninterrupted run",
                        bs, asked)  # fmt: skip
        return bs
    if asked == "auto":
        return choose_batch_size(work.computer, job.plan.preprocess, job.device, str(job.plan.model))
    return int(asked)


def _journal_meta(work: _Work, bs: int) -> dict:
    job = work.job
    return {
        "key": job.key, "layers": [[t.name, d] for t, d in zip(job.plan.chosen, work.computer.dims)],
        "dtype": job.plan.dtype, "samples": len(work.call.ds), "batch_size": bs, "featx": __version__,
    }  # fmt: skip


def _open_journal(jpath: str, meta: dict) -> Journal:
    try:
        return Journal.open(jpath, meta)
    except OSError as e:
        raise FeatxError(f"cannot write {jpath} ({e.strerror or e}); free space or fix permissions "
                         f"and rerun") from None  # fmt: skip


def _fill(work: _Work, journal: Journal, start: int, stop: int, bs: int, advanced) -> None:
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


def _check_rows(journal, ds: Dataset) -> None:
    if journal.rows_done == 0:
        first = journal.skipped[0] if journal.skipped else None
        detail = f" (first: {ds.ids[first[0]]}: {first[1]})" if first else ""
        journal.close()
        raise FeatxError(f"none of the {len(ds)} images could be decoded{detail}")


def _finish(work: _Work, journal, bs: int, start: int, loop_seconds: float) -> ExtractResult:
    """Finalize `journal` (a Journal or a distributed.ShardSet) into the entry; the result."""
    ds, path, plan = work.call.ds, work.path, work.job.plan
    with _phase(work.call.timings, "finalize (HDF5 gzip + fsync + rename)"):
        finalize(
            path, journal, classes=ds.classes, labels=ds.labels, splits=ds.splits, ids=ds.ids, groups=ds.groups,
            layer_attrs=_layer_attrs(plan), attrs=_file_attrs(work, bs),
        )  # fmt: skip
    skipped = [(ds.ids[i], r) for i, r in journal.skipped]
    for ident, reason in skipped:
        log.warning("skipped %s: %s", ident, reason)
    seconds = time.perf_counter() - work.call.t0
    log.info("wrote %s: %d rows x %d layers in %.1fs (%.1f images/s)", path, journal.rows_done, len(plan.chosen),
             seconds, (len(ds) - start) / max(loop_seconds, 1e-9))  # fmt: skip
    return ExtractResult(
        path, False, journal.rows_done, len(ds), list(plan.layers), skipped, plan.resolved, seconds, start
    )


def _progress_bar(enabled: bool, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc=desc[:40], file=sys.stderr, disable=not enabled,
                mininterval=0.5 if sys.stderr.isatty() else 10.0, dynamic_ncols=True)  # fmt: skip


def _layer_attrs(plan: Plan) -> dict[str, dict]:
    return {t.name: LayerMeta.from_tap(t, plan.activations[t.name], plan.pool).to_attrs() for t in plan.chosen}


def _file_attrs(work: _Work, bs: int) -> dict:
    job, call, ds, plan = work.job, work.call, work.call.ds, work.job.plan
    return FileMeta(
        featx_version=__version__, format_version=FORMAT_VERSION, cache_key=job.key, model=str(plan.model),
        weights=plan.weights.spec, weights_source=plan.weights.source, weights_ident=plan.weights.ident,
        weights_sha256=work.backbone.weights.sha256 or "", preprocessing=plan.preprocess.to_dict(),
        preprocessing_text=str(plan.preprocess), image_size=plan.preprocess.crop_size, dataset=ds.spec,
        dataset_name=ds.name, dataset_fingerprint=ds.fingerprint, split_source=ds.split_source,
        data_options=call.opts.to_dict(), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        library_versions=_lib_versions(), layers=plan.layers, layer_resolution=plan.resolved, pool=str(plan.pool),
        relu_mode=plan.relu_mode, dtype=plan.dtype, precision=job.precision, device=str(job.device), batch_size=bs,
        workers=work.workers, channels_last=_Work.channels_last(call), compile=call.run.compile,
        decoder=job.decoder, samples=len(ds), labelled=None if ds.labelled else False,
        config={"layers": list(plan.layers), "activations": plan.activations, "pool": str(plan.pool)},
    ).to_attrs()  # fmt: skip


# -- the job spread over the ranks of torchrun (featx.engine.distributed has the design) ----------------


def _extract_distributed(call: _Call, entry: CacheEntry) -> ExtractResult:
    with distributed.joined() as world:
        call = replace(call, run=replace(call.run, device=world.device(call.run.device)))
        try:
            return _ranked(world, call, entry)
        except BaseException as e:
            with contextlib.suppress(Exception):  # the others repeat it instead of waiting for a timeout
                world.publish(f"error/{world.rank}", first_line(e))
            raise


def _ranked(world, call: _Call, entry: CacheEntry) -> ExtractResult:
    ds = call.ds
    if world.main:  # rank 0 settles what `auto` leaves open (it may measure), the others take its choices
        job = _job(call, resolve(call.model, call.codes), call.run, call.precision)
        world.publish("choices", {"precision": job.precision, "decoder": job.decoder})
    else:
        chosen = world.wait_for("choices", [0], "rank 0 plans the job")
        job = _job(call, resolve(call.model, call.codes), replace(call.run, decoder=chosen["decoder"]),
                   chosen["precision"])  # fmt: skip
    keys = world.gather("key", job.key, "comparing the ranks' cache keys")
    odd = [r for r, k in enumerate(keys) if k != keys[0]]
    if odd:
        raise FeatxError(f"rank {odd[0]} computes cache key {keys[odd[0]][:16]}, rank 0 {keys[0][:16]}: every rank "
                         f"must run the same command on the same data and featx version")  # fmt: skip
    if not world.main:
        entry.path = entry_path(entry.cache_dir, ds.name, str(job.plan.model), job.key)
        decision = world.wait_for("decision", [0], "rank 0 locks the entry")
        if decision.get("hit"):
            return ExtractResult(entry.path, True, 0, len(ds), list(job.plan.layers), rank=world.rank)
        return _build(world, call, job, entry.path)
    if entry.find(ds.name, str(job.plan.model), job.key):
        world.publish("decision", {"hit": True})
        return _hit_result(entry.path, call.t0)
    with contextlib.ExitStack() as held:
        held.push(_lock_beating(world, entry.path, call.wait))  # entered: released when the block ends
        remove_stale_temporaries(entry.path)
        if entry.ready():
            shutil.rmtree(distributed.shards_path(entry.path), ignore_errors=True)
            world.publish("decision", {"hit": True})
            return _hit_result(entry.path, call.t0)
        world.publish("decision", {"hit": False})
        result = _build(world, call, job, entry.path)
    entry.remember()
    return result


def _lock_beating(world, path: str, wait: bool):
    """The entry lock for rank 0, beating while another job holds it (the other ranks watch the beats)."""
    warned = False
    while True:
        try:
            return EntryLock(path, wait=False).__enter__()
        except FeatxError:
            if not wait or not is_locked(path):
                raise
        if not warned:
            log.warning("waiting for another featx process that is writing %s", os.path.basename(path))
            warned = True
        world.beat()
        time.sleep(0.2)


def _build(world, call: _Call, job: _Job, path: str) -> ExtractResult:
    ds = call.ds
    with _Work.start(call, job, path) as work:
        rows = _plan_rows(world, work)
        meta = _journal_meta(work, rows["bs"])
        distributed.probe(world, path, rows["nonce"])
        bar = _progress_bar(call.progress and world.main, len(ds), rows["initial"], os.path.basename(path))
        t_loop = time.perf_counter()
        try:
            _fill_slice(world, work, meta, rows, bar)
            world.publish(f"done/{world.rank}", True)
            if not world.main:
                world.wait_for("entry", [0], "rank 0 assembles the entry")
                return ExtractResult(path, False, 0, len(ds), list(work.job.plan.layers), rank=world.rank)
            for r in range(world.size):
                world.wait_for(
                    f"done/{r}",
                    [r],
                    f"rank {r} computes its rows",
                    tick=lambda: _show(world, bar, rows["initial"]),
                )
            _show(world, bar, rows["initial"])
        finally:
            bar.close()
        shards = distributed.ShardSet(path, meta, distributed.committed_shards(path, meta), len(ds))
        _check_rows(shards, ds)
        result = _finish(work, shards, rows["bs"], rows["initial"], time.perf_counter() - t_loop)
        world.publish("entry", path)
        return result


def _plan_rows(world, work: _Work) -> dict:
    """Rank 0 reads every shard and gives each rank the missing rows of its slice; all get the plan."""
    if not world.main:
        return world.wait_for("work", [0], "rank 0 plans the rows")
    path, job = work.path, work.job
    prior = distributed.prior_meta(path, job.key)
    bs = _batch_size(work, prior)
    shards = distributed.committed_shards(path, _journal_meta(work, bs))
    rows = {"bs": bs, "nonce": distributed.new_nonce(), "initial": sum(s.done - s.start for s in shards),
            "ranges": distributed.assign(path, shards, len(work.call.ds), world.size)}  # fmt: skip
    if rows["initial"]:
        log.info("resuming %s: %d of %d images are committed in its shards", os.path.basename(path),
                 rows["initial"], len(work.call.ds))  # fmt: skip
    world.publish("work", rows)
    return rows


def _fill_slice(world, work: _Work, meta: dict, rows: dict, bar) -> None:
    """This rank's missing rows, each range into its journal shard; progress counted on the store."""

    def advanced(n: int) -> None:
        world.add("images", n)
        world.beat()
        if world.main:
            _show(world, bar, rows["initial"])

    for start, stop in rows["ranges"][world.rank]:
        journal = _open_journal(distributed.shard_dir(work.path, start), distributed.shard_meta(meta, start, stop))
        at = max(start, journal.samples_done)
        if at < stop:
            _fill(work, journal, at, stop, rows["bs"], advanced)
        journal.close()


def _show(world, bar, initial: int) -> None:
    """Rank 0's bar: the images every rank has done (a store counter), so its rate is the job's."""
    done = initial + world.add("images", 0)
    if done > bar.n:
        bar.update(done - bar.n)
