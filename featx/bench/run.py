"""`bench`: layer transferability over datasets x layers x train sizes x classifiers x seeds.

Each dataset is extracted once (through the cache, so reruns reuse it, and a `featx extract` of the
same model, data and layers is the same entry); with `--head-confidence` the ImageNet classifier
head goes into a second, one-layer entry (its confidence on the target images is reported). Then every cell is fitted with `classify.fit_cell`, in parallel with
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
Every (model, dataset, layer) is also scored by featx.classifiers.scores on the training rows of the largest
train size (seed 0's draw, as the probes' seed-0 cell draws it, before any validation hold-out),
resumably in `scores.jsonl`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from featx.bench.config import BenchConfig
from featx.bench.costs import layer_costs
from featx.bench.grid import Cell, Source, grid, prepare
from featx.bench.scoring import score_sources
from featx.classifiers.cost import with_layer_cost
from featx.classifiers.fit import fit_cell
from featx.errors import FeatxError, UsageError, first_line
from featx.files import CELLS_FILE, FolderLock, append_record, load_done, make_out_dir, open_log

log = logging.getLogger("featx")


def run_cell(cell: Cell) -> dict:
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


def run(config: BenchConfig, progress: bool = False) -> BenchResult:
    """Extract, fit every missing cell, and return everything the report needs."""
    if not config.datasets:
        raise UsageError("featx bench: give at least one --data")
    make_out_dir(config.out)
    with FolderLock(config.out, f"--out {config.out}: another featx bench is writing there"):
        result = _run(config, progress)
    if not result.cells and not any("error" not in r for _, r in result.finetune):
        # nothing measured: every cell was refused (or none could be made); the reason, not "0 cells"
        notes = result.notes
        reason = next(
            (n for n in notes if "not fitted" in n or "not run" in n), notes[0] if notes else "no cell"
        )
        raise UsageError(f"featx bench: no cell could be fitted; {reason}")
    return result


def _run(config: BenchConfig, progress: bool) -> BenchResult:
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
    costs, cost_notes = layer_costs(config, sources)  # after the cells: nothing else runs beside the timing
    notes += cost_notes
    ft_cells = []
    if config.finetune:  # after the probes: each fine-tune uses every core
        from featx.bench.finetune_cells import run_finetune_cells

        ft_cells = run_finetune_cells(config, config.finetune, config.finetune_settings, progress)
        notes += [
            f"{bd.spec} fine-tune from {c.point}, train size {c.train_size}, seed {c.seed}: not run ({r['error']})"
            for c, r in ft_cells
            if "error" in r
            for bd in [config.datasets[c.source]]
        ]
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
        config,
        sources,
        [(c, done[c.key]) for c in cells if "error" not in done[c.key]],
        notes,
        layer_scores,
        ft_cells,
        costs,
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
                delayed(run_cell)(replace(c, codes=os.path.abspath(c.codes))) for c in todo
            )
            fitted = 0
            try:
                for rec in jobs:
                    append_record(fh, rec)
                    done[rec["key"]] = rec["result"]
                    bar.update(1)
                    fitted += 1
            except (OSError, TimeoutError, asyncio.TimeoutError, concurrent.futures.CancelledError) as e:
                if client is None or client.status == "running":
                    raise
                kept, origin = total - len(todo) + fitted, scheduler_address(config)[1]
                raise FeatxError(
                    f"{origin}: lost the Dask scheduler mid-grid ({type(e).__name__}); the {kept} "
                    f"finished cells are kept in {CELLS_FILE}: rerun to fit the rest (with --scheduler "
                    f"local to fit them here)"
                ) from None


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


def _probe_scheduler(address: str, origin: str) -> float:
    """Ask `address` who it is, within Dask's connect timeout, before a Client is made: a port that
    is not a Dask scheduler (an HTTP server, a silent socket) would otherwise hang the Client's
    handshake or make it allocate what the peer's first bytes claim as a frame length. Returns the
    timeout (seconds)."""
    import dask
    from dask.utils import parse_timedelta
    from distributed.comm import connect

    timeout = float(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s"))
    if address.startswith("tcp://") or "://" not in address:
        _probe_tcp(address, origin, timeout)

    async def identity():
        comm = await connect(address, timeout=timeout)
        try:
            await asyncio.wait_for(comm.write({"op": "identity", "reply": True}), timeout)
            return await asyncio.wait_for(comm.read(), timeout)
        finally:
            comm.abort()

    try:
        asyncio.get_running_loop()
        return timeout  # inside an event loop (a notebook): the handshake check above has to do
    except RuntimeError:
        pass
    try:
        reply = asyncio.run(identity())
    except (OSError, TimeoutError, asyncio.TimeoutError) as e:
        if _refused(e):
            raise FeatxError(
                f"{origin}: cannot reach the Dask scheduler ({first_line(e)}); start it (dask scheduler) "
                f"or fix the address"
            ) from None
        reason = (
            f"no Dask answer within {timeout:g} s"
            if isinstance(e, (TimeoutError, asyncio.TimeoutError))
            else first_line(e)
        )
        raise FeatxError(
            f"{origin}: not a Dask scheduler ({reason}); give the scheduler's own address "
            f"(dask scheduler prints it; port 8786 by default)"
        ) from None
    except Exception as e:  # noqa: BLE001 (a foreign peer's bytes make Dask's decoder raise anything: MemoryError too)
        raise FeatxError(
            f"{origin}: not a Dask scheduler (its reply is not Dask's: {type(e).__name__}); give the "
            f"scheduler's own address (dask scheduler prints it; port 8786 by default)"
        ) from None
    if not isinstance(reply, dict) or reply.get("type") != "Scheduler":
        kind = reply.get("type") if isinstance(reply, dict) else type(reply).__name__
        raise FeatxError(
            f"{origin}: a Dask {kind}, not a scheduler, answers there; give the scheduler's address"
        )
    return timeout


MAX_HANDSHAKE = 1 << 20  # bytes: a Dask handshake is a few hundred


def _probe_tcp(address: str, origin: str, timeout: float) -> None:
    """A Dask peer speaks first: on accept it sends its handshake, one frame behind an 8-byte length.
    A silent port (an HTTP server waits for a request) or a first frame of absurd length is not Dask."""
    import struct

    from distributed.comm.addressing import get_address_host_port

    host, port = get_address_host_port(address)
    fix = "give the scheduler's own address (dask scheduler prints it; port 8786 by default)"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise FeatxError(
            f"{origin}: cannot reach the Dask scheduler ({e.strerror or first_line(e)}); start it "
            f"(dask scheduler) or fix the address"
        ) from None
    with sock:
        head = b""
        try:
            while len(head) < 8:
                chunk = sock.recv(8 - len(head))
                if not chunk:
                    raise FeatxError(
                        f"{origin}: not a Dask scheduler (it closed the connection without a word); {fix}"
                    )
                head += chunk
        except OSError as e:  # socket.timeout included
            what = f"no Dask handshake within {timeout:g} s" if isinstance(e, TimeoutError) else first_line(e)
            raise FeatxError(f"{origin}: not a Dask scheduler ({what}); {fix}") from None
    (size,) = struct.unpack("<Q", head)
    if not 0 < size <= MAX_HANDSHAKE:
        raise FeatxError(
            f"{origin}: not a Dask scheduler (its first bytes are not a Dask message: {head[:8]!r}); {fix}"
        )


def _refused(e: BaseException) -> bool:
    """A connection that was never made (nothing listens, no route), as opposed to a peer that spoke wrongly."""
    text = str(e).lower()
    return any(
        w in text
        for w in (
            "refused",
            "no route",
            "name or service",
            "timed out trying to connect",
            "unreachable",
            "nodename nor servname",
        )
    )


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
    timeout = _probe_scheduler(address, origin)
    try:
        client = Client(address, set_as_default=False, timeout=timeout)
    except (OSError, TimeoutError, asyncio.TimeoutError) as e:  # distinct classes before Python 3.11
        raise FeatxError(
            f"{origin}: cannot reach the Dask scheduler ({e}); start it (dask scheduler) or fix the address"
        ) from None
    # Dask's own tracebacks of a lost connection would bury featx's one line
    quiet = [
        logging.getLogger(n)
        for n in list(logging.root.manager.loggerDict)
        if n.split(".")[0] == "distributed"
    ]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    try:
        try:
            client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
        except (TimeoutError, asyncio.TimeoutError):
            raise FeatxError(
                f"{origin}: the Dask scheduler has no workers after {WORKERS_TIMEOUT_S} s; "
                f"start some (dask worker {address})"
            ) from None
        threads = sum(client.nthreads().values())
        log.info("the cells go to the Dask cluster at %s (%d worker threads)", address, threads)
        if threads == 1:  # joblib runs a one-job Parallel in the calling process
            log.warning(
                "%s: the cluster has 1 worker thread, so joblib fits the cells here, in this process; "
                "start more workers to fit them there",
                origin,
            )
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.close(timeout=5)
        for q, lv in zip(quiet, levels):
            q.setLevel(lv)


# selection and uncertainty of each cell; absent from cells fitted by older releases
CELL_EXTRAS = (
    "val_tiebreak",
    "val_source",
    "n_val",
    "test_ci_low",
    "test_ci_high",
    "test_correct",
    "val_rule",
    "val_folds",
    "k",
    "temperature",
)


def _cost_fields(result: dict, cost) -> dict:
    """A probe row's COST_FIELDS (featx.classifiers.cost); a cell fitted before they existed knows no
    classifier parameters (None)."""
    from featx.engine.cost import COST_FIELDS

    full = with_layer_cost({"trainable_params": None, **result}, cost)
    return {k: full.get(k) for k in COST_FIELDS}


@dataclass
class BenchResult:
    config: BenchConfig
    sources: list[Source]
    cells: list[tuple[Cell, dict]]
    notes: list[str]
    scores: dict[tuple[int, str], dict] = field(default_factory=dict)  # (source, layer) -> scores record
    finetune: list[tuple] = field(default_factory=list)  # (FinetuneCell, result) of the fine-tune cells
    costs: dict = field(default_factory=dict)  # (codes path, layer) -> LayerCost (featx.bench.costs)

    def _scores(self, cell: Cell, pixels: bool) -> dict:
        """`score_<metric>` columns: filled on the rows of the train size the scores were taken at."""
        from featx.classifiers.scores import METRICS

        rec = {} if pixels else self.scores.get((cell.source, cell.layer), {})
        on = "scores" in rec and rec["train_size"] == str(cell.train_size)
        return {f"score_{m}": rec["scores"][m] if on else None for m in METRICS}

    def rows(self) -> list[dict]:
        """One flat row per cell, for results.csv/json."""
        out = []
        for cell, r in self.cells:
            src = self.sources[cell.source]
            pixels = cell.layer == "pixels" and cell.codes == src.pixels
            out.append(
                {
                    "kind": "probe",
                    "model": "pixels" if pixels else src.model,
                    "control_of": "" if pixels else src.control_of,
                    "dataset": src.name,
                    "similarity_label": src.data.label or "",
                    "layer": cell.layer,
                    "relative_depth": None if pixels else src.depth[cell.layer],
                    "code_dim": r["dim"],
                    "train_size": r["train_size"],
                    "train_size_spec": str(cell.train_size),
                    "classifier": r["classifier"],
                    "preset": r["preset"] or "",
                    "C": r["C"],
                    "seed": cell.seed,
                    "accuracy": r["accuracy"],
                    "balanced_accuracy": r["balanced_accuracy"],
                    "val_score": r["val_score"],
                    "n_test": r["n_test"],
                    "fit_seconds": r["fit_seconds"],
                    "baseline": "pixels" if pixels else "",
                    **{k: r.get(k) for k in CELL_EXTRAS},
                    **self._scores(cell, pixels),
                    **{
                        k: (src.leakage or {}).get(k) for k in ("leakage_fraction", "leaky")
                    },  # neardup.leak_check
                    **_cost_fields(r, self.costs.get((cell.codes, cell.layer))),
                }
            )
        if self.finetune:
            from featx.bench.finetune_cells import finetune_rows

            out += finetune_rows(self.config, self.finetune)
        return out
