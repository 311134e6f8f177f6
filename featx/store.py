"""The HDF5 file of one cache entry: its schema, how it is written safely, and how it is read.

Writing goes through a journal so that no interruption (Ctrl-C, kill -9, power loss, a full disk)
can leave a file that looks complete but is not, and so that a rerun resumes at the last
committed row:

- while extracting, rows go to `ENTRY.h5.partial/`: one raw append-only file per layer plus the
  sample index of each row. After each batch the data files are fsync'ed, then `progress.json`
  (rows and samples done, images skipped) is replaced atomically. On resume every file is cut
  back to the committed row count, so a torn write is simply overwritten.
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
with `json.loads` only; nothing read from a file is ever evaluated.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from featx.errors import FeatxError

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


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# -- the journal ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """A layer's place in the file: its name and code width."""

    name: str
    dim: int


class Journal:
    """Append-only partial entry. `meta` must hold 'key', 'layers' [[name, dim]...], 'dtype',
    'samples' (total) and 'batch_size'; a journal with other meta is discarded and restarted."""

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

    # files: rows.<j>.bin per layer, index.bin (int64 sample index per row)
    def _data_paths(self) -> list[str]:
        return [os.path.join(self.path, f"rows.{j}.bin") for j in range(len(self.layers))] + [
            os.path.join(self.path, "index.bin")
        ]

    def _row_bytes(self) -> list[int]:
        return [spec.dim * self.itemsize for spec in self.layers] + [8]

    @classmethod
    def open(cls, path: str, meta: dict) -> Journal:
        """Resume the journal at `path` if it matches `meta`, else start it afresh."""
        j = cls(path, meta)
        reason = j._try_resume()
        if reason is not None:
            if os.path.exists(path):
                shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)
            write_json_atomic(os.path.join(path, "meta.json"), meta)
            j._commit_progress()
            fsync_dir(os.path.dirname(path))
        j._files = [open(p, "r+b" if os.path.exists(p) else "w+b") for p in j._data_paths()]
        for f, rb in zip(j._files, j._row_bytes()):
            f.truncate(j.rows_done * rb)
            f.seek(j.rows_done * rb)
        return j

    def _try_resume(self) -> str | None:
        """None when resumed; else why not."""
        try:
            meta = _read_json(os.path.join(self.path, "meta.json"))
            prog = _read_json(os.path.join(self.path, "progress.json"))
        except (OSError, ValueError):
            return "no journal"
        if meta != self.meta:
            return "journal of another configuration"
        rows, samples = int(prog["rows_done"]), int(prog["samples_done"])
        for p, rb in zip(self._data_paths(), self._row_bytes()):
            if not os.path.exists(p) or os.path.getsize(p) < rows * rb:
                return "journal data shorter than its progress record"
        self.rows_done, self.samples_done = rows, samples
        self.skipped = [list(s) for s in prog.get("skipped", [])]
        self.resumed = samples > 0
        return None

    def _commit_progress(self) -> None:
        write_json_atomic(
            os.path.join(self.path, "progress.json"),
            {"rows_done": self.rows_done, "samples_done": self.samples_done, "skipped": self.skipped,
             "updated": time.time()},
        )  # fmt: skip

    def append(
        self, codes: Sequence[np.ndarray], sample_index: np.ndarray, samples_done: int, skipped: Sequence
    ) -> None:
        """Write one batch (codes in layer order) and commit it. Durable once this returns."""
        n = len(sample_index)
        for spec, c in zip(self.layers, codes):
            if c.shape != (n, spec.dim):
                raise ValueError(f"layer {spec.name}: got codes {c.shape}, expected ({n}, {spec.dim})")
        dtype = np.dtype(self.meta["dtype"])
        for f, c in zip(self._files, [*codes, sample_index]):
            f.write(np.ascontiguousarray(c, dtype=dtype if c is not sample_index else np.int64).tobytes())
        for f in self._files:
            f.flush()
            os.fsync(f.fileno())
        self.rows_done += n
        self.samples_done = samples_done
        self.skipped.extend([int(i), str(r)] for i, r in skipped)
        self._commit_progress()

    def close(self) -> None:
        for f in self._files:
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


def journal_path(entry: str) -> str:
    return entry + ".partial"


def read_progress(entry: str) -> dict | None:
    """A partial entry's progress record, or None."""
    try:
        prog = _read_json(os.path.join(journal_path(entry), "progress.json"))
        meta = _read_json(os.path.join(journal_path(entry), "meta.json"))
    except (OSError, ValueError):
        return None
    return {
        **prog,
        "samples": meta.get("samples"),
        "layers": [n for n, _ in meta.get("layers", [])],
        "meta": meta,
    }


# -- finalizing ----------------------------------------------------------------------------------


