"""The HDF5 file of one cache entry: its schema, how it is written safely, and how it is read.

Writing goes through a journal so that no interruption (Ctrl-C, kill -9, power loss, a full disk)
can leave a file that looks complete but is not, and so that a rerun resumes at the last
committed row:

- while extracting, rows go to `ENTRY.h5.partial/`: one raw append-only file per layer plus the
  sample index of each row. After each batch the data files are fsync'ed, then `progress.json`
  (rows and samples done, images skipped, the CRC32 of each file's committed bytes, a checksum of
  the record) is replaced atomically. On resume every field and the committed bytes are checked,
  and every file is cut back to the committed row count, so a torn write is simply overwritten; a
  journal that fails a check is set aside as `ENTRY.h5.partial.corrupt` and restarted.
- when every sample is done, the HDF5 file is built next to the entry as `ENTRY.h5.tmp-PID`,
  fsync'ed and renamed into place (an atomic step), then the journal is removed.

So `ENTRY.h5` either does not exist or is complete, and `featx_state == "complete"` is written
last, inside the file, as a second check. Layout (readable with plain h5py, no featx needed):

    /codes/<layer>   float32|float16 [N, D], chunked, gzip + shuffle; attrs pre_pool_shape, pool,
                     relu (bool), activation, post_act, code_dim, stride, depth, kind
    /labels          int64 [N]          /classes  str [C]
    /split           str [N] (train/val/test)        /paths  str [N] (ids relative to the data)
    /skipped/paths, /skipped/reasons   str [K]: images that could not be decoded
    root attrs       featx_version, featx_state, cache_key, model, weights, weights_sha256,
                     preprocessing (JSON), preprocessing_text, dataset, dataset_fingerprint,
                     created, library_versions (JSON), config (JSON), rows, samples, layers

String datasets read as bytes in h5py 3: use `f["split"].asstr()[:]`. JSON attributes are parsed
with `json.loads` only; nothing read from a file is ever evaluated. The attributes are typed by
`FileMeta` and `LayerMeta` (written by extraction, read through `CodesFile.meta` / `layer_meta`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from featx.errors import first_line
from featx.files import fsync_dir, read_json, write_json_atomic

log = logging.getLogger("featx")


BLOCK_BYTES = 64 << 20  # journal -> HDF5 copy block


@dataclass(frozen=True)
class LayerSpec:
    """A layer's place in the file: its name and code width."""

    name: str
    dim: int


class JournalDamaged(Exception):
    """A journal whose files fail their checks (internal: the journal is set aside and restarted)."""


JOURNAL_FORMAT = 2  # 2: progress records carry CRC32s of the committed bytes and a checksum of themselves


_DTYPES = ("float32", "float16")


