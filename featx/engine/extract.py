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
import time
from collections.abc import Sequence
from dataclasses import replace

from featx.engine import distributed
from featx.engine.autotune import forced_precision
from featx.engine.compute import (
    Timings,
)
from featx.engine.compute import phase as _phase
from featx.engine.job import (
    Call,
    ExtractResult,
    Job,
    Work,
    batch_size,
    check_rows,
    data_key,
    fill,
    finish,
    hit_result,
    journal_meta,
    lib_versions,
    open_journal,
    place_job,
    progress_bar,
    run_loop,
)
from featx.errors import FeatxError, first_line
from featx.models.plan import request_key, resolve
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
)
from featx.store.parts import parts_path

log = logging.getLogger("featx")


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
    call = Call(mset, cset, rset, precision, ds, opts, strict, wait, progress, t0, timings)
    request = request_key(mset, cset, precision, rset.decoder, data_key(ds), lib_versions())
    entry = CacheEntry(cache_dir, request)
    if distributed.requested(rset.distributed):
        return replace(_extract_distributed(call, entry), uncapped_train=ds.uncapped_train)
    if entry.remembered():
        return replace(hit_result(entry.path, t0), uncapped_train=ds.uncapped_train)

    with _phase(timings, "plan (meta skeleton, probe on meta, key)"):
        job = place_job(call, resolve(mset, cset), rset, precision)
    if entry.find(ds.name, str(job.plan.model), job.key):
        return replace(hit_result(entry.path, t0), uncapped_train=ds.uncapped_train)
    with entry.locked(wait=wait):
        if entry.ready():  # another process finished it while we waited (a damaged file is set aside)
            return replace(hit_result(entry.path, t0), uncapped_train=ds.uncapped_train)
        with Work.start(call, job, entry.path) as work:
            result = run_loop(work)
    entry.remember()
    return replace(result, uncapped_train=ds.uncapped_train)


def _extract_distributed(call: Call, entry: CacheEntry) -> ExtractResult:
    with distributed.joined() as world:
        call = replace(call, run=replace(call.run, device=world.device(call.run.device)))
        try:
            return _ranked(world, call, entry)
        except BaseException as e:
            with contextlib.suppress(Exception):  # the others repeat it instead of waiting for a timeout
                world.publish(f"error/{world.rank}", first_line(e))
            raise


def _ranked(world, call: Call, entry: CacheEntry) -> ExtractResult:
    ds = call.ds
    distributed.assembly()  # a wrong FEATX_DIST_ASSEMBLY is one line before any compute
    if world.main:  # rank 0 settles what `auto` leaves open (it may measure), the others take its choices
        job = place_job(call, resolve(call.model, call.codes), call.run, call.precision)
        world.publish("choices", {"precision": job.precision, "decoder": job.decoder})
    else:
        chosen = world.wait_for("choices", [0], "rank 0 plans the job")
        job = place_job(
            call,
            resolve(call.model, call.codes),
            replace(call.run, decoder=chosen["decoder"]),
            chosen["precision"],
        )
    keys = world.gather("key", job.key, "comparing the ranks' cache keys")
    odd = [r for r, k in enumerate(keys) if k != keys[0]]
    if odd:
        raise FeatxError(
            f"rank {odd[0]} computes cache key {keys[odd[0]][:16]}, rank 0 {keys[0][:16]}: every rank "
            f"must run the same command on the same data and featx version"
        )
    if not world.main:
        entry.path = entry_path(entry.cache_dir, ds.name, str(job.plan.model), job.key)
        decision = world.wait_for("decision", [0], "rank 0 locks the entry")
        if decision.get("hit"):
            return ExtractResult(entry.path, True, 0, len(ds), list(job.plan.layers), rank=world.rank)
        return _build(world, call, job, entry.path)
    if entry.find(ds.name, str(job.plan.model), job.key):
        world.publish("decision", {"hit": True})
        return hit_result(entry.path, call.t0)
    with contextlib.ExitStack() as held:
        held.push(_lock_beating(world, entry.path, call.wait))  # entered: released when the block ends
        remove_stale_temporaries(entry.path)
        if entry.ready():
            shutil.rmtree(distributed.shards_path(entry.path), ignore_errors=True)
            world.publish("decision", {"hit": True})
            return hit_result(entry.path, call.t0)
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