def finalize(entry: str, journal: Journal, *, classes: Sequence[str], labels: np.ndarray, splits: np.ndarray,
             ids: Sequence[str], layer_attrs: dict[str, dict], attrs: dict) -> None:  # fmt: skip
    """Build the HDF5 file from a finished journal, atomically, then remove the journal."""
    import h5py

    index = journal.read_index()
    n = len(index)
    tmp = f"{entry}.tmp-{os.getpid()}"
    str_dt = h5py.string_dtype()
    try:
        with h5py.File(tmp, "w") as f:
            grp = f.create_group("codes")
            for j, spec in enumerate(journal.layers):
                rows_per_chunk = max(1, min(n, (1 << 20) // max(1, spec.dim * journal.itemsize)))
                cols_per_chunk = min(spec.dim, max(1, (1 << 20) // journal.itemsize))
                ds = grp.create_dataset(
                    spec.name, shape=(n, spec.dim), dtype=journal.meta["dtype"],
                    chunks=(rows_per_chunk, cols_per_chunk) if n else None,
                    compression="gzip" if n else None, compression_opts=1 if n else None, shuffle=bool(n),
                )  # fmt: skip
                step = max(1, _BLOCK_BYTES // max(1, spec.dim * journal.itemsize))
                for start in range(0, n, step):
                    stop = min(n, start + step)
                    ds[start:stop] = journal.read_layer(j, start, stop)
                for k, v in layer_attrs.get(spec.name, {}).items():
                    ds.attrs[k] = v
            f.create_dataset("labels", data=labels[index].astype(np.int64))
            f.create_dataset("classes", data=np.array(list(classes), dtype=object), dtype=str_dt)
            f.create_dataset("split", data=np.array(splits[index].tolist(), dtype=object), dtype=str_dt)
            f.create_dataset("paths", data=np.array([ids[i] for i in index], dtype=object), dtype=str_dt)
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
            f.attrs["featx_state"] = COMPLETE  # last: a file without it is never trusted
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, entry)
        fsync_dir(os.path.dirname(os.path.abspath(entry)))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    journal.close()
    shutil.rmtree(journal.path, ignore_errors=True)


# -- reading -------------------------------------------------------------------------------------


def check_complete(path: str) -> str | None:
    """None when `path` is a complete, readable featx file; else the reason it is not."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("featx_state") != COMPLETE:
                return "it was never finished"
            n = int(f.attrs["rows"])
            for name in ("labels", "split", "paths"):
                if f[name].shape != (n,):
                    return f"/{name} has {f[name].shape[0]} rows, expected {n}"
            for name, ds in f["codes"].items():
                if ds.shape[0] != n:
                    return f"/codes/{name} has {ds.shape[0]} rows, expected {n}"
    except (OSError, KeyError, ValueError, TypeError) as e:
        return f"it is not a readable featx HDF5 file ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})"
    return None


def _attr(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return [_attr(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


class CodesFile:
    """Read access to a complete featx HDF5 file; use as a context manager.

    >>> with open_codes("cache/x.h5") as f:
    ...     X = f.codes("layer4", f.split == "train"); y = f.labels[f.split == "train"]
    """

    def __init__(self, path: str):
        import h5py

        self.path = str(path)
        reason = check_complete(self.path) if os.path.exists(self.path) else "no such file"
        if reason:
            raise FeatxError(
                f"{self.path}: cannot use this codes file: {reason}; rerun `featx extract` to (re)build it"
            )
        self._f = h5py.File(self.path, "r")
        f = self._f
        self.attrs = {k: _attr(v) for k, v in f.attrs.items()}
        self.layers: list[str] = list(self.attrs.get("layers") or list(f["codes"].keys()))
        self.classes: list[str] = f["classes"].asstr()[:].tolist()
        self.labels: np.ndarray = f["labels"][:]
        self.split: np.ndarray = np.array(f["split"].asstr()[:].tolist(), dtype="<U5")
        self.paths: list[str] = f["paths"].asstr()[:].tolist()
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
        return json.loads(v) if isinstance(v, str) else v

    def layer_attrs(self, layer: str) -> dict:
        self._check_layer(layer)
        return {k: _attr(v) for k, v in self._f["codes"][layer].attrs.items()}

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
        if rows is None:
            out = ds[:]
        else:
            rows = np.asarray(rows)
            idx = np.flatnonzero(rows) if rows.dtype == bool else rows
            out = ds[np.sort(idx)] if len(idx) else np.empty((0, ds.shape[1]), ds.dtype)
        return out.astype(np.float32, copy=False)

    def iter_codes(self, layer: str, rows: np.ndarray, chunk_rows: int = 4096):
        """Yield (positions, codes) over sorted `rows` in bounded chunks, for data larger than memory."""
        self._check_layer(layer)
        ds = self._f["codes"][layer]
        rows = np.sort(np.asarray(rows))
        for start in range(0, len(rows), chunk_rows):
            part = rows[start : start + chunk_rows]
            block = ds[int(part[0]) : int(part[-1]) + 1]
            yield part, block[part - part[0]].astype(np.float32, copy=False)


def open_codes(path: str) -> CodesFile:
    """Open a complete featx codes file for reading."""
    return CodesFile(path)
