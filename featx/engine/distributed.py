"""One extraction across many processes (`torchrun ... -m featx extract`): world detection, joining
and leaving, timed waits that name a dead rank, row slices, and the shards that become one entry.

`featx.engine.extract` stays the job (request memo, plan, lock, loop, finalize); this module only
supplies the pieces a job spread over ranks needs. The design:

- **Who is distributed.** `featx extract` started by torchrun (or srun, or by hand) with `RANK`,
  `WORLD_SIZE`, `LOCAL_RANK` and `MASTER_ADDR`/`MASTER_PORT` in its environment, or given
  `--distributed` (which then requires those variables); in the library, `RunSettings(distributed=True)`
  (never implied by the environment, so a DDP script calling `extract` on each rank is unaffected). `torchrun --nproc-per-node 1` is a
  world of one and uses the same shard machinery, so it resumes from any world size.
- **Joining.** `env://` rendezvous and a gloo process group, both with the timeout
  `FEATX_DIST_TIMEOUT` (seconds, default 600). Only small control messages cross the network
  (decisions, progress counts, heartbeats): codes go through the cache directory, so gloo is the
  backend on CPU and on CUDA alike. Each rank computes on `cuda:LOCAL_RANK` when the device is
  `auto`/`cuda` and CUDA is there, else on the CPU. Rank 0 resolves `auto` precision and decoder
  (and the batch size) and the others take its choices, so every rank computes the same key;
  the keys are compared anyway (a rank given other data or options fails, naming itself).
- **Timeouts.** `FEATX_DIST_TIMEOUT` (seconds, default 300) bounds the rendezvous, the process
  group's collectives and the start-up `monitored_barrier` (its error names the missing ranks).
  Every later wait is a poll of the job's c10d store that watches the heartbeat counters of the
  ranks it waits for (each rank beats once a second from a daemon thread, and after every
  batch): a rank whose counter stands still for the timeout is named in the error (its process
  died, or lost the store), and a rank that fails publishes its one-line error under
  `error/<rank>`, which the others repeat at once instead of waiting for the timeout. Under
  torchrun the agent also stops the other ranks of a node as soon as one exits non-zero.
- **Rows.** Rank r of W owns the contiguous planned rows [r*N//W, (r+1)*N//W): no padding, no
  duplicates (not DistributedSampler). Loader workers inside a rank see only that slice.
- **Shards on disk.** `ENTRY.h5.shards/from-<start>/` is an ordinary `store.Journal` (the same
  crash-safe format: fsync'ed rows, CRC32s, atomic progress record) whose meta adds
  `"shard": [start, stop]`; its samples counter is absolute, so it has committed the sample
  range [start, max(start, samples_done)).
- **Resume, any world size.** Rank 0 (holding the entry lock) opens every shard of the entry,
  which validates it exactly as a single journal is (a damaged one is set aside and counts as
  empty), takes the union of the committed ranges, and gives each rank the missing parts of its
  own slice: a missing range that starts where a shard's committed rows end, and ends at that
  shard's stop, resumes that shard; any other gets a new shard. Committed ranges never overlap,
  and the assembled rows are checked to tile [0, N) exactly.
- **Locking.** Rank 0 holds `ENTRY.h5.lock` from the decision to the rename of the finished file;
  the other ranks wait for its decision on the store (rank 0 beats while it waits for another
  job's lock), so two jobs, distributed or not, still serialize on the entry.
- **Shared filesystem.** The cache directory must be one filesystem every rank sees. Each rank
  writes a probe with this job's nonce into the shards folder and checks everyone's; a rank that
  cannot see another's makes every rank fail with one line naming both, before any compute.
- **Assembling.** Rank 0, once every rank has published "done", checks the shards as a
  `ShardSet` (the shards read in row order as one journal: they must tile [0, N)) and hands each
  shard to a rank to seal (`seal_plan`: the rank that wrote it in this run, any other to the
  least loaded); every rank seals its shards into part files (`store.parts`: HDF5, gzip,
  fletcher32, sha256, fsync'ed and renamed into place) in parallel, and rank 0 builds the entry
  with `store.finalize(..., parts=...)`: the row metadata plus `/codes/<layer>` as virtual datasets
  over the parts, renamed into place last. Its name, key and what readers see are those of a
  one-process run; no rank copies more than its own rows. `FEATX_DIST_ASSEMBLY=copy` restores the
  single-file assembly (rank 0 copies every row). Then rank 0 publishes the path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import numpy as np

from featx.errors import FeatxError, UsageError
from featx.store.cache import SHARD_NAME, shard_range, shards_path
from featx.store.journal import Journal, LayerSpec, journal_progress
from featx.store.parts import Part, seal_part

log = logging.getLogger("featx")

ENV_TIMEOUT = "FEATX_DIST_TIMEOUT"
ENV_ASSEMBLY = "FEATX_DIST_ASSEMBLY"
ASSEMBLIES = ("virtual", "copy")
DEFAULT_TIMEOUT = 300.0
_ENV = ("RANK", "WORLD_SIZE")
_BEAT_SECONDS = 1.0
_calls = 0  # extract() calls in this process: keeps each job's store keys apart


def timeout_seconds() -> float:
    """FEATX_DIST_TIMEOUT (seconds, > 0), default 300."""
    text = os.environ.get(ENV_TIMEOUT, "")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
        if value > 0:
            return value
    except ValueError:
        pass
    raise UsageError(f"{ENV_TIMEOUT}={text!r}: use a number of seconds > 0")


def assembly() -> str:
    """FEATX_DIST_ASSEMBLY: 'virtual' (default: part files referenced by the entry) or 'copy' (one file)."""
    text = os.environ.get(ENV_ASSEMBLY, "").strip() or "virtual"
    if text not in ASSEMBLIES:
        raise UsageError(f"{ENV_ASSEMBLY}={text!r}: use one of {', '.join(ASSEMBLIES)}")
    return text


def in_launcher() -> bool:
    """True when a launcher (torchrun, srun, ...) set RANK and WORLD_SIZE: the CLI's default for `--distributed`."""
    return all(k in os.environ for k in _ENV)


