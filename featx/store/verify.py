"""Verifying an entry before it is trusted: structure, rows and codes checks, remembered per file fingerprint."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from featx.errors import first_line
from featx.files import remove_quietly, write_json_atomic
from featx.store.journal import is_count
from featx.store.meta import COMPLETE, attr_value
from featx.store.parts import part_problem, parts_stat


def _structure(f) -> str | None:
    """Every dataset a reader needs is there with the shape the root attributes promise."""
    if attr_value(f.attrs.get("featx_state")) != COMPLETE:
        return "it was never finished"
    n = attr_value(f.attrs.get("rows"))
    if not is_count(n):
        return f"its rows attribute is {n!r}, not a row count"
    for name in ("labels", "split", "paths", "classes", "codes", "skipped/paths", "skipped/reasons"):
        if name not in f:
            return f"/{name} is missing"
    for name in ("labels", "split", "paths", *(("groups",) if "groups" in f else ())):
        if f[name].shape != (n,):
            return f"/{name} has shape {f[name].shape}, expected ({n},)"
    if f["classes"].ndim != 1 or f["skipped/paths"].shape != f["skipped/reasons"].shape:
        return "/classes or /skipped has the wrong shape"
    listed = attr_value(f.attrs.get("layers"))
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
        if ds.is_virtual and (problem := part_problem(ds, f.filename)):
            return problem
    return None


def _rows_problem(f) -> str | None:
    """The per-row metadata (labels, splits, ids, class names) against its checksum: small, so
    checked on every open; bit rot there would silently mislabel rows."""
    want = attr_value(f.attrs.get("rows_sha256"))
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


# codes are hashed in blocks this size: a bound on the memory a check takes, small enough for a process
# near its memory limit (a fit's memory guard must get to speak), large enough that sha256 dominates
VERIFY_BLOCK_BYTES = 8 << 20


def _sha256(ds, start: int, stop: int) -> str:
    h = hashlib.sha256()
    step = max(1, VERIFY_BLOCK_BYTES // max(1, ds.shape[1] * ds.dtype.itemsize))
    for a in range(start, stop, step):
        h.update(np.ascontiguousarray(ds[a : min(stop, a + step)]).tobytes())
    return h.hexdigest()


def _codes_problem(f) -> str | None:
    """Every layer's codes against its sha256 (an entry assembled from part files: each part's row
    block against its own, `part_sha256`): reads the whole file, and its parts."""
    for name, ds in f["codes"].items():
        want = attr_value(ds.attrs.get("sha256"))
        blocks = attr_value(ds.attrs.get("part_sha256"))
        if want is not None and _sha256(ds, 0, ds.shape[0]) != want:
            return f"the codes of layer {name} do not match their checksum"
        if blocks is None:
            continue
        try:
            blocks = [(int(a), int(k), str(sha), str(part)) for a, k, sha, part in json.loads(blocks)]
        except (ValueError, TypeError):
            return f"the part checksums of layer {name} are not readable"
        at = 0
        for a, k, sha, part in blocks:
            if a != at or _sha256(ds, a, a + k) != sha:
                return f"the codes of layer {name} in its part file {part} do not match their checksum"
            at = a + k
        if at != ds.shape[0]:
            return f"the part checksums of layer {name} cover {at} of {ds.shape[0]} rows"
    return None


def _marker(path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), ".verified", os.path.basename(path) + ".json")


def _fingerprint(path: str) -> dict:
    # ctime too: no user-space tool can set it, so a file rewritten with its mtime restored is checked again
    st = os.stat(path)
    out = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}
    parts = parts_stat(path)  # an entry assembled from ranks: its part files count as the file
    return out if parts is None else {**out, "parts": parts}


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
    remove_quietly(_marker(path))


def _remembered(path: str) -> bool:
    try:
        with open(_marker(path), encoding="utf-8") as fh:
            return json.load(fh) == _fingerprint(path)
    except (OSError, ValueError):
        return False


def verify(path: str, full: bool = False) -> str | None:
    """None when `path` is a complete featx file whose content matches its checksums; else why not.

    The structure and the per-row metadata are checked every time. The codes' sha256 means
    reading every byte, so a passed check is remembered (`.verified/` beside the file) for as long
    as the file's size, mtime, ctime and inode stay the same; reads still verify HDF5's per-chunk
    fletcher32 checksums, and a read that fails one drops the remembered check. `full`: read the
    codes even when a passed check is remembered (`featx cache verify`).
    """
    import h5py

    opened = False
    try:
        with h5py.File(path, "r") as f:
            opened = True
            reason = _structure(f) or _rows_problem(f)
            if reason or (not full and _remembered(path)):
                return reason
            reason = _codes_problem(f)
            if reason:
                return reason
    except (OSError, KeyError, ValueError, TypeError, UnicodeDecodeError, AttributeError) as e:
        if opened:  # an HDF5 file whose content fails to read (a chunk's checksum, a cut file)
            return f"it is damaged: reading it failed ({first_line(e, 160)})"
        return f"it is not a readable featx HDF5 file ({first_line(e, 160)})"
    mark_verified(path)
    return None
