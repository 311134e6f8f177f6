"""`extract`: images -> CNN codes of one or many layers -> one HDF5 cache entry.

The flow: list the data (cheap) -> try the request memo (a repeat command returns here, without
importing torch) -> plan (model skeleton on the meta device, layers, preprocessing, cache key) ->
lock the entry -> load weights -> the batched loop (decode and resize in data-loader workers,
normalize on the device, one forward pass for all taps, a background thread appending to the
journal) -> finalize the HDF5 file atomically.

Interrupted runs resume from the last committed batch with the batch size they started with, so
a resumed file holds exactly the codes an uninterrupted run gives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from featx import __version__
from featx.cache import CacheEntry, default_cache_dir, digest, ensure_writable, tidy_complete
from featx.data import DataOptions, Dataset, ImageError, open_source
from featx.errors import FeatxError, Interrupted, UsageError
from featx.store import Journal, finalize, journal_path, read_progress

log = logging.getLogger("featx")

DTYPES = ("float32", "float16")
DECODERS = ("auto", "pil", "torchvision")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RELU_MODES = ("auto", "on", "off")
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

    @property
    def images_per_second(self) -> float:
        done = self.samples - self.resumed_from
        return done / self.seconds if self.seconds > 0 and not self.hit else 0.0


def _lib_versions() -> dict[str, str]:
    out = {}
    for lib in ("torch", "torchvision", "timm", "h5py", "numpy", "pillow", "scikit-learn"):
        with contextlib.suppress(PackageNotFoundError):
            out[lib] = version(lib)
    out["featx"] = __version__
    out["python"] = sys.version.split()[0]
    return out


def _weights_request(weights: str) -> str:
    """The weights as typed, with a local file replaced by its content hash."""
    from featx.models import _looks_like_path, file_sha256

    if weights and (_looks_like_path(weights) or os.path.exists(weights)):
        return f"sha256:{file_sha256(weights)}" if os.path.isfile(weights) else f"missing:{weights}"
    return weights


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _check_options(dtype: str, precision: str, relu: str, pool: str, device: str = "auto") -> None:
    from featx.taps import parse_pool

    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise UsageError(f"--device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if relu not in RELU_MODES:
        raise UsageError(f"relu={relu!r}: use one of {', '.join(RELU_MODES)}")
    parse_pool(pool)


def extract(
    model: str,
    data: str | Dataset,
    layers: str | Sequence[str],
    *,
    weights: str = "DEFAULT",
    pool: str = "avg",
    relu: str = "auto",
    image_size: int | None = None,
    crop_pct: float | None = None,
    dtype: str = "float32",
    precision: str = "auto",
    data_options: DataOptions | None = None,
    cache_dir: str | None = None,
    device: str = "auto",
    batch_size: int | str = "auto",
    workers: int | str = "auto",
    channels_last: str = "auto",
    decoder: str = "auto",
    compile: bool = False,
    strict: bool = False,
    wait: bool = True,
    progress: bool = False,
) -> ExtractResult:
    """Extract codes of `layers` of `model` for every image of `data` into the cache; return the file.

    `layers`: module names and/or `depth:` fractions ("layer2,layer4" or "depth:0.25,0.5,1.0").
    `relu`: 'auto' (the network's own ReLU where it has one at the tap), 'on', 'off'.
    `precision`: 'auto' (fp32 or bf16, whichever `featx.autotune` measures faster here), 'fp32',
    'bf16', 'fp16' (autocast). `decoder`: 'pil' (workers decode and resize with PIL),
    'torchvision' (batched JPEG decoding and resizing on the device), 'auto' (torchvision on CUDA).
    `compile`: torch.compile the forward. A repeated call returns the cached file (`hit=True`) at once.
    """
    from featx.autotune import forced_precision

    t0 = time.perf_counter()
    _check_options(dtype, precision, relu, pool, device)
    if decoder not in DECODERS:
        raise UsageError(f"--decoder {decoder!r}: use one of {', '.join(DECODERS)}")
    opts = data_options or DataOptions()
    ds = data if isinstance(data, Dataset) else open_source(data, opts)
    for note in ds.notes:
        log.warning(note)
    cache_dir = ensure_writable(cache_dir or default_cache_dir())
    layer_text = layers if isinstance(layers, str) else ",".join(layers)
    if precision == "auto":
        precision = forced_precision() or "auto"  # a forced decision is a different request
    request = digest({
        "featx": __version__, "model": model, "weights": _weights_request(weights), "layers": layer_text,
        "pool": pool, "relu": relu, "image_size": image_size, "crop_pct": crop_pct, "dtype": dtype,
        "precision": precision, "decoder": decoder, "data": ds.fingerprint, "libs": _lib_versions(),
    })  # fmt: skip
    entry = CacheEntry(cache_dir, request)
    if entry.remembered():
        return _hit_result(entry.path, t0)

    plan = _plan(
        model, weights, layer_text, pool, relu, image_size, crop_pct, dtype, precision, device, decoder, ds
    )
    if entry.find(ds.name, str(plan.model), plan.key):
        return _hit_result(entry.path, t0)
    with entry.locked(wait=wait):
        if entry.ready():  # another process finished it while we waited (a damaged file is set aside)
            return _hit_result(entry.path, t0)
        result = _run(
            plan, ds, opts, entry.path, batch_size, workers, channels_last, compile, strict, progress, t0
        )
    entry.remember()
    return result


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


# -- planning ------------------------------------------------------------------------------------


@dataclass
class _Plan:
    model: object  # ModelName
    weights: object  # WeightsRef
    preprocess: object  # Preprocess
    layers: list[str]
    resolved: dict[str, str]
    activations: dict[str, str]
    pool: object  # Pool
    dtype: str
    precision: str
    device: object  # torch.device
    key: str
    relu_mode: str
    decoder: str  # 'pil' | 'torchvision'
    taps: list  # TapInfo of every module, from the probe of the architecture


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


def _plan(
    model, weights, layer_text, pool, relu, image_size, crop_pct, dtype, precision, device, decoder, ds
) -> _Plan:
    from featx.autotune import choose_precision
    from featx.models import build_module, parse_model_name, resolve_weights, weights_preprocess
    from featx.taps import activation_for, list_taps, parse_pool, resolve_layers

    mname = parse_model_name(model)
    ref = resolve_weights(mname, weights)
    skeleton = build_module(mname, device="meta")
    pre = weights_preprocess(mname, ref, skeleton).with_overrides(image_size, crop_pct)
    taps = list_taps(skeleton, pre.crop_size, device="meta")
    names, resolved = resolve_layers(taps, layer_text, str(mname))
    by_name = {t.name: t for t in taps}
    pool_ = parse_pool(pool)
    for n in names:
        pool_.check(by_name[n])
    acts = {n: activation_for(by_name[n], relu) for n in names}
    dev = resolve_device(device)
    prec = precision if precision != "auto" else choose_precision(mname, dev, pre.crop_size)
    dec = decoder if decoder != "auto" else ("torchvision" if dev.type == "cuda" else "pil")
    row_bytes = sum(by_name[n].code_dim(pool_) for n in names) * np.dtype(dtype).itemsize
    if row_bytes > _HUGE_ROW_BYTES:
        log.warning(
            "codes take %.1f MiB per image (%.1f GiB for %d images) with --pool %s; consider --pool avg or avg2x2",
            row_bytes / 2**20, row_bytes * len(ds) / 2**30, len(ds), pool,
        )  # fmt: skip
    fields = {
        "format": 1, "model": str(mname), "weights": ref.ident, "layers": names, "activations": acts,
        "pool": str(pool_), "preprocess": pre.to_dict(), "dtype": dtype, "precision": prec,
        "dataset": ds.fingerprint,
    }  # fmt: skip
    if dec != "pil":  # its resize differs slightly from PIL's: other pixels, another entry
        fields["decoder"] = dec
    return _Plan(
        mname, ref, pre, names, resolved, acts, pool_, dtype, prec, dev, digest(fields), relu, dec, taps
    )


# -- the loop ------------------------------------------------------------------------------------


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


def _collate(items):
    import torch

    ok = [(i, t) for i, t, _ in items if t is not None]
    bad = [(i, err) for i, t, err in items if t is None]
    images = torch.stack([t for _, t in ok]) if ok else None
    return np.array([i for i, _ in ok], dtype=np.int64), images, bad, items[-1][0] + 1


class _Writer:
    """A background thread appending finished batches to the journal, so disk I/O and fsync
    overlap the next forward pass. The queue is short: memory stays bounded."""

    def __init__(self, journal: Journal, depth: int = 4):
        import queue

        self.journal = journal
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
                    self.journal.append(codes, index, samples_done, skipped)
                except BaseException as e:  # re-raised in the main thread
                    self.error = e

    def put(self, codes, index, samples_done, skipped) -> None:
        self._raise()
        self.q.put((codes, index, samples_done, skipped))

    def close(self) -> None:
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


def _auto_workers() -> int:
    """One decoding process per core but one (the forward uses every core), 1 to 8. Measured on
    2 CPU cores (benchmarks/extract_speed.py): 0, 1 and 2 workers are within 5% in fp32; in bf16,
    where the forward is ~3x faster and decoding matters, 1 worker is fastest."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class CodeComputer:
    """A model on its device with hooks on the chosen taps: uint8 image batches in, codes out.

    Shared by `extract`, `featx predict` and `CNNCodes`, so every path computes codes the same
    way: normalize on the device, channels-last and autocast as asked, one forward for all taps.
    """

    def __init__(self, module, taps, activations: dict, pool, preprocess, device, precision: str = "fp32",
                 channels_last: bool = True, compile: bool = False):  # fmt: skip
        import torch

        from featx.taps import Tapper

        self.device = device
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
        with torch.inference_mode():
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


def make_loader(dataset, batch_size: int, workers: int, pin_memory: bool, collate=None):
    """Batches of a sample sequence, decoded and resized by `workers` processes (0: in this one)
    while the forward runs."""
    import torch

    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate or _collate,
        pin_memory=pin_memory, prefetch_factor=4 if workers else None,
    )  # fmt: skip