def _build(world, call: Call, job: Job, path: str) -> ExtractResult:
    ds = call.ds
    with Work.start(call, job, path) as work:
        rows = _plan_rows(world, work)
        meta = journal_meta(work, rows["bs"])
        distributed.probe(world, path, rows["nonce"])
        bar = progress_bar(call.progress and world.main, len(ds), rows["initial"], os.path.basename(path))
        t_loop = time.perf_counter()
        try:
            _fill_slice(world, work, meta, rows, bar)
            world.publish(f"done/{world.rank}", True)
            if not world.main:
                plan = world.wait_for("seal", [0], "rank 0 checks the shards")
                if plan is not None:
                    world.publish(f"sealed/{world.rank}", distributed.seal(path, meta, plan[world.rank]))
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
        loop_seconds = time.perf_counter() - t_loop
        shards = distributed.ShardSet(path, meta, distributed.committed_shards(path, meta), len(ds))
        check_rows(shards, ds)
        parts = _seal(world, path, meta, shards, rows["ranges"], call.timings)
        result = finish(work, shards, rows["bs"], rows["initial"], loop_seconds, parts)
        world.publish("entry", path)
        return result


def _seal(world, path: str, meta: dict, shards, ranges: list, timings) -> list | None:
    """Rank 0: every rank seals its shards into part files, in parallel; the parts in row order
    (None with FEATX_DIST_ASSEMBLY=copy: rank 0 then copies every row into one file)."""
    if distributed.assembly() == "copy":
        shutil.rmtree(parts_path(path), ignore_errors=True)  # an earlier virtual assembly's, moot now
        world.publish("seal", None)
        return None
    with _phase(timings, "seal part files (every rank, in parallel)"):
        plan = distributed.seal_plan(shards.shards, ranges, world.size)
        world.publish("seal", plan)
        sealed = [distributed.seal(path, meta, plan[0])]
        for r in range(1, world.size):
            sealed.append(world.wait_for(f"sealed/{r}", [r], f"rank {r} seals its part files"))
    return distributed.ordered_parts(sealed, shards.shards)


def _plan_rows(world, work: Work) -> dict:
    """Rank 0 reads every shard and gives each rank the missing rows of its slice; all get the plan."""
    if not world.main:
        return world.wait_for("work", [0], "rank 0 plans the rows")
    path, job = work.path, work.job
    prior = distributed.prior_meta(path, job.key)
    bs = batch_size(work, prior)
    shards = distributed.committed_shards(path, journal_meta(work, bs))
    rows = {
        "bs": bs,
        "nonce": distributed.new_nonce(),
        "initial": sum(s.done - s.start for s in shards),
        "ranges": distributed.assign(path, shards, len(work.call.ds), world.size),
    }
    if rows["initial"]:
        log.info(
            "resuming %s: %d of %d images are committed in its shards",
            os.path.basename(path),
            rows["initial"],
            len(work.call.ds),
        )
    world.publish("work", rows)
    return rows


def _fill_slice(world, work: Work, meta: dict, rows: dict, bar) -> None:
    """This rank's missing rows, each range into its journal shard; progress counted on the store."""

    def advanced(n: int) -> None:
        world.add("images", n)
        world.beat()
        if world.main:
            _show(world, bar, rows["initial"])

    for start, stop in rows["ranges"][world.rank]:
        journal = open_journal(
            distributed.shard_dir(work.path, start), distributed.shard_meta(meta, start, stop)
        )
        at = max(start, journal.samples_done)
        if at < stop:
            fill(work, journal, at, stop, rows["bs"], advanced)
        journal.close()


def _show(world, bar, initial: int) -> None:
    """Rank 0's bar: the images every rank has done (a store counter), so its rate is the job's."""
    done = initial + world.add("images", 0)
    if done > bar.n:
        bar.update(done - bar.n)
