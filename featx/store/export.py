"""Exporting one layer of a codes file for other tools: `.npy`, `.parquet` or `.h5`.

Rules:
- the codes are `CodesFile.codes(layer)` exactly (float32; float16 entries are widened, which is
  exact); `.h5` keeps the stored dtype, so its codes checksum stays valid and the file is itself a
  featx codes file (`featx info`, `fit`, `open_codes` read it);
- streamed `block_rows` rows at a time: memory is one block, whatever the layer's size;
- atomic: every file is written under a temporary name beside its target and renamed into place
  at the end (the main file last), so an interrupted export leaves no file that looks complete;
- the row metadata goes with the codes: for `.npy` in files beside it (`STEM.labels.npy`,
  `STEM.split.npy`, `STEM.paths.txt`, `STEM.classes.txt`, `STEM.groups.txt` when the file has
  groups); for `.parquet` as columns (`id`, `label`, `class`, `split`, `group`, `code`); an
  unlabelled file's labels are -1 (`.npy`) or null (`.parquet`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from featx.errors import FeatxError, UsageError, first_line
from featx.files import fsync_dir, remove_quietly
from featx.store.codes import CodesFile

EXPORT_SUFFIXES = (".npy", ".parquet", ".h5")
BLOCK_ROWS = 65536  # rows read and written at a time: 65,536 x 1280 float32 is 320 MiB at most


def export_layer(path: str, layer: str, out: str, block_rows: int = BLOCK_ROWS) -> list[str]:
    """Write `layer` of the codes file `path` to `out` (its suffix picks the format); returns the
    files written, the main one first.

    >>> export_layer("cache/x.h5", "layer4", "layer4.npy")   # doctest: +SKIP
    ['layer4.npy', 'layer4.labels.npy', 'layer4.split.npy', 'layer4.paths.txt', 'layer4.classes.txt']
    """
    suffix = os.path.splitext(out)[1].lower()
    if suffix not in EXPORT_SUFFIXES:
        raise UsageError(
            f"--out {out}: unknown format {suffix or '(no suffix)'!r}; end the name in "
            f"{', '.join(EXPORT_SUFFIXES)}"
        )
    if block_rows < 1:
        raise UsageError(f"--block-rows {block_rows}: must be a positive integer")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise FeatxError(f"--out {out}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise FeatxError(f"--out {out}: folder {folder} is not writable; choose another --out")
    with CodesFile(path) as f:
        f.check_layers([layer])
        if suffix == ".parquet":
            writer = _parquet_writer()  # before anything is written: a missing pyarrow is one line
            return _atomic([out], lambda tmps: writer(f, layer, tmps[0], block_rows))
        if suffix == ".h5":
            return _atomic([out], lambda tmps: _write_h5(f, layer, tmps[0], block_rows))
        stem = out[: -len(suffix)]
        names = [out, f"{stem}.labels.npy", f"{stem}.split.npy", f"{stem}.paths.txt", f"{stem}.classes.txt"]
        if f.groups is not None:
            names.append(f"{stem}.groups.txt")
        return _atomic(names, lambda tmps: _write_npy(f, layer, tmps, block_rows))


def _atomic(names: list[str], write: Callable[[list[str]], None]) -> list[str]:
    """Write `names` through temporary names, then rename them into place, the first one last."""
    tmps = [f"{n}.tmp-{os.getpid()}" for n in names]
    try:
        write(tmps)
        for t in tmps:
            with open(t, "rb+") as fh:
                os.fsync(fh.fileno())
        for t, n in list(zip(tmps, names))[::-1]:
            os.replace(t, n)
    except OSError as e:
        raise FeatxError(
            f"--out {names[0]}: writing failed ({first_line(e, 160)}); free space or choose another --out"
        ) from None
    finally:
        for t in tmps:
            remove_quietly(t)
    fsync_dir(os.path.dirname(os.path.abspath(names[0])))
    return names


def _blocks(f: CodesFile, layer: str, block_rows: int):
    """(start, codes) for consecutive blocks of rows, equal to `f.codes(layer)` block by block."""
    for start in range(0, len(f), block_rows):
        rows = np.arange(start, min(len(f), start + block_rows))
        yield start, f.codes(layer, rows)


def _text_lines(values) -> str:
    # one value a line; a newline inside an id (a legal file-name byte) is written as \n
    return "".join(str(v).replace("\\", "\\\\").replace("\n", "\\n") + "\n" for v in values)


def _labels(f: CodesFile) -> np.ndarray:
    return f.labels.astype(np.int64) if f.labelled else np.full(len(f), -1, dtype=np.int64)


def _write_npy(f: CodesFile, layer: str, tmps: list[str], block_rows: int) -> None:
    codes = np.lib.format.open_memmap(tmps[0], mode="w+", dtype=np.float32, shape=(len(f), f.dim(layer)))
    for start, block in _blocks(f, layer, block_rows):
        codes[start : start + len(block)] = block
        codes.flush()
    del codes
    np.save(_npy_file(tmps[1]), _labels(f))
    np.save(_npy_file(tmps[2]), f.split.astype("<U5"))
    texts = [f.paths, f.classes if f.labelled else []] + ([f.groups.tolist()] if f.groups is not None else [])
    for t, values in zip(tmps[3:], texts):
        with open(t, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as fh:
            fh.write(_text_lines(values))


def _npy_file(tmp: str):
    return open(tmp, "wb")  # np.save on a name would append .npy to the temporary name


def _parquet_writer():
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UsageError(
            '--out *.parquet needs pyarrow: pip install "featx[parquet]" (or pip install pyarrow)'
        ) from None
    return _write_parquet


def _write_parquet(f: CodesFile, layer: str, tmp: str, block_rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = f.dim(layer)
    cols = [("id", pa.string()), ("label", pa.int64()), ("class", pa.string()), ("split", pa.string())]
    if f.groups is not None:
        cols.append(("group", pa.string()))
    schema = pa.schema(
        [*cols, ("code", pa.list_(pa.float32(), dim))],
        metadata={"featx_layer": layer, "featx_source": os.path.basename(f.path)},
    )
    labels = f.labels.astype(np.int64)
    with pq.ParquetWriter(tmp, schema) as w:
        for start, block in _blocks(f, layer, block_rows):
            sl = slice(start, start + len(block))
            lab = labels[sl]
            data = {
                "id": pa.array(f.paths[sl], pa.string()),
                "label": pa.array(lab, pa.int64(), mask=np.full(len(lab), not f.labelled)),
                "class": pa.array(
                    [f.classes[k] for k in lab] if f.labelled else [None] * len(lab), pa.string()
                ),
                "split": pa.array(f.split[sl].tolist(), pa.string()),
            }
            if f.groups is not None:
                data["group"] = pa.array(f.groups[sl].tolist(), pa.string())
            flat = pa.array(np.ascontiguousarray(block).reshape(-1), pa.float32())
            data["code"] = pa.FixedSizeListArray.from_arrays(flat, dim)
            w.write_table(pa.table(data, schema=schema))


def _write_h5(f: CodesFile, layer: str, tmp: str, block_rows: int) -> None:
    """The layer as stored (dtype, chunks, compression, attributes, checksum) and every row dataset
    and root attribute of the source, listing this one layer: a featx codes file itself."""
    import h5py

    src = f.h5
    ds = src["codes"][layer]
    with h5py.File(tmp, "w") as out:
        dst = out.create_group("codes").create_dataset(
            layer,
            shape=ds.shape,
            dtype=ds.dtype,
            chunks=ds.chunks,
            compression=ds.compression,
            compression_opts=ds.compression_opts,
            shuffle=ds.shuffle,
            fletcher32=ds.fletcher32,
        )
        for start in range(0, ds.shape[0], block_rows):
            dst[start : start + block_rows] = ds[start : start + block_rows]
        for k, v in ds.attrs.items():
            dst.attrs[k] = v
        for name in ("labels", "classes", "split", "paths", "groups", "skipped"):
            if name in src:
                src.copy(src[name], out, name)
        for k, v in src.attrs.items():
            out.attrs[k] = v
        out.attrs["layers"] = np.array([layer], dtype=object)
        out.attrs["exported_from"] = os.path.basename(f.path)