def requested(flag: bool) -> bool:
    """`flag` (RunSettings.distributed), checked: a rank needs the launcher's environment. The
    library never turns distributed on by itself, so a user's own DDP script that calls `extract`
    on each rank keeps one-process extractions; `featx extract` defaults the flag to `in_launcher()`."""
    if flag and not in_launcher():
        raise UsageError(
            "--distributed: RANK and WORLD_SIZE are not set; start featx with "
            "`torchrun --nproc-per-node N -m featx extract ...` (or srun setting them)"
        )
    if flag:
        check_launcher_env()
    return flag


def check_launcher_env() -> None:
    """RANK, WORLD_SIZE and LOCAL_RANK as a launcher must set them, at once: a rank out of range would
    otherwise wait for a rendezvous that can never complete."""
    env = {k: os.environ.get(k, "").strip() for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    vals = {}
    for k, v in env.items():
        if k == "LOCAL_RANK" and not v:
            continue
        try:
            vals[k] = int(v)
        except ValueError:
            raise UsageError(f"{k}={v!r} is not a whole number; check the launcher's settings") from None
    rank, size = vals["RANK"], vals["WORLD_SIZE"]
    if size < 1 or not 0 <= rank < size:
        raise UsageError(
            f"RANK={rank} WORLD_SIZE={size}: RANK must be one of 0..WORLD_SIZE-1 and WORLD_SIZE at least "
            f"1; check the launcher's settings"
        )
    if vals.get("LOCAL_RANK", 0) < 0:
        raise UsageError(f"LOCAL_RANK={vals['LOCAL_RANK']} is negative; check the launcher's settings")


def row_slice(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous rows of `n`: [rank*n//W, (rank+1)*n//W) (sizes differ by at most 1)."""
    return rank * n // world_size, (rank + 1) * n // world_size


class World:
    """This rank's place in the job, and the job's store (timed, liveness-watched waits)."""

    def __init__(self, rank: int, size: int, local_rank: int, store, timeout: float):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.store, self.timeout = store, timeout
        self._beat_at = 0.0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, requested_device: str) -> str:
        """cuda:LOCAL_RANK for auto/cuda when CUDA is here; auto -> cpu otherwise; an explicit one as given."""
        import torch

        if requested_device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return "cpu" if requested_device == "auto" else requested_device

    def beat(self, force: bool = False) -> None:
        """A sign of life for the others (at most once a second unless forced)."""
        now = time.monotonic()
        if force or now - self._beat_at >= _BEAT_SECONDS:
            self._op(self.store.add, f"alive/{self.rank}", 1)
            self._beat_at = now

    def start_beating(self) -> threading.Event:
        """Beat once a second from a daemon thread (c10d store clients serialize their operations),
        so a long step (a model download, a big assembly) is not taken for a dead rank; set the
        returned event to stop."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(_BEAT_SECONDS):
                try:
                    self.store.add(f"alive/{self.rank}", 1)
                except Exception:  # noqa: BLE001 (the store is gone: the main thread reports it)
                    return

        threading.Thread(target=run, name="featx-heartbeat", daemon=True).start()
        return stop

    def publish(self, key: str, value) -> None:
        self._op(self.store.set, key, json.dumps(value))

    def add(self, key: str, amount: int) -> int:
        return int(self._op(self.store.add, key, amount))

    def wait_for(self, key: str, ranks, what: str, tick=None):
        """The value published under `key`, waiting while the `ranks` it may come from stay alive;
        FeatxError naming a rank that showed no sign of life for the timeout."""
        seen = {r: (-1, time.monotonic()) for r in ranks}
        while True:
            self.beat()
            if self._op(self.store.check, [key]):
                return json.loads(self._op(self.store.get, key).decode())
            now = time.monotonic()
            for r in ranks:
                if r != self.rank and self._op(self.store.check, [f"error/{r}"]):
                    error = json.loads(self._op(self.store.get, f"error/{r}").decode())
                    raise FeatxError(f"rank {r} of {self.size} failed: {error}")
                count = self.add(f"alive/{r}", 0)
                if count != seen[r][0]:
                    seen[r] = (count, now)
                elif now - seen[r][1] > self.timeout:
                    raise FeatxError(
                        f"rank {r} of {self.size} stopped (no sign of life for {self.timeout:g}s while {what}; its process died "
                        f"or lost the job store; {ENV_TIMEOUT} sets the wait): the committed rows are kept, rerun "
                        f"the same command to resume"
                    )
            if tick is not None:
                tick()
            time.sleep(0.1)

    def gather(self, key: str, value, what: str) -> list:
        """Every rank's `value` (each publishes its own; all wait for all)."""
        self.publish(f"{key}/{self.rank}", value)
        return [self.wait_for(f"{key}/{r}", [r], what) for r in range(self.size)]

    def _op(self, fn, *args):
        try:
            return fn(*args)
        except (RuntimeError, OSError) as e:  # the store's host (rank 0 or torchrun's agent) is gone
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise FeatxError(
                f"rank {self.rank}: lost the job's store ({first}): another rank or the launcher "
                f"stopped; rerun the same command to resume"
            ) from None


@contextlib.contextmanager
def joined():
    """Join the job (env:// rendezvous + gloo group, with the timeout) as a `World`; leave it after."""
    import torch.distributed as dist

    global _calls
    timeout = timeout_seconds()
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        store, _, _ = next(
            dist.rendezvous("env://", rank=rank, world_size=size, timeout=timedelta(seconds=timeout))
        )
        dist.init_process_group(
            "gloo",
            store=dist.PrefixStore("pg", store),
            rank=rank,
            world_size=size,
            timeout=timedelta(seconds=timeout),
        )
        dist.monitored_barrier(timeout=timedelta(seconds=timeout), wait_all_ranks=True)
    except (RuntimeError, ValueError, OSError) as e:  # DistError, DistStoreError, timeouts are RuntimeErrors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        raise FeatxError(
            f"rank {rank} of {size}: the ranks did not all join at {where} within {timeout:g}s "
            f"({ENV_TIMEOUT}) ({first}); a rank failed at start-up: see its error"
        ) from None
    _calls += 1
    prefix = f"featx/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_calls}"
    world = World(rank, size, local, dist.PrefixStore(prefix, store), timeout)
    world.beat(force=True)
    beating = world.start_beating()
    try:
        yield world
    finally:
        beating.set()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# -- shards --------------------------------------------------------------------------------------


def shard_dir(entry: str, start: int) -> str:
    return os.path.join(shards_path(entry), f"from-{start:012d}")


def shard_meta(meta: dict, start: int, stop: int) -> dict:
    return {**meta, "shard": [int(start), int(stop)]}


@dataclass(frozen=True)
class Shard:
    """A journal shard: sample range [start, stop) asked of it, [start, done) committed."""

    path: str
    start: int
    stop: int
    done: int


def _read_meta(path: str) -> dict | None:
    """A shard folder's journal meta.json, or None when it is missing or not a JSON object."""
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


def prior_meta(entry: str, key: str) -> dict | None:
    """The journal meta of an interrupted distributed run of this entry (its batch size must be kept), or None."""
    root = shards_path(entry)
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        meta = _read_meta(os.path.join(root, name))
        if meta is not None and meta.get("key") == key and isinstance(meta.get("batch_size"), int):
            return meta
    return None


def committed_shards(entry: str, meta: dict) -> list[Shard]:
    """The entry's shards that belong to `meta` (the job's journal meta), validated by opening each
    as a Journal (a damaged one is set aside and restarts empty); other shards are removed."""
    import shutil

    root, out = shards_path(entry), []
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    for name in names:
        path = os.path.join(root, name)
        if not SHARD_NAME.fullmatch(name):
            continue  # probes, and damaged shards set aside as from-N.corrupt (kept for inspection)
        found = _read_meta(path)
        rng = shard_range(found)
        if rng is None or not os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            continue
        same = {k: v for k, v in found.items() if k != "journal"} == shard_meta(meta, *rng)
        if not same:  # another configuration: a journal of it would be discarded too
            shutil.rmtree(path, ignore_errors=True)
            continue
        j = Journal.open(path, shard_meta(meta, *rng))
        j.close()
        out.append(Shard(path, rng[0], rng[1], max(rng[0], j.samples_done)))
    return out


def assign(entry: str, shards: list[Shard], n: int, world_size: int) -> list[list[tuple[int, int]]]:
    """Per rank, the (start, stop) journals to write: the missing parts of its slice, each resuming
    the shard whose committed rows end at its start and whose stop is its stop, or a new shard."""
    covered = sorted((s.start, s.done) for s in shards if s.done > s.start)
    work = []
    for r in range(world_size):
        lo, hi = row_slice(n, world_size, r)
        todo, at = [], lo
        for a, b in covered:
            if b <= at or a >= hi:
                continue
            if a > at:
                todo.append((at, a))
            at = max(at, b)
        if at < hi:
            todo.append((at, hi))
        work.append([_journal_range(shards, a, b) for a, b in todo])
    return work


def _journal_range(shards: list[Shard], a: int, b: int) -> tuple[int, int]:
    """The journal that fills missing rows [a, b): (start, stop) of the shard to open."""
    for s in shards:
        if s.done == a and s.stop == b:
            return s.start, s.stop  # resume it where it stopped
    return a, b


def probe(world: World, entry: str, nonce: str) -> None:
    """Fail on every rank, in one line, when some rank cannot see the files another wrote in the cache."""
    root = shards_path(entry)
    mine = os.path.join(root, f".probe-{world.rank}")
    try:
        os.makedirs(root, exist_ok=True)
        with open(mine, "w", encoding="utf-8") as f:
            f.write(nonce)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise FeatxError(f"rank {world.rank}: cannot write {mine} ({e.strerror or e})") from None
    world.gather("probe-written", True, "writing the shared-filesystem probes")
    unseen = []
    for r in range(world.size):
        try:
            with open(os.path.join(root, f".probe-{r}"), encoding="utf-8") as f:
                if f.read() != nonce:
                    unseen.append(r)
        except OSError:
            unseen.append(r)
    for r, missing in enumerate(world.gather("probe-seen", unseen, "checking the shared-filesystem probes")):
        if missing:
            raise FeatxError(
                f"rank {r} cannot see the files rank {missing[0]} wrote in {os.path.dirname(root)}: the cache "
                f"directory must be on a filesystem every rank sees (--cache-dir on a shared mount)"
            )
    with contextlib.suppress(OSError):
        os.remove(mine)


def new_nonce() -> str:
    return uuid.uuid4().hex


class ShardSet:
    """Finished shards read in row order as one journal: what `store.finalize` needs of a Journal
    (layers, itemsize, meta, rows_done, skipped, read_index, read_layer, path, close). Its `path`
    is the shards folder, which finalize removes once the entry is in place."""

    def __init__(self, entry: str, meta: dict, shards: list[Shard], n: int):
        self.path, self.meta = shards_path(entry), meta
        self.layers = [LayerSpec(name, int(d)) for name, d in meta["layers"]]
        self.itemsize = np.dtype(meta["dtype"]).itemsize
        self._parts: list[tuple[Journal, int]] = []  # (journal, first row) in row order
        self.shards: list[Shard] = []  # the shards holding rows, in row order
        at, rows, self.skipped = 0, 0, []
        for s in sorted((s for s in shards if s.done > s.start), key=lambda s: s.start):
            if s.start != at:
                raise FeatxError(
                    f"the shards in {self.path} do not cover rows {at} to {s.start}; rerun the same "
                    f"command to compute them"
                )
            j = read_shard(s.path, meta, s.start, s.stop)
            self._parts.append((j, rows))
            self.shards.append(s)
            rows += j.rows_done
            self.skipped.extend(j.skipped)
            at = s.done
        if at != n:
            raise FeatxError(
                f"the shards in {self.path} end at row {at} of {n}; rerun the same command to finish"
            )
        self.rows_done = rows

    def read_index(self) -> np.ndarray:
        parts = [j.read_index() for j, _ in self._parts]
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def read_layer(self, k: int, start: int, stop: int) -> np.ndarray:
        out = []
        for j, first in self._parts:
            a, b = max(start, first), min(stop, first + j.rows_done)
            if a < b:
                out.append(j.read_layer(k, a - first, b - first))
        dtype = self.meta["dtype"]
        return np.concatenate(out) if out else np.empty((0, self.layers[k].dim), dtype)

    def close(self) -> None:
        pass


def read_shard(path: str, meta: dict, start: int, stop: int) -> Journal:
    """A finished shard opened for reading: validated as a journal is, never truncated."""
    j = Journal(path, shard_meta(meta, start, stop))
    if j._try_resume():  # noqa: SLF001 (a read-only open: validates, never truncates)
        raise FeatxError(f"shard {path} disappeared while assembling; rerun the same command")
    return j


def seal_plan(shards: list[Shard], ranges: list[list], world_size: int) -> list[list[list[int]]]:
    """Per rank, the [start, stop] of the shards it seals into part files: a shard the rank wrote in
    this run (its `ranges`), and every other (finished by an earlier run) to the rank with the
    fewest rows so far, so the sealing is spread as the computing was."""
    owner = {tuple(r): k for k, rs in enumerate(ranges) for r in rs}
    plan: list[list[list[int]]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for s in shards:
        k = owner.get((s.start, s.stop))
        if k is None:
            k = min(range(world_size), key=lambda r: (load[r], r))
        plan[k].append([s.start, s.stop])
        load[k] += s.done - s.start
    return plan


def seal(entry: str, meta: dict, mine: list) -> list:
    """Seal this rank's shards ([start, stop] each) into part files: [[start, Part json], ...]."""
    out = []
    for start, stop in mine:
        path = shard_dir(entry, start)
        prog = journal_progress(path)
        if prog is None:
            raise FeatxError(f"shard {path} is damaged or gone while assembling; rerun the same command")
        part = seal_part(entry, read_shard(path, meta, start, stop), start, prog["checksum"])
        out.append([start, part.to_json()])
    return out


def ordered_parts(sealed: list[list], shards: list[Shard]) -> list[Part]:
    """Every rank's sealed parts in row order, checked to be exactly the shards."""
    found = {int(start): Part.from_json(p) for per_rank in sealed for start, p in per_rank}
    if sorted(found) != [s.start for s in shards]:
        raise FeatxError("the ranks sealed other shards than asked; rerun the same command")
    return [found[s.start] for s in shards]