class Journal:
    """Append-only partial entry. `meta` must hold 'key', 'layers' [[name, dim]...], 'dtype',
    'samples' (total) and 'batch_size'.

    Every commit records, in `progress.json`, the CRC32 of each data file's committed bytes, a
    checksum of `meta.json` and one of the record itself. On resume every field is validated and the committed bytes are
    checked against their CRC32s (a garbled index or code, a torn or hand-edited record). A journal
    of another configuration is discarded; one that fails a check is set aside as
    `ENTRY.h5.partial.corrupt` (one warning) and restarted, so it can never produce a wrong row.
    """

    def __init__(self, path: str, meta: dict):
        self.path = path
        self.meta = meta
        self.layers = [LayerSpec(n, int(d)) for n, d in meta["layers"]]
        self.itemsize = np.dtype(meta["dtype"]).itemsize
        self.samples_done = 0
        self.rows_done = 0
        self.skipped: list[list] = []  # [sample index, reason]
        self.resumed = False
        self._files: list = []
        self._crc = [0] * (len(self.layers) + 1)  # CRC32 of each data file's committed bytes

    # files: rows.<j>.bin per layer, index.bin (int64 sample index per row)
    def _data_paths(self) -> list[str]:
        return _data_paths(self.path, len(self.layers))

    def _row_bytes(self) -> list[int]:
        return [spec.dim * self.itemsize for spec in self.layers] + [8]

    def _disk_meta(self) -> dict:
        return {**self.meta, "journal": JOURNAL_FORMAT}

    @classmethod
    def open(cls, path: str, meta: dict) -> Journal:
        """Resume the journal at `path` if it matches `meta` and passes its checks, else start it
        afresh (setting a damaged one aside with a warning)."""
        j = cls(path, meta)
        try:
            fresh = j._try_resume()
        except JournalDamaged as e:
            aside = set_aside(path)
            log.warning(
                "journal %s is damaged (%s); set it aside as %s and starting this entry over", path, e, aside
            )
            fresh = True
        if fresh:
            if os.path.exists(path):
                shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)
            write_json_atomic(os.path.join(path, "meta.json"), j._disk_meta())
            j._commit_progress()
            fsync_dir(os.path.dirname(path))
        # unbuffered: a failed write (a full disk) must not leave bytes behind to flush at close
        j._files = [open(p, "r+b" if os.path.exists(p) else "w+b", buffering=0) for p in j._data_paths()]
        for f, rb in zip(j._files, j._row_bytes()):
            f.truncate(j.rows_done * rb)
            f.seek(j.rows_done * rb)
        return j

    def _try_resume(self) -> bool:
        """False when resumed; True when there is nothing to resume (no journal, an empty one, one
        of another configuration). Raises JournalDamaged for a journal that fails a check."""
        if not os.path.isdir(self.path) or not os.listdir(self.path):
            return True  # none, or killed right after creating its folder
        meta = _load_meta(self.path)
        if meta != self._disk_meta():
            return True  # another configuration or featx release: discarded, not damaged
        prog = _load_progress(self.path, meta)
        rows, samples = prog["rows_done"], prog["samples_done"]
        crc = [_crc_prefix(p, rows * rb) for p, rb in zip(self._data_paths(), self._row_bytes())]
        if crc != prog["crc32"]:
            bad = [os.path.basename(p) for p, a, b in zip(self._data_paths(), crc, prog["crc32"]) if a != b]
            raise JournalDamaged(f"{', '.join(bad)} do not match the checksum of the committed rows")
        with open(self._data_paths()[-1], "rb") as f:
            index = np.frombuffer(f.read(rows * 8), dtype=np.int64)
        if len(index) and (index[0] < 0 or index[-1] >= samples or np.any(np.diff(index) <= 0)):
            raise JournalDamaged("index.bin holds sample indices out of order or range")
        skipped = np.array([i for i, _ in prog["skipped"]], dtype=np.int64)
        if len(index) and len(skipped) and np.isin(skipped, index).any():
            raise JournalDamaged("an image is both a row and skipped")
        self.rows_done, self.samples_done, self._crc = rows, samples, crc
        self.skipped = [list(s) for s in prog["skipped"]]
        self.resumed = samples > 0
        return False

    def _commit_progress(self) -> None:
        record = {
            "rows_done": self.rows_done,
            "samples_done": self.samples_done,
            "skipped": self.skipped,
            "crc32": list(self._crc),
            "meta": _record_sum(self._disk_meta()),
            "updated": time.time(),
        }
        write_json_atomic(
            os.path.join(self.path, "progress.json"), {**record, "checksum": _record_sum(record)}
        )

    def append(
        self, codes: Sequence[np.ndarray], sample_index: np.ndarray, samples_done: int, skipped: Sequence
    ) -> None:
        """Write one batch (codes in layer order) and commit it. Durable once this returns."""
        n = len(sample_index)
        for spec, c in zip(self.layers, codes):
            if c.shape != (n, spec.dim):
                raise ValueError(f"layer {spec.name}: got codes {c.shape}, expected ({n}, {spec.dim})")
        dtype = np.dtype(self.meta["dtype"])
        crc = list(self._crc)
        for k, (f, c) in enumerate(zip(self._files, [*codes, sample_index])):
            data = np.ascontiguousarray(c, dtype=dtype if c is not sample_index else np.int64).tobytes()
            _write_all(f, data)
            crc[k] = zlib.crc32(data, crc[k])
        for f in self._files:
            os.fsync(f.fileno())
        self.rows_done += n
        self.samples_done = samples_done
        self.skipped.extend([int(i), str(r)] for i, r in skipped)
        self._crc = crc
        self._commit_progress()

    def close(self) -> None:
        for f in self._files:
            with contextlib.suppress(
                OSError
            ):  # unbuffered: nothing is lost; progress.json decides what counts
                f.close()
        self._files = []

    def read_layer(self, j: int, start: int, stop: int) -> np.ndarray:
        spec = self.layers[j]
        with open(self._data_paths()[j], "rb") as f:
            f.seek(start * spec.dim * self.itemsize)
            buf = f.read((stop - start) * spec.dim * self.itemsize)
        return np.frombuffer(buf, dtype=self.meta["dtype"]).reshape(stop - start, spec.dim)

    def read_index(self) -> np.ndarray:
        with open(self._data_paths()[-1], "rb") as f:
            return np.frombuffer(f.read(self.rows_done * 8), dtype=np.int64)


