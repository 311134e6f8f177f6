"""Finalizing a journal into the HDF5 entry: space check, the copy in blocks, the row checksum, the atomic rename."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence

import numpy as np

from featx.errors import FeatxError, first_line
from featx.files import fsync_dir, remove_quietly
from featx.store.journal import Journal
from featx.store.meta import COMPLETE
from featx.store.parts import Part, add_virtual_layers, check_space, write_layer
from featx.store.verify import mark_verified


def _space_needed(journal: Journal, ids: Sequence[str], virtual: bool) -> int:
    """An upper bound on the finished file's size: raw codes (compression only shrinks them; none
    when they stay in part files), the row metadata, and HDF5's overhead."""
    codes = 0 if virtual else sum(spec.dim for spec in journal.layers) * journal.itemsize * journal.rows_done
    rows = journal.rows_done * (8 + 16 + 16) + sum(len(i) for i in ids)
    return int(codes * 1.01 + rows * 2 + (4 << 20))


def finalize(
    entry: str,
    journal: Journal,
    *,
    classes: Sequence[str],
    labels: np.ndarray,
    splits: np.ndarray,
    ids: Sequence[str],
    layer_attrs: dict[str, dict],
    attrs: dict,
    groups: np.ndarray | None = None,
    parts: Sequence[Part] | None = None,
) -> None:
    """Build the HDF5 file from a finished journal, atomically, then remove the journal. With
    `parts` (sealed part files holding the journal's rows in order, `featx.store.parts`), the
    codes are virtual datasets over them instead of a copy."""
    import gc
    import traceback

    import h5py

    index = journal.read_index()
    n = len(index)
    if parts is not None and sum(p.rows for p in parts) != n:
        raise FeatxError(f"the part files of {entry} hold {sum(p.rows for p in parts)} rows, not {n}")
    check_space(entry, _space_needed(journal, ids, parts is not None), journal.path)
    tmp = f"{entry}.tmp-{os.getpid()}"
    str_dt = h5py.string_dtype()
    row_labels = labels[index].astype(np.int64)
    row_splits = [str(x) for x in splits[index].tolist()]
    row_ids = [ids[i] for i in index]
    failure = None
    f = h5py.File(tmp, "w")
    try:
        grp = f.create_group("codes")
        if parts is not None:
            add_virtual_layers(grp, parts, journal.layers, journal.meta["dtype"], layer_attrs)
        for j, spec in enumerate(journal.layers if parts is None else []):
            write_layer(grp, journal, j, layer_attrs.get(spec.name))
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
        remove_quietly(tmp)
        raise
    if not _close_quietly(f) and failure is None:
        failure = f"writing {tmp} failed when closing it"
    if failure is not None:
        gc.collect()
        remove_quietly(tmp)
        raise FeatxError(
            f"{failure}; the codes are kept in {journal.path}: free space and rerun the same command to finish"
        )
    try:
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, entry)
        fsync_dir(os.path.dirname(os.path.abspath(entry)))
    except BaseException:
        remove_quietly(tmp)
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


def rows_sha256(
    labels: np.ndarray,
    splits: Sequence[str],
    ids: Sequence[str],
    classes: Sequence[str],
    groups: Sequence[str] | None = None,
) -> str:
    """A checksum of the per-row metadata: labels, splits, ids, the class names (and the groups,
    in files that have them: files without keep the checksum they always had)."""

    h = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    for part in (splits, ids, classes) if groups is None else (splits, ids, classes, groups):
        h.update("\n".join(part).encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()
