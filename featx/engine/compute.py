"""The compute engine: device, model with taps, loader, batching, and the journal writer thread.

Everything that computes codes goes through here (`extract`, `Predictor`, `CNNCodes`, autotune
and benchmarks/extract_speed.py), so every path computes them the same way: decode and resize
on the CPU (`ImageSequence` in loader workers), normalize on the device, channels-last and
autocast as asked, one forward for all taps (`CodeComputer`). `decide_precision` is the one
policy for what `precision="auto"` means on a device.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

import numpy as np

from featx.errors import FeatxError, UsageError
from featx.sources.decode import ImageError

log = logging.getLogger("featx")


# -- timing hook ---------------------------------------------------------------------------------


class Timings:
    """Seconds per phase, accumulated thread-safely: pass one as `extract(..., timings=)` (or to
    `CodeComputer`, `JournalWriter`, `timed_batches`) to see where a run's time goes. Costs a few
    `perf_counter` calls per batch; without one, nothing is measured."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}  # bytes and calls: code_bytes, index_bytes, appends
        self._lock = threading.Lock()

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + int(amount)


@contextlib.contextmanager
def phase(timings: Timings | None, name: str):
    """Time the block into `timings[name]` (no-op for None)."""
    if timings is None:
        yield
        return
    t = time.perf_counter()
    try:
        yield
    finally:
        timings.add(name, time.perf_counter() - t)


def timed_batches(loader, timings: Timings | None):
    """The loader's batches; with `timings`, the waits for them (the first one separately:
    worker start-up plus the first decode)."""
    if timings is None:
        yield from loader
        return
    it, first = iter(loader), True
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        finally:
            timings.add(
                "loop: first batch (worker start + decode)" if first else "loop: waiting for data",
                time.perf_counter() - t,
            )
        first = False
        yield item


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: Apple's MPS is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    return dev


class ImageSequence:
    """Images [start, n) for a data loader: (index, uint8 CHW tensor or None, error or None).
    `load(i)` returns a PIL image or raises ImageError."""

    def __init__(self, load, n: int, preprocess, start: int = 0):
        self.load, self.n, self.pre, self.start = load, n, preprocess, start

    def __len__(self) -> int:
        return self.n - self.start

    def __getitem__(self, k: int):
        i = self.start + k
        try:
            return i, self.pre.to_uint8(self.load(i)), None
        except ImageError as e:
            return i, None, e.reason


def collate(items):
    import torch

    ok = [(i, t) for i, t, _ in items if t is not None]
    bad = [(i, err) for i, t, err in items if t is None]
    images = torch.stack([t for _, t in ok]) if ok else None
    return np.array([i for i, _ in ok], dtype=np.int64), images, bad, items[-1][0] + 1


class JournalWriter:
    """A background thread appending finished batches to the journal, so disk I/O and fsync
    overlap the next forward pass. The queue is short: memory stays bounded."""

    def __init__(self, journal, depth: int = 4, timings: Timings | None = None):
        import queue

        self.journal, self.timings = journal, timings
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="featx-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None:
                try:
                    codes, index, samples_done, skipped = item
                    with phase(self.timings, "[writer thread] journal append"):
                        self.journal.append(codes, index, samples_done, skipped)
                    if self.timings is not None:
                        self.timings.count("code_bytes", sum(int(c.nbytes) for c in codes))
                        self.timings.count("index_bytes", 8 * len(index))
                        self.timings.count("appends")
                except BaseException as e:  # re-raised in the main thread
                    self.error = e

    def put(self, codes, index, samples_done, skipped) -> None:
        self._raise()
        with phase(self.timings, "loop: writer.put blocked"):
            self.q.put((codes, index, samples_done, skipped))

    def close(self) -> None:
        with phase(self.timings, "writer drain at end"):
            self.q.put(None)
            self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            if isinstance(err, OSError):
                raise FeatxError(
                    f"writing {self.journal.path} failed ({err.strerror or err}); {self.journal.rows_done} rows are kept "
                    f"there: free space or fix permissions and rerun the same command to resume"
                ) from None
            raise err