def _write_all(f, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = f.write(view)
        if not n:
            raise OSError(28, "No space left on device")
        view = view[n:]


def journal_path(entry: str) -> str:
    return entry + ".partial"


def _data_paths(path: str, n_layers: int) -> list[str]:
    return [os.path.join(path, f"rows.{j}.bin") for j in range(n_layers)] + [os.path.join(path, "index.bin")]


def _record_sum(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _crc_prefix(path: str, nbytes: int) -> int:
    crc, left = 0, nbytes
    with open(path, "rb") as f:
        while left:
            block = f.read(min(left, BLOCK_BYTES))
            if not block:
                raise JournalDamaged(f"{os.path.basename(path)} is shorter than its progress record")
            crc, left = zlib.crc32(block, crc), left - len(block)
    return crc


def is_count(v, low: int = 0, high: float = float("inf")) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _load_meta(path: str) -> dict:
    """A journal's meta.json, validated field by field; raises JournalDamaged."""
    try:
        meta = read_json(os.path.join(path, "meta.json"))
    except (OSError, ValueError, RecursionError) as e:
        raise JournalDamaged(f"meta.json is unreadable ({first_line(e, 160)})") from None
    ok = (
        isinstance(meta, dict)
        and isinstance(meta.get("key"), str)
        and isinstance(meta.get("layers"), list)
        and len(meta["layers"]) > 0
        and all(
            isinstance(ly, list) and len(ly) == 2 and isinstance(ly[0], str) and is_count(ly[1], 1)
            for ly in meta["layers"]
        )
        and meta.get("dtype") in _DTYPES
        and is_count(meta.get("samples"))
        and is_count(meta.get("batch_size"), 1)
    )
    if not ok:
        raise JournalDamaged("meta.json does not describe a featx journal")
    return meta


def _load_progress(path: str, meta: dict) -> dict:
    """A journal's progress.json, every field validated against `meta` and its own checksum, and
    the data files long enough for it; raises JournalDamaged. (Their content is checked on resume.)"""
    if meta.get("journal") != JOURNAL_FORMAT:
        raise JournalDamaged("it was written by another featx version")
    try:
        prog = read_json(os.path.join(path, "progress.json"))
    except (OSError, ValueError, RecursionError) as e:
        raise JournalDamaged(f"progress.json is unreadable ({first_line(e, 160)})") from None
    if not isinstance(prog, dict) or not isinstance(prog.get("checksum"), str):
        raise JournalDamaged("progress.json is not a featx progress record")
    record = {k: v for k, v in prog.items() if k != "checksum"}
    if _record_sum(record) != prog["checksum"]:
        raise JournalDamaged("progress.json does not match its checksum")
    if record.get("meta") != _record_sum(meta):
        raise JournalDamaged("meta.json does not match the checksum in progress.json")
    n_files = len(meta["layers"]) + 1
    rows, samples, skipped, crc = (prog.get(k) for k in ("rows_done", "samples_done", "skipped", "crc32"))
    ok = (
        is_count(samples, 0, meta["samples"])
        and is_count(rows, 0, samples)
        and isinstance(skipped, list)
        and all(
            isinstance(s, list) and len(s) == 2 and is_count(s[0], 0, samples - 1) and isinstance(s[1], str)
            for s in skipped
        )
        and rows + len(skipped) <= samples
        and isinstance(crc, list)
        and len(crc) == n_files
        and all(is_count(c, 0, 0xFFFFFFFF) for c in crc)
    )
    if not ok:
        raise JournalDamaged("progress.json holds values out of range")
    itemsize = np.dtype(meta["dtype"]).itemsize
    sizes = [d * itemsize for _, d in meta["layers"]] + [8]
    for p, rb in zip(_data_paths(path, len(meta["layers"])), sizes):
        if not os.path.isfile(p) or os.path.getsize(p) < rows * rb:
            raise JournalDamaged(f"{os.path.basename(p)} is shorter than its progress record")
    return prog


def read_progress(entry: str) -> dict | None:
    """A partial entry's progress record (validated), or None; `journal_problem` says why not."""
    return journal_progress(journal_path(entry))


def journal_progress(path: str) -> dict | None:
    """The progress record of the journal folder `path` (an entry's `.partial`, or one distributed
    shard), validated, or None when it is damaged or absent."""
    try:
        meta = _load_meta(path)
        prog = _load_progress(path, meta)
    except JournalDamaged:
        return None
    return {**prog, "samples": meta["samples"], "layers": [n for n, _ in meta["layers"]], "meta": meta}


def journal_problem(entry: str) -> str | None:
    """Why the partial entry of `entry` cannot be resumed as it is (None: it can, or there is none)."""
    if not os.path.isdir(journal_path(entry)):
        return None
    try:
        _load_progress(journal_path(entry), _load_meta(journal_path(entry)))
    except JournalDamaged as e:
        return str(e)
    return None


def set_aside(path: str) -> str:
    """Rename a damaged file or folder to `PATH.corrupt` (replacing an older one), out of the way but
    kept for inspection; return the new name."""
    target = path + ".corrupt"
    if os.path.isdir(target) and not os.path.islink(target):
        shutil.rmtree(target, ignore_errors=True)
    elif os.path.lexists(target):
        os.remove(target)
    os.rename(path, target)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return target
