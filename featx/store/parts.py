"""Part files: an entry whose codes stay in per-rank HDF5 files, referenced by virtual datasets.

A distributed extraction (torchrun) used to copy every rank's rows into the one entry file, in
rank 0 alone: at 10^8 images x 1,280 float16 codes that is 256 GB per layer through one
process. Instead each rank seals its own journal shards into part files, in parallel, and rank 0
writes a small entry file whose `/codes/<layer>` are HDF5 virtual datasets (VDS) mapping each
part's row block. The layout:

    ENTRY.h5                       labels, splits, paths, ... and /codes/<layer> as a VDS
    ENTRY.h5.parts/from-<S>.h5     /codes/<layer> rows of samples [S, stop) (gzip, fletcher32)

Why this works without a copy: a rank computes a contiguous sample range, its rows are in sample
order, and the ranges tile [0, N), so the parts, sorted by start, are consecutive row blocks of
the entry; each maps with one VDS selection. The source names are relative
(`ENTRY.h5.parts/from-<S>.h5`): HDF5 resolves a relative source name against the directory of
the entry file, so a moved or renamed cache directory keeps working; copying the entry file
without its `.parts` folder does not.

Checks: HDF5 fills a VDS region whose source file is missing with the fill value, silently, so
`part_problem` (part of every `verify`) opens each source and checks its dataset's shape, naming
a missing or unreadable part in one line. Each part's layer carries the sha256 of its rows
(`sha256` attribute), and the entry's layer carries `part_sha256`, [[first row, rows, sha256,
part], ...] in row order, which `verify` checks by reading the entry's rows block by block (so the check
covers the mapping as well as the bytes). A fletcher32 failure in a part surfaces through the
VDS as the read error it is.

A part is written as `from-<S>.h5.tmp-PID`, fsync'ed and renamed into place; it records the
progress checksum of the journal shard it was sealed from (`journal_checksum`), so a rerun after
a kill during assembly reuses a sealed part of the same shard and reseals any other.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from featx.errors import FeatxError, first_line
from featx.files import fsync_dir, remove_quietly
from featx.store.journal import BLOCK_BYTES
from featx.store.meta import COMPLETE, attr_value

PART_ATTRS = ("featx_state", "journal_checksum", "first_sample", "rows")


def parts_path(entry: str) -> str:
    """The folder beside `entry` that holds its part files (only entries assembled from ranks have one)."""
    return entry + ".parts"


def part_file(entry: str, start: int) -> str:
    return os.path.join(parts_path(entry), f"from-{start:012d}.h5")


@dataclass(frozen=True)
class Part:
    """A sealed part: its file (relative to the entry's folder), rows, and per-layer sha256."""

    name: str  # ENTRY.h5.parts/from-<S>.h5, relative to the entry's directory
    rows: int
    sha256: tuple[str, ...]  # per layer, in layer order

    def to_json(self) -> list:
        return [self.name, self.rows, list(self.sha256)]

    @classmethod
    def from_json(cls, value) -> Part:
        name, rows, sha = value
        return cls(str(name), int(rows), tuple(str(s) for s in sha))


def storage(n: int, dim: int, itemsize: int) -> dict:
    """How a codes dataset of n x dim is stored (the entry's and a part's): ~1 MiB chunks, gzip 1,
    byte shuffle, fletcher32 per chunk; none of it for an empty one."""
    if not n:
        return {"chunks": None}
    rows = max(1, min(n, (1 << 20) // max(1, dim * itemsize)))
    cols = min(dim, max(1, (1 << 20) // itemsize))
    return {
        "chunks": (rows, cols),
        "compression": "gzip",
        "compression_opts": 1,
        "shuffle": True,
        "fletcher32": True,
    }


def _relative(entry: str, path: str) -> str:
    return os.path.relpath(path, os.path.dirname(os.path.abspath(entry)))


def _reusable(entry: str, start: int, token: str, rows: int, layers) -> Part | None:
    """The part of `entry` from sample `start` when it is sealed from the same shard state, else None."""
    import h5py

    path = part_file(entry, start)
    try:
        with h5py.File(path, "r") as f:
            a = {k: attr_value(f.attrs.get(k)) for k in PART_ATTRS}
            if a != {"featx_state": COMPLETE, "journal_checksum": token, "first_sample": start, "rows": rows}:
                return None
            shas = []
            for spec in layers:
                ds = f["codes"][spec.name]
                if ds.shape != (rows, spec.dim):
                    return None
                shas.append(str(attr_value(ds.attrs["sha256"])))
    except (OSError, KeyError, ValueError, TypeError):
        return None
    return Part(_relative(entry, path), rows, tuple(shas))


def write_layer(group, journal, j: int, attrs: dict | None = None) -> str:
    """Copy layer `j` of `journal` into a new dataset of `group` (compressed, checksummed chunks), in
    blocks of BLOCK_BYTES; sets its `attrs` and its `sha256`, which it returns."""
    spec, n = journal.layers[j], journal.rows_done
    ds = group.create_dataset(
        spec.name, shape=(n, spec.dim), dtype=journal.meta["dtype"], **storage(n, spec.dim, journal.itemsize)
    )
    h = hashlib.sha256()
    step = max(1, BLOCK_BYTES // max(1, spec.dim * journal.itemsize))
    for a in range(0, n, step):
        block = journal.read_layer(j, a, min(n, a + step))
        ds[a : a + len(block)] = block
        h.update(block.tobytes())
    for k, v in (attrs or {}).items():
        ds.attrs[k] = v
    ds.attrs["sha256"] = h.hexdigest()
    return h.hexdigest()


def seal_part(entry: str, journal, start: int, token: str) -> Part:
    """Write the rows of the finished journal shard `journal` (first sample `start`, progress
    checksum `token`) as the part file `part_file(entry, start)`, atomically; reuse one already
    sealed from the same shard state."""
    import h5py

    path = part_file(entry, start)
    n = journal.rows_done
    found = _reusable(entry, start, token, n, journal.layers) if os.path.exists(path) else None
    if found is not None:
        return found
    need = int(sum(s.dim for s in journal.layers) * journal.itemsize * n * 1.01) + (1 << 20)
    check_space(path, need, journal.path)
    os.makedirs(parts_path(entry), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    shas = []
    try:
        with h5py.File(tmp, "w") as f:
            grp = f.create_group("codes")
            for j in range(len(journal.layers)):
                shas.append(write_layer(grp, journal, j))
            f.attrs["journal_checksum"] = token
            f.attrs["first_sample"] = int(start)
            f.attrs["rows"] = int(n)
            f.attrs["featx_state"] = COMPLETE
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(parts_path(entry))
    except OSError as e:
        remove_quietly(tmp)
        raise FeatxError(
            f"writing {path} failed ({first_line(e, 160)}); the codes are kept in {journal.path}: free "
            f"space and rerun the same command to finish"
        ) from None
    except BaseException:
        remove_quietly(tmp)
        raise
    return Part(_relative(entry, path), n, tuple(shas))


def check_space(target: str, need: int, kept: str) -> None:
    """Fail before writing when the disk or the process's file-size limit cannot take `need` bytes
    at `target`: HDF5 fails badly when a write fails half-way. `kept`: where the codes stay meanwhile."""
    import resource
    import shutil

    folder = os.path.dirname(os.path.abspath(target))
    probe = folder if os.path.isdir(folder) else os.path.dirname(folder)
    free = shutil.disk_usage(probe).free
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = min(free, soft if soft != resource.RLIM_INFINITY else free)
    if need > limit:
        what = (
            f"{free / 2**20:.0f} MiB free in {probe}"
            if limit == free
            else f"a file-size limit of {soft / 2**20:.1f} MiB"
        )
        raise FeatxError(
            f"finishing {target} needs up to {need / 2**20:.0f} MiB, but there is {what}; the codes are kept in "
            f"{kept}: free space and rerun the same command to finish"
        )


def add_virtual_layers(group, parts: Sequence[Part], layers, dtype: str, layer_attrs: dict) -> None:
    """`/codes/<layer>` in `group` as virtual datasets over the parts' row blocks, in order; each
    with its layer attributes and `part_sha256` ([[first row, rows, sha256, part], ...])."""
    import h5py

    n = sum(p.rows for p in parts)
    for j, spec in enumerate(layers):
        layout = h5py.VirtualLayout(shape=(n, spec.dim), dtype=dtype)
        blocks, at = [], 0
        for p in parts:
            if p.rows:
                layout[at : at + p.rows] = h5py.VirtualSource(
                    p.name, f"codes/{spec.name}", shape=(p.rows, spec.dim)
                )
            blocks.append([at, p.rows, p.sha256[j], p.name])
            at += p.rows
        ds = group.create_virtual_dataset(spec.name, layout, fillvalue=np.nan)
        for k, v in layer_attrs.get(spec.name, {}).items():
            ds.attrs[k] = v
        ds.attrs["part_sha256"] = json.dumps(blocks)


def part_problem(ds, entry: str) -> str | None:
    """Why the virtual dataset `ds` of the entry file `entry` cannot be read whole: a part file that
    is missing, unreadable, or holds another shape (HDF5 itself would read fill values)."""
    import h5py

    folder = os.path.dirname(os.path.abspath(entry))
    seen = set()
    for m in ds.virtual_sources():
        if m.file_name in seen:
            continue
        seen.add(m.file_name)
        path = os.path.join(folder, m.file_name)
        if not os.path.isfile(path):
            return (
                f"its part file {m.file_name} is missing (an entry assembled from ranks keeps its codes in "
                f"{os.path.basename(entry)}.parts/: copy or move that folder with it)"
            )
        try:
            with h5py.File(path, "r") as f:
                shape = f[m.dset_name].shape
        except (OSError, KeyError, ValueError) as e:
            return f"its part file {m.file_name} is not readable ({first_line(e, 120)})"
        lo, hi = m.vspace.get_select_bounds()  # the block it fills (each part maps whole)
        want = tuple(b - a + 1 for a, b in zip(lo, hi))
        if tuple(shape) != want:
            return f"its part file {m.file_name} holds {m.dset_name} of shape {tuple(shape)}, expected {tuple(want)}"
    return None


def parts_stat(entry: str) -> list | None:
    """Size, mtime, ctime and inode of each file in the entry's parts folder (None: it has none):
    part of the fingerprint a remembered check is tied to."""
    root = parts_path(entry)
    if not os.path.isdir(root):
        return None
    out = []
    for name in sorted(os.listdir(root)):
        try:
            st = os.stat(os.path.join(root, name))
        except OSError:
            continue
        out.append([name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return out