def auto_workers() -> int:
    """One decoding process per core but one (the forward uses every core), 1 to 8. Measured on
    2 CPU cores (benchmarks/extract_speed.py): 0, 1 and 2 workers are within 5% in fp32; in bf16,
    where the forward is ~3x faster and decoding matters, 1 worker is fastest."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class CodeComputer:
    """A model on its device with hooks on the chosen taps: uint8 image batches in, codes out.

    Shared by `extract`, `featx predict` and `CNNCodes`, so every path computes codes the same
    way: normalize on the device, channels-last and autocast as asked, one forward for all taps.
    """

    def __init__(
        self,
        module,
        taps,
        activations: dict,
        pool,
        preprocess,
        device,
        precision: str = "fp32",
        channels_last: bool = True,
        compile: bool = False,
        timer: Timings | None = None,
    ):
        import torch

        from featx.models.taps import Tapper

        self.device = device
        self.timer = timer
        self.preprocess = preprocess
        self.channels_last = channels_last
        self.names = [t.name for t in taps]
        self.dims = [t.code_dim(pool) for t in taps]
        self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        module = module.to(device)
        self.module = module.to(memory_format=torch.channels_last) if channels_last else module
        self._tapper = Tapper(self.module, taps, activations, pool, stop_early=not compile).__enter__()
        if compile:  # hooks stay on the eager module; compiled graphs include them (no early stop)
            self._tapper.module = torch.compile(self.module)

    def __call__(self, images) -> list[np.ndarray]:
        """uint8 [N, 3, H, W] -> float32 codes per tap, [N, D] each."""
        import torch

        if images is None or len(images) == 0:
            return [np.empty((0, d), np.float32) for d in self.dims]
        with phase(self.timer, "loop: forward (CodeComputer)"), torch.inference_mode():
            images = images.to(self.device, non_blocking=True)
            if self.channels_last:  # reorder the uint8 bytes, not the floats: normalize keeps the format
                images = images.contiguous(memory_format=torch.channels_last)
            x = self.preprocess.normalize(images)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                out = self._tapper(x)
            return [out[n].to("cpu").numpy() for n in self.names]

    def close(self) -> None:
        self._tapper.__exit__(None, None, None)

    def __enter__(self) -> CodeComputer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_loader(dataset, batch_size: int, workers: int, pin_memory: bool, collate_fn=None):
    """Batches of a sample sequence, decoded and resized by `workers` processes (0: in this one)
    while the forward runs."""
    import torch

    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_fn or collate,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
    )


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_warned_workers: set[int] = set()


def resolve_workers(workers: int | str) -> int:
    """`auto` -> `auto_workers()`; a number above the usable cores is capped there (with one
    warning): more decoding processes than cores only add start-up time and contention."""
    if workers == "auto":
        return auto_workers()
    n, cap = int(workers), usable_cores()
    if n > cap:
        if n not in _warned_workers:
            _warned_workers.add(n)
            log.warning("--workers %d: this machine has %d usable cores; using %d workers", n, cap, cap)
        return cap
    return n


def decide_precision(requested: str, model, device, size: int) -> str:
    """What a precision request means on `device`: an explicit fp32/bf16/fp16 as given; `auto`
    the autotuned choice (fp32 or bf16, whichever is measured faster here for this model and
    input size, or what FEATX_AUTOTUNE forces). The one policy for extract, predict and CNNCodes."""
    from featx.engine.autotune import choose_precision

    return requested if requested != "auto" else choose_precision(model, device, size)


def decide_decoder(requested: str, device) -> str:
    """`auto`: batched torchvision decoding on CUDA, PIL in workers elsewhere."""
    return requested if requested != "auto" else ("torchvision" if device.type == "cuda" else "pil")


def load_backbone(plan):
    """(Backbone, plan with taps of the loaded module): the weights, on the CPU, in eval mode.

    The backbone carries the plan's resolved preprocessing (`--image-size`, `--crop-pct`), never the
    weights' default: fine-tuning, its saved model and extraction all run at the size the plan says.
    """
    from featx.models.build import build_backbone

    backbone = build_backbone(plan.model, plan.weights, plan.preprocess)
    return backbone, plan.with_module(backbone.module)


def computer_for(
    plan, module, device, precision: str, channels_last: bool = True, compile: bool = False, timer=None
) -> CodeComputer:
    """A CodeComputer for the plan's chosen layers."""
    return CodeComputer(
        module,
        plan.chosen,
        plan.activations,
        plan.pool,
        plan.preprocess,
        device,
        precision,
        channels_last,
        compile,
        timer=timer,
    )
