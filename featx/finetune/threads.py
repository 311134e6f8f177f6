"""How many CPU threads a fine-tune uses: the count measured fastest here, 1 or all cores.

The rule. torch's CPU kernels split each convolution over `torch.get_num_threads()` threads. On an
idle machine more threads help a large step; on a loaded one (other jobs on the same cores) every
thread of a parallel region waits for the slowest, so a step with all cores can be many times
slower than with one: on a shared 2-core machine a 32 px EfficientNet-Lite0 step of 32 images took
1.1-1.6 s with 1 thread and 8.4-19.5 s with 2. Small images (little work per kernel) lose most.
Which one wins depends on the load at the time and on the step's size, so featx measures it: before
training, `choose_threads` times the run's own training step (a copy of the network, a random batch
at the run's image and batch size, forward + backward) with 1 thread and with all cores, after one
untimed warm-up step each, `REPEATS` alternating timed steps, and keeps the count with the smaller
median. The measurement costs 2 + 2 x REPEATS steps, once per process and (model, freeze point,
image size, batch size). On CUDA nothing is measured (the device does the work).

The count is part of the run (recorded in the results and the checkpoints, so a resumed run keeps
the count it started with), never of the recipe (results do not depend on it beyond float
rounding). `FinetuneSettings(threads=N)` (`--threads N`) skips the measurement.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from contextlib import contextmanager

log = logging.getLogger("featx")

REPEATS = 3  # timed steps per candidate: the median of 3 shrugs off one step slowed by a neighbour's burst
_MEASURED: dict[tuple, tuple[int, dict]] = {}


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to `n` inside the block, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def choose_threads(
    module, point, size: int, batch: int, classes: int, key: tuple, method: str = "full"
) -> tuple[int, dict]:
    """(threads, {threads: images per second}) for training `module` (in train mode, frozen as
    `point` says) at `size` px and `batch` images per step; cached per process under `key`."""
    import torch

    from featx.finetune.freeze import train_mode

    candidates = sorted({1, cores()})
    if len(candidates) == 1:
        return 1, {}
    if key in _MEASURED:
        return _MEASURED[key]
    net = copy.deepcopy(module).cpu()
    train_mode(net, point, method)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    y = torch.arange(batch) % classes
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> float:
        t0 = time.perf_counter()
        loss_fn(net(x), y).backward()
        net.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times: dict[int, list[float]] = {n: [] for n in candidates}
    for n in candidates:
        with torch_threads(n):
            step()  # warm-up: first-call allocations and kernel choices
    for _ in range(REPEATS):
        for n in candidates:
            with torch_threads(n):
                times[n].append(step())
    rate = {n: batch / sorted(t)[len(t) // 2] for n, t in times.items()}
    best = max(candidates, key=lambda n: (rate[n], -n))
    log.info("fine-tuning threads: %s -> %d", ", ".join(f"{n}: {r:.1f} img/s" for n, r in rate.items()), best)
    _MEASURED[key] = (best, rate)
    return best, rate