def _run(plan: _Plan, ds: Dataset, opts: DataOptions, path: str, batch_size, workers, channels_last, compile: bool,
         strict: bool, progress: bool, t0: float) -> ExtractResult:  # fmt: skip
    from featx.models import load_model
    from featx.taps import list_taps

    backbone = load_model(str(plan.model), weights_ref=plan.weights)
    pre = plan.preprocess
    taps = {t.name: t for t in plan.taps}
    if plan.weights.source == "file":  # a checkpoint may have rebuilt the classifier: probe what was loaded
        taps = {t.name: t for t in list_taps(backbone.module, pre.crop_size, device="cpu")}
    chosen = [taps[n] for n in plan.layers]
    dev = plan.device
    use_cl = channels_last in ("on", "auto")
    computer = CodeComputer(
        backbone.module, chosen, plan.activations, plan.pool, pre, dev, plan.precision, use_cl, compile
    )
    try:
        return _loop(plan, ds, opts, path, backbone, computer, chosen, batch_size, workers, use_cl, compile, strict,
                     progress, t0)  # fmt: skip
    finally:
        computer.close()


def _loop(plan, ds, opts, path, backbone, computer, chosen, batch_size, workers, use_cl, compile, strict, progress,
          t0) -> ExtractResult:  # fmt: skip
    from featx.autotune import choose_batch_size

    pre, dev = plan.preprocess, plan.device
    prior = read_progress(path)
    if prior is not None and prior["meta"].get("key") == plan.key:
        bs = int(prior["meta"]["batch_size"])  # resumed rows must come from identical batches
        if batch_size not in ("auto", bs):
            log.warning("resuming with batch size %d of the interrupted run (not %s), so codes match an uninterrupted run",
                        bs, batch_size)  # fmt: skip
    else:
        bs = (
            choose_batch_size(computer, pre, dev, str(plan.model))
            if batch_size == "auto"
            else int(batch_size)
        )
    meta = {
        "key": plan.key, "layers": [[t.name, d] for t, d in zip(chosen, computer.dims)], "dtype": plan.dtype,
        "samples": len(ds), "batch_size": bs, "featx": __version__,
    }  # fmt: skip
    try:
        journal = Journal.open(journal_path(path), meta)
    except OSError as e:
        raise FeatxError(f"cannot write {journal_path(path)} ({e.strerror or e}); free space or fix permissions "
                         f"and rerun") from None  # fmt: skip
    start = journal.samples_done
    if journal.resumed:
        log.info("resuming %s at image %d of %d", os.path.basename(path), start, len(ds))

    n_workers = _auto_workers() if workers == "auto" else int(workers)
    if plan.decoder == "torchvision":
        from featx.decode import RawImages, collate_raw, decode_batch

        dataset, collate = RawImages(ds.loader, len(ds), pre, start), collate_raw
    else:
        dataset, collate = ImageSequence(ds.load, len(ds), pre, start), _collate
    loader = make_loader(dataset, bs, n_workers, pin_memory=dev.type == "cuda", collate=collate)
    out_dtype = np.float16 if plan.dtype == "float16" else np.float32
    bar = _progress_bar(progress, len(ds), start, os.path.basename(path))
    writer = _Writer(journal)
    t_loop = time.perf_counter()
    try:
        for index, images, bad, samples_done in loader:
            if plan.decoder == "torchvision":
                images, kept, failed = decode_batch(images, pre, dev)
                bad = bad + [(int(index[k]), reason) for k, reason in failed]
                index = index[kept]
            if bad and strict:
                i, reason = min(bad)
                raise FeatxError(f"{ds.ids[i]}: {reason} (--strict stops at the first undecodable image)")
            codes = [c.astype(out_dtype, copy=False) for c in computer(images)]
            writer.put(codes, index, samples_done, sorted(bad))
            bar.update(samples_done - bar.n)
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
    finally:
        bar.close()
    writer.close()
    loop_seconds = time.perf_counter() - t_loop
    if journal.rows_done == 0:
        first = journal.skipped[0] if journal.skipped else None
        detail = f" (first: {ds.ids[first[0]]}: {first[1]})" if first else ""
        journal.close()
        raise FeatxError(f"none of the {len(ds)} images could be decoded{detail}")

    finalize(
        path, journal, classes=ds.classes, labels=ds.labels, splits=ds.splits, ids=ds.ids,
        layer_attrs=_layer_attrs(chosen, plan),
        attrs=_file_attrs(plan, backbone, ds, opts, bs, n_workers, use_cl, compile),
    )  # fmt: skip
    skipped = [(ds.ids[i], r) for i, r in journal.skipped]
    for ident, reason in skipped:
        log.warning("skipped %s: %s", ident, reason)
    seconds = time.perf_counter() - t0
    log.info("wrote %s: %d rows x %d layers in %.1fs (%.1f images/s)", path, journal.rows_done, len(chosen),
             seconds, (len(ds) - start) / max(loop_seconds, 1e-9))  # fmt: skip
    return ExtractResult(
        path, False, journal.rows_done, len(ds), list(plan.layers), skipped, plan.resolved, seconds, start
    )


