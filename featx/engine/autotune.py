"""Measured choices for the forward pass: precision and batch size, per device and model.

`--precision auto` times the model's forward in fp32 and in bf16 autocast (channels-last, random
inputs at the extraction's input size) and keeps bf16 only when it is at least `MARGIN` times
faster: bf16 is several times faster on CPUs with AMX/AVX512-BF16 and on tensor-core GPUs, and
several times slower on CPUs without bf16 units, so habit cannot decide. On CUDA,
`--batch-size auto` doubles the batch while throughput still grows by 10% and memory lasts.

Decisions are remembered in `$XDG_CACHE_HOME/featx/autotune.json` (else `~/.cache/featx/`),
keyed by the processor or GPU name, torch version, model and input size, so the measurement runs
once per machine and model, and an `auto` request resolves the same way every time.

`FEATX_AUTOTUNE=fp32|bf16` forces the precision decision without measuring (nothing is
remembered): the outcome then no longer depends on the machine, which is how the test suite runs
the cache, store and reliability paths under both decisions on any CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time

from featx.errors import first_line

log = logging.getLogger("featx")

MARGIN = 1.2
FORCE_ENV = "FEATX_AUTOTUNE"
_PROBE_BATCH = 8


def _store_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "featx", "autotune.json")


def device_name(device) -> str:
    """The device measurements belong to: a GPU by its name, a CPU by its model and torch's threads."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} x{torch.get_num_threads()}"


def _key(kind: str, device, model: str, size: int) -> str:
    import torch

    return f"{kind}|{device_name(device)}|torch-{torch.__version__}|{model}|{size}"


def _load() -> dict:
    try:
        with open(_store_path(), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save(key: str, value) -> None:
    from featx.files import write_json_atomic

    data = _load()
    data[key] = value
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(_store_path()), exist_ok=True)
        write_json_atomic(_store_path(), data)


def _time_forward(module, x, dtype, repeats: int = 3) -> float:
    """The fastest of `repeats` timed forwards (the minimum is what the device can do; other
    processes only ever add time)."""
    import torch

    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    best = float("inf")
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        module(x)  # warm-up: kernel selection, allocator
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            module(x)
            sync()
            best = min(best, time.perf_counter() - t0)
    return best


class _Lock:
    """Serializes measurements between processes, so two runs started together agree."""

    def __enter__(self):
        import fcntl

        self.fd = None
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(_store_path()), exist_ok=True)
            self.fd = os.open(_store_path() + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)


def _bf16_ok(device) -> bool:
    import torch

    return torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu"


def forced_precision() -> str | None:
    """The decision `FEATX_AUTOTUNE` forces ('fp32' or 'bf16'), None when unset or empty."""
    value = os.environ.get(FORCE_ENV, "").strip().lower()
    if not value:
        return None
    if value not in ("fp32", "bf16"):
        from featx.errors import UsageError

        raise UsageError(f"{FORCE_ENV}={value!r} is not a precision: set it to fp32 or bf16, or unset it")
    return value


def choose_precision(model, device, size: int) -> str:
    """'bf16' when bf16 autocast beats fp32 by MARGIN on this device for this model, else 'fp32'
    (or what `FEATX_AUTOTUNE` forces)."""
    forced = forced_precision()
    if forced is not None:
        return forced
    key = _key("precision", device, str(model), size)
    known = _load().get(key)
    if known in ("fp32", "bf16"):
        return known
    with _Lock():
        known = _load().get(key)  # another process may have measured while this one waited
        if known in ("fp32", "bf16"):
            return known
        return _measure_precision(model, device, size, key)


def _measure_precision(model, device, size: int, key: str) -> str:
    import torch

    from featx.models.build import build_module

    module = build_module(model)
    if not _bf16_ok(device) or not any(True for _ in module.parameters()):
        return "fp32"  # nothing that bf16 could speed up
    module = module.to(device).to(memory_format=torch.channels_last)
    x = torch.randn(_PROBE_BATCH, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    try:
        fp32 = _time_forward(module, x, None)
        bf16 = _time_forward(module, x, torch.bfloat16)
    except RuntimeError as e:  # an op without a bf16 kernel on this device
        log.info("bf16 autocast failed for %s on %s (%s); using fp32", model, device, first_line(e, 100))
        fp32, bf16 = 1.0, float("inf")
    choice = "bf16" if fp32 / bf16 >= MARGIN else "fp32"
    log.info(
        "precision auto: %s forward %.1f ms fp32 vs %.1f ms bf16 per %d images on %s -> %s",
        model,
        fp32 * 1e3,
        bf16 * 1e3,
        _PROBE_BATCH,
        device,
        choice,
    )
    _save(key, choice)
    return choice


def choose_batch_size(computer, preprocess, device, model: str, start: int = 64, cap: int = 1024) -> int:
    """On CUDA: the batch size after which doubling no longer adds 10% throughput (or memory runs
    out). Elsewhere: 32, where CPU throughput has flattened."""
    if device.type != "cuda":
        return 32
    key = _key("batch", device, f"{model}|{computer.amp}|{','.join(computer.names)}", preprocess.crop_size)
    known = _load().get(key)
    if isinstance(known, int) and known > 0:
        return known
    with _Lock():
        known = _load().get(key)
        if isinstance(known, int) and known > 0:
            return known
        return _measure_batch(computer, preprocess, device, key, start, cap)


def _measure_batch(computer, preprocess, device, key: str, start: int, cap: int) -> int:
    import torch

    best, best_rate, bs = start, 0.0, start
    while bs <= cap:
        images = torch.randint(
            0, 256, (bs, 3, preprocess.crop_size, preprocess.crop_size), dtype=torch.uint8, device=device
        )
        try:
            computer(images)  # warm-up
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(3):
                computer(images)
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        rate = 3 * bs / (time.perf_counter() - t0)
        if rate < best_rate * 1.1:
            break
        best, best_rate, bs = bs, rate, bs * 2
    log.info("batch size auto on %s: %d (%.0f images/s)", device, best, best_rate)
    _save(key, best)
    return best
