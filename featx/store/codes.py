"""Reading codes: `open_codes` verifies an entry and returns a `CodesFile` (rows, labels, splits, layers)."""

from __future__ import annotations

import os

import numpy as np

from featx.errors import FeatxError, UsageError, first_line
from featx.files import file_kind, what_it_is
from featx.store.meta import FileMeta, LayerMeta, attr_value
from featx.store.verify import forget_verified, verify

READ_BLOCK_ROWS = 8192  # rows read contiguously at a time when a selection is dense


def read_rows(ds, idx: np.ndarray) -> np.ndarray:
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
        kind = file_kind(self.path)
        # a file of another kind is the user's input (exit 2); a damaged .h5 is a failure (exit 1, below)
        if kind != "hdf5" and (kind != "other" or not self.path.endswith((".h5", ".hdf5"))):
            raise UsageError(
                f"{self.path}: {what_it_is(self.path)}, not a codes file; give a file featx extract wrote"
            )
        reason = verify(self.path)
        if reason:
            raise FeatxError(
                f"{self.path}: cannot use this codes file: {reason}; rerun `featx extract` to (re)build it"
            )
        self._f = h5py.File(self.path, "r")
        f = self._f
        self.attrs = {k: attr_value(v) for k, v in f.attrs.items()}
        self.meta = FileMeta.from_attrs(self.attrs)
        self.layers: list[str] = list(self.meta.layers or list(f["codes"].keys()))
        self.classes: list[str] = f["classes"].asstr()[:].tolist()
        self.labels: np.ndarray = f["labels"][:]
        self.split: np.ndarray = np.array(f["split"].asstr()[:].tolist(), dtype="<U5")
        self.paths: list[str] = f["paths"].asstr()[:].tolist()
        # --group-by: whole groups (subjects, patients) stay on one side of every hold-out and CV fold
        self.groups: np.ndarray | None = np.array(f["groups"].asstr()[:].tolist()) if "groups" in f else None
        # unlabelled data (a flat folder, an image list, shards without labels): one class "", labels 0
        self.labelled: bool = self.meta.labelled is not False
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

    @property
    def h5(self):
        """The open h5py.File (read-only), for readers that copy datasets as stored."""
        return self._f

    def require_labels(self, what: str) -> None:
        """A one-line UsageError when the file's data had no labels: `what` (fit, score...) needs them."""
        if not self.labelled:
            raise UsageError(
                f"{self.path}: the codes are of unlabelled images (no classes); {what} needs labels: "
                f"extract a labelled source (class folders, a CSV with a label column)"
            )

    def layer_attrs(self, layer: str) -> dict:
        """The raw attributes of /codes/<layer> (`layer_meta` gives them typed)."""
        self._check_layer(layer)
        return {k: attr_value(v) for k, v in self._f["codes"][layer].attrs.items()}

    def layer_meta(self, layer: str) -> LayerMeta:
        self._check_layer(layer)
        return LayerMeta.from_attrs(self._f["codes"][layer].attrs)

    def dim(self, layer: str) -> int:
        self._check_layer(layer)
        return int(self._f["codes"][layer].shape[1])

    def _check_layer(self, layer: str) -> None:
        self.check_layers([layer])

    def check_layers(self, layers) -> None:
        """Every name the file does not hold, in one line (a user's --layer)."""
        missing = [n for n in layers if n not in self._f["codes"]]
        if missing:
            what = (
                f"layer {missing[0]!r} is"
                if len(missing) == 1
                else f"layers {', '.join(map(repr, missing))} are"
            )
            raise UsageError(f"{what} not in {self.path}; it holds {', '.join(self.layers)}")

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
                out = read_rows(ds, np.sort(idx))
        except OSError as e:  # a chunk failed its checksum or cannot be decompressed
            forget_verified(self.path)  # so the next extract checks the whole file, and sets it aside
            raise FeatxError(
                f"{self.path}: reading /codes/{layer} failed ({first_line(e, 160)}); the file is damaged: "
                f"delete it (featx cache rm) and rerun featx extract"
            ) from None
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