def _progress_bar(enabled: bool, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc=desc[:40], file=sys.stderr, disable=not enabled,
                mininterval=0.5 if sys.stderr.isatty() else 10.0, dynamic_ncols=True)  # fmt: skip


def _layer_attrs(chosen, plan: _Plan) -> dict[str, dict]:
    out = {}
    for t in chosen:
        act = plan.activations[t.name]
        out[t.name] = {
            "pre_pool_shape": np.array(t.shape, dtype=np.int64), "pool": str(plan.pool),
            "relu": act != "none" or t.post_act in ("relu", "relu6"), "activation": act,
            "post_act": t.post_act or "none", "next_act": t.next_act or "none", "code_dim": t.code_dim(plan.pool),
            "stride": t.stride or 0, "depth": t.depth, "kind": t.kind,
        }  # fmt: skip
    return out


def _file_attrs(plan: _Plan, backbone, ds: Dataset, opts: DataOptions, bs: int, workers: int, channels_last: bool,
                compile: bool) -> dict:  # fmt: skip
    import json

    return {
        "featx_version": __version__, "format_version": 1, "cache_key": plan.key, "model": str(plan.model),
        "weights": plan.weights.spec, "weights_source": plan.weights.source, "weights_ident": plan.weights.ident,
        "weights_sha256": backbone.weights.sha256 or "", "preprocessing": json.dumps(plan.preprocess.to_dict()),
        "preprocessing_text": str(plan.preprocess), "image_size": plan.preprocess.crop_size,
        "dataset": ds.spec, "dataset_name": ds.name, "dataset_fingerprint": ds.fingerprint,
        "split_source": ds.split_source, "data_options": json.dumps(opts.to_dict()), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "library_versions": json.dumps(_lib_versions()), "layers": np.array(plan.layers, dtype=object),
        "layer_resolution": json.dumps(plan.resolved), "pool": str(plan.pool), "relu": plan.relu_mode,
        "dtype": plan.dtype, "precision": plan.precision, "device": str(plan.device), "batch_size": bs,
        "workers": workers, "channels_last": channels_last, "compile": compile, "decoder": plan.decoder, "samples": len(ds),
        "config": json.dumps({"layers": plan.layers, "activations": plan.activations, "pool": str(plan.pool)}),
    }  # fmt: skip
