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
from dataclasses import dataclass, fields

import numpy as np

from featx.errors import FeatxError, UsageError, first_line

log = logging.getLogger("featx")

FORMAT_VERSION = 1
COMPLETE = "complete"
_BLOCK_BYTES = 64 << 20  # journal -> HDF5 copy block


# -- small file helpers --------------------------------------------------------------------------


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    """Flush a written file's data to disk (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, write) -> None:
    """Write `path` through `write(tmp_path)`, fsync, then rename it over `path`: readers see the
    old file or the whole new one, never a part; the temporary file goes on any failure."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, write)


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj))


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# -- the journal ---------------------------------------------------------------------------------


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
            log.warning("journal %s is damaged (%s); set it aside as %s and starting this entry over",
                        path, e, aside)  # fmt: skip
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
        record = {"rows_done": self.rows_done, "samples_done": self.samples_done, "skipped": self.skipped,
                  "crc32": list(self._crc), "meta": _record_sum(self._disk_meta()), "updated": time.time()}  # fmt: skip
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
            block = f.read(min(left, _BLOCK_BYTES))
            if not block:
                raise JournalDamaged(f"{os.path.basename(path)} is shorter than its progress record")
            crc, left = zlib.crc32(block, crc), left - len(block)
    return crc


def _count(v, low: int = 0, high: float = float("inf")) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _load_meta(path: str) -> dict:
    """A journal's meta.json, validated field by field; raises JournalDamaged."""
    try:
        meta = _read_json(os.path.join(path, "meta.json"))
    except (OSError, ValueError, RecursionError) as e:
        raise JournalDamaged(f"meta.json is unreadable ({first_line(e, 160)})") from None
    ok = (
        isinstance(meta, dict)
        and isinstance(meta.get("key"), str)
        and isinstance(meta.get("layers"), list)
        and len(meta["layers"]) > 0
        and all(
            isinstance(ly, list) and len(ly) == 2 and isinstance(ly[0], str) and _count(ly[1], 1)
            for ly in meta["layers"]
        )  # fmt: skip
        and meta.get("dtype") in _DTYPES
        and _count(meta.get("samples"))
        and _count(meta.get("batch_size"), 1)
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
        prog = _read_json(os.path.join(path, "progress.json"))
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
        _count(samples, 0, meta["samples"])
        and _count(rows, 0, samples)
        and isinstance(skipped, list)
        and all(
            isinstance(s, list) and len(s) == 2 and _count(s[0], 0, samples - 1) and isinstance(s[1], str)
            for s in skipped
        )  # fmt: skip
        and rows + len(skipped) <= samples
        and isinstance(crc, list)
        and len(crc) == n_files
        and all(_count(c, 0, 0xFFFFFFFF) for c in crc)
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


# -- finalizing ----------------------------------------------------------------------------------


def _space_needed(journal: Journal, ids: Sequence[str]) -> int:
    """An upper bound on the finished file's size: raw codes (compression only shrinks them),
    the row metadata, and HDF5's overhead."""
    codes = sum(spec.dim for spec in journal.layers) * journal.itemsize * journal.rows_done
    rows = journal.rows_done * (8 + 16 + 16) + sum(len(i) for i in ids)
    return int(codes * 1.01 + rows * 2 + (4 << 20))


def _check_space(entry: str, need: int) -> None:
    """Fail before writing when the disk or the process's file-size limit cannot take the file:
    HDF5 fails badly when a write fails half-way."""
    import resource

    folder = os.path.dirname(os.path.abspath(entry))
    free = shutil.disk_usage(folder).free
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = min(free, soft if soft != resource.RLIM_INFINITY else free)
    if need > limit:
        what = (
            f"{free / 2**20:.0f} MiB free in {folder}"
            if limit == free
            else f"a file-size limit of {soft / 2**20:.1f} MiB"
        )
        raise FeatxError(
            f"finishing {entry} needs up to {need / 2**20:.0f} MiB, but there is {what}; the codes are kept in "
            f"{journal_path(entry)}: free space and rerun the same command to finish"
        )


def finalize(entry: str, journal: Journal, *, classes: Sequence[str], labels: np.ndarray, splits: np.ndarray,
             ids: Sequence[str], layer_attrs: dict[str, dict], attrs: dict,
             groups: np.ndarray | None = None) -> None:  # fmt: skip
    """Build the HDF5 file from a finished journal, atomically, then remove the journal."""
    import gc
    import hashlib
    import traceback

    import h5py

    index = journal.read_index()
    n = len(index)
    _check_space(entry, _space_needed(journal, ids))
    tmp = f"{entry}.tmp-{os.getpid()}"
    str_dt = h5py.string_dtype()
    row_labels = labels[index].astype(np.int64)
    row_splits = [str(x) for x in splits[index].tolist()]
    row_ids = [ids[i] for i in index]
    failure = None
    f = h5py.File(tmp, "w")
    try:
        grp = f.create_group("codes")
        for j, spec in enumerate(journal.layers):
            rows_per_chunk = max(1, min(n, (1 << 20) // max(1, spec.dim * journal.itemsize)))
            cols_per_chunk = min(spec.dim, max(1, (1 << 20) // journal.itemsize))
            ds = grp.create_dataset(
                spec.name, shape=(n, spec.dim), dtype=journal.meta["dtype"],
                chunks=(rows_per_chunk, cols_per_chunk) if n else None, compression="gzip" if n else None,
                compression_opts=1 if n else None, shuffle=bool(n), fletcher32=bool(n),
            )  # fmt: skip
            h = hashlib.sha256()
            step = max(1, _BLOCK_BYTES // max(1, spec.dim * journal.itemsize))
            for start in range(0, n, step):
                block = journal.read_layer(j, start, min(n, start + step))
                ds[start : start + len(block)] = block
                h.update(block.tobytes())
            for k, v in layer_attrs.get(spec.name, {}).items():
                ds.attrs[k] = v
            ds.attrs["sha256"] = h.hexdigest()
        f.create_dataset(
            "labels", data=row_labels, chunks=(max(1, min(n, 1 << 16)),) if n else None, fletcher32=bool(n)
        )
        f.create_dataset("classes", data=np.array(list(classes), dtype=object), dtype=str_dt)
        f.create_dataset("split", data=np.array(row_splits, dtype=object), dtype=str_dt)
        f.create_dataset("paths", data=np.array(row_ids, dtype=object), dtype=str_dt)
        if groups is not None:  # --group-by / a manifest's group column: keeps subjects on one side
            f.create_dataset(
                "groups", data=np.array([str(groups[i]) for i in index], dtype=object), dtype=str_dt
            )
        sk = f.create_group("skipped")
        sk.create_dataset(
            "paths", data=np.array([ids[i] for i, _ in journal.skipped], dtype=object), dtype=str_dt
        )
        sk.create_dataset(
            "reasons", data=np.array([r for _, r in journal.skipped], dtype=object), dtype=str_dt
        )
        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs["rows"] = n
        f.attrs["rows_sha256"] = rows_sha256(
            row_labels,
            row_splits,
            row_ids,
            list(classes),
            None if groups is None else [str(groups[i]) for i in index],
        )
        f.attrs["featx_state"] = COMPLETE  # last: a file without it is never trusted
    except (OSError, RuntimeError, ValueError) as e:  # h5py reports a failed write as any of these
        failure = f"writing {tmp} failed ({first_line(e, 160)})"
        traceback.clear_frames(e.__traceback__)  # h5py objects in these frames must not outlive the file
    except BaseException:
        _close_quietly(f)
        _remove(tmp)
        raise
    if not _close_quietly(f) and failure is None:
        failure = f"writing {tmp} failed when closing it"
    if failure is not None:
        gc.collect()
        _remove(tmp)
        raise FeatxError(
            f"{failure}; the codes are kept in {journal.path}: free space and rerun the same command to finish"
        )
    try:
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, entry)
        fsync_dir(os.path.dirname(os.path.abspath(entry)))
    except BaseException:
        _remove(tmp)
        raise
    mark_verified(entry)
    journal.close()
    shutil.rmtree(journal.path, ignore_errors=True)


def _close_quietly(f) -> bool:
    try:
        f.close()
        return True
    except Exception:  # h5py raises several types when the last flush fails
        return False


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def rows_sha256(labels: np.ndarray, splits: Sequence[str], ids: Sequence[str], classes: Sequence[str],
                groups: Sequence[str] | None = None) -> str:  # fmt: skip
    """A checksum of the per-row metadata: labels, splits, ids, the class names (and the groups,
    in files that have them: files without keep the checksum they always had)."""
    import hashlib

    h = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    for part in (splits, ids, classes) if groups is None else (splits, ids, classes, groups):
        h.update("\n".join(part).encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


# -- reading -------------------------------------------------------------------------------------


def check_complete(path: str) -> str | None:
    """None when `path` is structurally a complete featx file (attributes, datasets, shapes); else
    why not. Cheap; `verify` also checks the content."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return _structure(f)
    except (OSError, KeyError, ValueError, TypeError) as e:
        return f"it is not a readable featx HDF5 file ({first_line(e, 160)})"


def _structure(f) -> str | None:
    """Every dataset a reader needs is there with the shape the root attributes promise."""
    if _attr(f.attrs.get("featx_state")) != COMPLETE:
        return "it was never finished"
    n = _attr(f.attrs.get("rows"))
    if not _count(n):
        return f"its rows attribute is {n!r}, not a row count"
    for name in ("labels", "split", "paths", "classes", "codes", "skipped/paths", "skipped/reasons"):
        if name not in f:
            return f"/{name} is missing"
    for name in ("labels", "split", "paths", *(("groups",) if "groups" in f else ())):
        if f[name].shape != (n,):
            return f"/{name} has shape {f[name].shape}, expected ({n},)"
    if f["classes"].ndim != 1 or f["skipped/paths"].shape != f["skipped/reasons"].shape:
        return "/classes or /skipped has the wrong shape"
    listed = _attr(f.attrs.get("layers"))
    listed = [listed] if isinstance(listed, str) else listed
    if listed is not None:
        if not isinstance(listed, list) or not listed or not all(isinstance(x, str) for x in listed):
            return f"its layers attribute is {listed!r}, not a list of layer names"
        missing = [x for x in listed if x not in f["codes"]]
        if missing:
            return f"/codes/{missing[0]} is missing (the file lists layers {', '.join(listed)})"
    for name, ds in f["codes"].items():
        if not hasattr(ds, "shape") or ds.ndim != 2 or ds.shape[0] != n or ds.shape[1] < 1:
            return f"/codes/{name} has shape {getattr(ds, 'shape', None)}, expected ({n}, D)"
    return None


def _rows_problem(f) -> str | None:
    """The per-row metadata (labels, splits, ids, class names) against its checksum: small, so
    checked on every open; bit rot there would silently mislabel rows."""
    want = _attr(f.attrs.get("rows_sha256"))
    if want is None:
        return None
    # the stored UTF-8 bytes hash as `rows_sha256` hashes the decoded strings, without decoding them (~35% faster)
    h = hashlib.sha256(np.ascontiguousarray(f["labels"][:], dtype=np.int64).tobytes())
    for name in ("split", "paths", "classes", *(("groups",) if "groups" in f else ())):
        h.update(
            b"\n".join(x if isinstance(x, bytes) else str(x).encode() for x in f[name][:].tolist()) + b"\0"
        )
    return (
        None
        if h.hexdigest() == want
        else "its labels, splits, paths, groups or class names do not match their checksum"
    )


def _codes_problem(f) -> str | None:
    """Every layer's codes against its sha256: reads the whole file."""
    for name, ds in f["codes"].items():
        want = _attr(ds.attrs.get("sha256"))
        if want is None:
            continue
        h = hashlib.sha256()
        step = max(1, _BLOCK_BYTES // max(1, ds.shape[1] * ds.dtype.itemsize))
        for start in range(0, ds.shape[0], step):
            h.update(np.ascontiguousarray(ds[start : start + step]).tobytes())
        if h.hexdigest() != want:
            return f"the codes of layer {name} do not match their checksum"
    return None


def _marker(path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), ".verified", os.path.basename(path) + ".json")


def _fingerprint(path: str) -> dict:
    # ctime too: no user-space tool can set it, so a file rewritten with its mtime restored is checked again
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def mark_verified(path: str) -> None:
    """Remember that the codes of `path`, as it is now on disk, passed their checksums."""
    try:
        marker = _marker(path)
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        write_json_atomic(marker, _fingerprint(path))
    except OSError:
        pass  # only a shortcut


def forget_verified(path: str) -> None:
    """Drop the remembered check of `path` (its codes failed a read): the next `verify` reads them all."""
    _remove(_marker(path))


def _remembered(path: str) -> bool:
    try:
        with open(_marker(path), encoding="utf-8") as fh:
            return json.load(fh) == _fingerprint(path)
    except (OSError, ValueError):
        return False


def verify(path: str) -> str | None:
    """None when `path` is a complete featx file whose content matches its checksums; else why not.

    The structure and the per-row metadata are checked every time. The codes' sha256 means
    reading every byte, so a passed check is remembered (`.verified/` beside the file) for as long
    as the file's size, mtime, ctime and inode stay the same; reads still verify HDF5's per-chunk
    fletcher32 checksums, and a read that fails one drops the remembered check.
    """
    import h5py

    try:
        with h5py.File(path, "r") as f:
            reason = _structure(f) or _rows_problem(f)
            if reason or _remembered(path):
                return reason
            reason = _codes_problem(f)
            if reason:
                return reason
    except (OSError, KeyError, ValueError, TypeError, UnicodeDecodeError, AttributeError) as e:
        return f"it is not a readable featx HDF5 file ({first_line(e, 160)})"
    mark_verified(path)
    return None


# -- typed metadata ------------------------------------------------------------------------------
# The attributes of a codes file, as plain h5py sees them (the layout above), have one owner here:
# extraction builds a FileMeta and LayerMetas and writes their `to_attrs()`; every reader goes
# through `CodesFile.meta` / `CodesFile.layer_meta()`. Fields missing in a file read as None/defaults.


_BAD = object()


def _json(v, default=None):
    if not isinstance(v, str):
        return v if v is not None else default
    try:
        return json.loads(v)
    except ValueError:
        return default


@dataclass(frozen=True)
class LayerMeta:
    """The attributes of `/codes/<layer>`. `relu` is True when the stored codes are non-negative
    ReLU outputs (applied by featx, or already by the network); `activation` is what featx applied."""

    activation: str = "none"  # 'relu' | 'relu6' | 'none'
    pool: str = "avg"
    pre_pool_shape: tuple[int, ...] = ()
    relu: bool = False
    post_act: str = "none"
    next_act: str = "none"
    code_dim: int = 0
    stride: int = 0
    depth: float = 0.0
    kind: str = ""

    @classmethod
    def from_tap(cls, tap, activation: str, pool) -> LayerMeta:
        return cls(
            activation=activation, pool=str(pool), pre_pool_shape=tuple(tap.shape),
            relu=activation != "none" or tap.post_act in ("relu", "relu6"), post_act=tap.post_act or "none",
            next_act=tap.next_act or "none", code_dim=tap.code_dim(pool), stride=tap.stride or 0, depth=tap.depth,
            kind=tap.kind,
        )  # fmt: skip

    def to_attrs(self) -> dict:
        return {
            "pre_pool_shape": np.array(self.pre_pool_shape, dtype=np.int64), "pool": self.pool, "relu": self.relu,
            "activation": self.activation, "post_act": self.post_act, "next_act": self.next_act,
            "code_dim": self.code_dim, "stride": self.stride, "depth": self.depth, "kind": self.kind,
        }  # fmt: skip

    @classmethod
    def from_attrs(cls, attrs: dict) -> LayerMeta:
        a = {k: _attr(v) for k, v in attrs.items()}
        shape = a.get("pre_pool_shape", ())
        return cls(
            activation=str(a.get("activation", "none")), pool=str(a.get("pool", "avg")),
            pre_pool_shape=tuple(shape) if isinstance(shape, (list, tuple)) else (), relu=bool(a.get("relu", False)),
            post_act=str(a.get("post_act", "none")), next_act=str(a.get("next_act", "none")),
            code_dim=_num(a.get("code_dim"), int, 0), stride=_num(a.get("stride"), int, 0),
            depth=_num(a.get("depth"), float, 0.0), kind=str(a.get("kind", "")),
        )  # fmt: skip


def _num(v, kind, default):
    return kind(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


# root attribute name -> FileMeta field, where they differ (the root `relu` is the requested mode)
_RENAMED = {"relu": "relu_mode"}
_JSON_FIELDS = ("preprocessing", "data_options", "library_versions", "layer_resolution", "config")


@dataclass(frozen=True)
class FileMeta:
    """The root attributes extraction writes (`finalize` adds rows, rows_sha256 and featx_state)."""

    model: str
    weights: str
    layers: tuple[str, ...] = ()
    format_version: int = FORMAT_VERSION
    featx_version: str | None = None
    cache_key: str | None = None
    weights_source: str | None = None
    weights_ident: str | None = None
    weights_sha256: str = ""
    preprocessing: dict | None = None
    preprocessing_text: str | None = None
    image_size: int | None = None
    dataset: str | None = None
    dataset_name: str | None = None
    dataset_fingerprint: str | None = None
    split_source: str | None = None
    data_options: dict | None = None
    created: str | None = None
    library_versions: dict | None = None
    layer_resolution: dict | None = None
    pool: str | None = None
    relu_mode: str | None = None  # 'auto' | 'on' | 'off', as requested (stored as root attr `relu`)
    dtype: str | None = None
    precision: str | None = None
    device: str | None = None
    batch_size: int | None = None
    workers: int | None = None
    channels_last: bool | None = None
    compile: bool | None = None
    decoder: str | None = None
    samples: int | None = None
    config: dict | None = None
    unparsed: tuple[str, ...] = ()  # JSON attributes that did not parse (read as None)

    def parsed(self, name: str, path: str):
        """A JSON field that featx needs: a one-line FeatxError naming the file if it did not parse."""
        if name in self.unparsed:
            raise FeatxError(
                f"{path}: attribute {name!r} is not valid JSON; rebuild the file with featx extract"
            )
        return getattr(self, name)

    def to_attrs(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None or f.name == "unparsed":
                continue
            if f.name in _JSON_FIELDS:
                v = json.dumps(v)
            elif f.name == "layers":
                v = np.array(list(v), dtype=object)
            out[{b: a for a, b in _RENAMED.items()}.get(f.name, f.name)] = v
        return out

    @classmethod
    def from_attrs(cls, attrs: dict) -> FileMeta:
        a = {_RENAMED.get(k, k): _attr(v) for k, v in attrs.items()}
        known = {f.name for f in fields(cls)} - {"unparsed"}
        kw = {k: v for k, v in a.items() if k in known}
        bad = []
        for k in _JSON_FIELDS:
            if k in kw:
                kw[k] = _json(kw[k], _BAD)
                if kw[k] is _BAD:
                    kw[k] = None
                    bad.append(k)
        kw["unparsed"] = tuple(bad)
        kw["layers"] = tuple(kw.get("layers") or ())
        kw.setdefault("format_version", 1)  # files from before the attribute was written
        return cls(**{"model": str(a.get("model", "")), "weights": str(a.get("weights", "")), **kw})


def _attr(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return [_attr(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


READ_BLOCK_ROWS = 8192  # rows read contiguously at a time when a selection is dense


def _read_rows(ds, idx: np.ndarray) -> np.ndarray:
    """`ds[idx]` for sorted row indices, block by block: a block where the selection has at least
    one row per HDF5 chunk on average is read whole and indexed in memory (every chunk is
    decompressed either way, and h5py's point selection is slow per row: 48,000 of 70,000 rows
    read 1.7x faster so), a sparser one by point selection. Memory: the result plus one block."""
    if len(idx) == 0:
        return np.empty((0, ds.shape[1]), ds.dtype)
    chunk = ds.chunks[0] if ds.chunks else READ_BLOCK_ROWS
    out = np.empty((len(idx), ds.shape[1]), ds.dtype)
    cuts = np.searchsorted(idx, np.arange(0, ds.shape[0] + READ_BLOCK_ROWS, READ_BLOCK_ROWS))
    for b, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        if lo == hi:
            continue
        start = b * READ_BLOCK_ROWS
        stop = min(start + READ_BLOCK_ROWS, ds.shape[0])
        sel = idx[lo:hi]
        if (hi - lo) * chunk >= stop - start:
            out[lo:hi] = ds[start:stop][sel - start]
        else:
            out[lo:hi] = ds[sel]
    return out


class CodesFile:
    """Read access to a complete featx HDF5 file; use as a context manager.

    >>> with open_codes("cache/x.h5") as f:
    ...     X = f.codes("layer4", f.split == "train"); y = f.labels[f.split == "train"]
    """

    def __init__(self, path: str):
        import h5py

        self.path = str(path)
        if not os.path.isfile(self.path):
            raise UsageError(f"{self.path}: no such codes file")
        reason = verify(self.path)
        if reason:
            raise FeatxError(
                f"{self.path}: cannot use this codes file: {reason}; rerun `featx extract` to (re)build it"
            )
        self._f = h5py.File(self.path, "r")
        f = self._f
        self.attrs = {k: _attr(v) for k, v in f.attrs.items()}
        self.meta = FileMeta.from_attrs(self.attrs)
        self.layers: list[str] = list(self.meta.layers or list(f["codes"].keys()))
        self.classes: list[str] = f["classes"].asstr()[:].tolist()
        self.labels: np.ndarray = f["labels"][:]
        self.split: np.ndarray = np.array(f["split"].asstr()[:].tolist(), dtype="<U5")
        self.paths: list[str] = f["paths"].asstr()[:].tolist()
        # --group-by: whole groups (subjects, patients) stay on one side of every hold-out and CV fold
        self.groups: np.ndarray | None = np.array(f["groups"].asstr()[:].tolist()) if "groups" in f else None
        self.skipped: list[tuple[str, str]] = list(
            zip(f["skipped/paths"].asstr()[:].tolist(), f["skipped/reasons"].asstr()[:].tolist())
        )

    def __enter__(self) -> CodesFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def __len__(self) -> int:
        return len(self.labels)

    def json_attr(self, name: str):
        v = self.attrs.get(name)
        if not isinstance(v, str):
            return v
        try:
            return json.loads(v)
        except ValueError:
            raise FeatxError(
                f"{self.path}: attribute {name!r} is not valid JSON; rebuild the file with featx extract"
            ) from None

    def layer_attrs(self, layer: str) -> dict:
        """The raw attributes of /codes/<layer> (`layer_meta` gives them typed)."""
        self._check_layer(layer)
        return {k: _attr(v) for k, v in self._f["codes"][layer].attrs.items()}

    def layer_meta(self, layer: str) -> LayerMeta:
        self._check_layer(layer)
        return LayerMeta.from_attrs(self._f["codes"][layer].attrs)

    def dim(self, layer: str) -> int:
        self._check_layer(layer)
        return int(self._f["codes"][layer].shape[1])

    def _check_layer(self, layer: str) -> None:
        if layer not in self._f["codes"]:
            raise FeatxError(f"layer {layer!r} is not in {self.path}; it holds {', '.join(self.layers)}")

    def codes(self, layer: str, rows=None) -> np.ndarray:
        """Codes of `layer` as float32 [n, D] for `rows` (None: all; a boolean mask or sorted indices)."""
        self._check_layer(layer)
        ds = self._f["codes"][layer]
        try:
            if rows is None:
                out = ds[:]
            else:
                rows = np.asarray(rows)
                idx = np.flatnonzero(rows) if rows.dtype == bool else rows
                out = _read_rows(ds, np.sort(idx))
        except OSError as e:  # a chunk failed its checksum or cannot be decompressed
            forget_verified(self.path)  # so the next extract checks the whole file, and sets it aside
            raise FeatxError(f"{self.path}: reading /codes/{layer} failed ({first_line(e, 160)}); the file is damaged: "
                             f"delete it (featx cache rm) and rerun featx extract") from None  # fmt: skip
        return out.astype(np.float32, copy=False)

    def iter_codes(self, layer: str, rows: np.ndarray, chunk_rows: int = 4096):
        """Yield (positions, codes) over sorted `rows` in bounded chunks, for data larger than memory."""
        self._check_layer(layer)
        rows = np.sort(np.asarray(rows))
        for start in range(0, len(rows), chunk_rows):
            part = rows[start : start + chunk_rows]
            yield part, self.codes(layer, part)


def open_codes(path: str) -> CodesFile:
    """Open a complete featx codes file for reading."""
    return CodesFile(path)
