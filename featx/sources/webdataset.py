"""WebDataset shards (`--data wds:PATTERN`): samples read from local tar files without unpacking.

Rules:
- PATTERN is a local path with brace expansion (`shard-{000000..000009}.tar`, `{train,extra}.tar`)
  and shell wildcards (`shards/*.tar`, sorted); shards in the order the pattern lists them.
- A sample is the tar members sharing a key: the member's path up to the first dot of its file
  name (WebDataset's rule), so `a/b/0001.jpg` and `a/b/0001.cls` are sample `a/b/0001`. The key is
  the row's id (`/paths`). Samples in shard order, then member order: deterministic.
- The image is `KEY.jpg`, `.jpeg`, `.png`, `.webp` or `.ppm` (the first present in that order); a
  sample without one is dropped, said once with the count and the first key. The optional label
  is `KEY.cls` (an integer) or `KEY.txt` (a class name); `.cls` wins when both are there. With a
  `classes.txt` beside the first shard (one name a line), `.cls` indexes it and a `.txt` label must
  be one of its names; without it the classes are the `.cls` values present (numeric order) or the
  `.txt` names present (sorted). No label anywhere: unlabelled data.
- Random access without unpacking: listing reads each shard's tar headers once (`tarfile`, which
  seeks over the data of an uncompressed tar) and keeps every image member's offset and size; the
  loader seeks and reads just those bytes (one open file per shard and worker). So any sample index
  loads in O(1), and the journal's resume works as for folders. The `webdataset` package was not
  used: it streams samples in order (an IterableDataset), which gives neither the random access the
  resume needs nor featx's decode limits, and it would be a dependency for what `tarfile` does.
- One-line errors: a pattern that matches nothing or names a missing shard, a file that is not an
  uncompressed tar, a truncated shard (a member past the end, or no end-of-archive marker), a key
  in two shards or twice in one, a label that is not an integer or not a known class, labels on only
  some samples. Undecodable images are skipped and listed in `/skipped`, as for folders.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import tarfile
from dataclasses import dataclass

import numpy as np

from featx.errors import UsageError, first_line
from featx.sources.dataset import RawSource, unlabelled
from featx.sources.decode import ImageError, decode_bytes, printable

WDS_PREFIX = "wds:"
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "ppm")  # in order of preference within a sample
LABEL_SUFFIXES = ("cls", "txt")
LABEL_BYTES = 4096  # a label member larger than this is not a label
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """`a{1..3}b` -> a1b a2b a3b (zero-padded as written: {000..002}); `{x,y}` -> x y; in order."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    r = _RANGE.match(body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = (
            max(len(r.group(1)), len(r.group(2)))
            if r.group(1).startswith("0") or r.group(2).startswith("0")
            else 0
        )
        step = 1 if hi >= lo else -1
        parts = [str(v).zfill(width) for v in range(lo, hi + step, step)]
    elif "," in body:
        parts = body.split(",")
    else:
        parts = ["{" + body + "}"]  # not an expansion: kept as written
        return [head + parts[0] + t for t in expand_braces(tail)]
    return [x for p in parts for x in expand_braces(head + p + tail)]


def shard_paths(pattern: str) -> list[str]:
    """The shard files of PATTERN (absolute), in pattern order; wildcards sorted."""
    where = f"--data {WDS_PREFIX}{pattern}"
    out: dict[str, None] = {}
    missing = []
    for p in expand_braces(os.path.expanduser(pattern)):
        if glob.has_magic(p):
            for hit in sorted(glob.glob(p)):
                if os.path.isfile(hit):
                    out.setdefault(os.path.abspath(hit), None)
        elif os.path.isfile(p):
            out.setdefault(os.path.abspath(p), None)
        else:
            missing.append(p)
    if not out:
        raise UsageError(
            f"{where}: the pattern matches no shard file; give local tar files, e.g. "
            f"wds:data/shard-{{000000..000009}}.tar"
        )
    if missing:
        raise UsageError(
            f"{where}: {len(missing)} shard(s) the pattern names do not exist (first: {missing[0]}); "
            f"fix the range or the path"
        )
    return list(out)


@dataclass
class _Sample:
    key: str
    shard: int
    members: dict[str, tuple[int, int]]  # suffix -> (offset, size)


def _split_name(name: str) -> tuple[str, str]:
    """(key, suffix): `a/b/0001.seg.png` -> ('a/b/0001', 'seg.png')."""
    folder, base = os.path.split(name)
    stem, _, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix.lower()


def index_shard(path: str, shard: int) -> list[_Sample]:
    """The samples of one uncompressed tar, with each member's data offset and size; a damaged
    shard is a one-line UsageError."""
    size = os.path.getsize(path)
    samples: dict[str, _Sample] = {}
    try:
        with open(path, "rb") as fh:
            tar = tarfile.open(fileobj=fh, mode="r:")
            for info in tar:
                if not info.isfile():
                    continue
                if info.offset_data + info.size > size:
                    raise UsageError(
                        f"{path}: truncated: member {printable(info.name)} ends at byte "
                        f"{info.offset_data + info.size} of a {size}-byte file; re-create or remove the shard"
                    )
                key, suffix = _split_name(info.name)
                if not suffix or os.path.basename(key).startswith("."):
                    continue
                s = samples.setdefault(key, _Sample(key, shard, {}))
                if suffix in s.members:
                    raise UsageError(
                        f"{path}: sample {printable(key)} has two {suffix} members; keys must be unique"
                    )
                s.members[suffix] = (info.offset_data, info.size)
            fh.seek(tar.offset)
            end = fh.read(512)
    except tarfile.TarError as e:
        raise UsageError(
            f"{path}: not an uncompressed tar archive ({first_line(e, 80)}); WebDataset shards are "
            f"plain .tar files (decompress .tar.gz first)"
        ) from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read the shard ({e.strerror or e})") from None
    if len(end) < 512 or end.strip(b"\0"):
        raise UsageError(
            f"{path}: truncated: no end-of-archive marker after byte {tar.offset} of {size}; "
            f"re-create or remove the shard"
        )
    return list(samples.values())


class ShardLoader:
    """Sample i's image: seek to its member in its shard and decode those bytes. Picklable (data
    loader workers open their own file handles)."""

    def __init__(self, shards: list[str], where: np.ndarray, ids: list[str]):
        self.shards, self.where, self.ids = shards, where, ids  # where: int64 [N, 3] shard, offset, size
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def __getstate__(self):
        return {"shards": self.shards, "where": self.where, "ids": self.ids}

    def __setstate__(self, state):
        self.__init__(state["shards"], state["where"], state["ids"])

    def read(self, i: int) -> bytes:
        if self._pid != os.getpid():  # forked: handles are not shared across processes
            self._files, self._pid = {}, os.getpid()
        shard, offset, size = (int(x) for x in self.where[i])
        try:
            fh = self._files.get(shard)
            if fh is None:
                fh = self._files[shard] = open(self.shards[shard], "rb")
            fh.seek(offset)
            data = fh.read(size)
        except OSError as e:
            raise ImageError(
                self.ids[i], f"cannot read from {self.shards[shard]} ({e.strerror or e})"
            ) from None
        if len(data) != size:
            raise ImageError(
                self.ids[i], f"cannot read from {self.shards[shard]} (the shard is shorter than listed)"
            )
        return data

    def __call__(self, i: int):
        return decode_bytes(self.read(i), self.ids[i])


def _read_member(fh, offset: int, size: int) -> bytes:
    fh.seek(offset)
    return fh.read(min(size, LABEL_BYTES))


def _known_classes(folder: str) -> list[str] | None:
    path = os.path.join(folder, "classes.txt")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        names = [ln.strip() for ln in f if ln.strip()]
    if len(set(names)) != len(names):
        raise UsageError(f"{path}: a class name is listed twice; one name a line, each once")
    return names


def _labels(samples: list[_Sample], shards: list[str], where: str):
    """(classes, labels int64, labelled) from the samples' .cls / .txt members."""
    raw: list[tuple[str, str] | None] = []  # (kind, text) per sample
    handles: dict[int, object] = {}
    try:
        for s in samples:
            kind = next((k for k in LABEL_SUFFIXES if k in s.members), None)
            if kind is None:
                raw.append(None)
                continue
            fh = handles.get(s.shard) or handles.setdefault(s.shard, open(shards[s.shard], "rb"))
            data = _read_member(fh, *s.members[kind])
            try:
                raw.append((kind, data.decode("utf-8").strip()))
            except UnicodeDecodeError:
                raise UsageError(
                    f"{where}: sample {printable(s.key)}: its .{kind} label is not UTF-8 text"
                ) from None
    finally:
        for fh in handles.values():
            fh.close()
    have = [r is not None for r in raw]
    if not any(have):
        return *unlabelled(len(samples)), False
    if not all(have):
        k = have.index(False)
        raise UsageError(
            f"{where}: {have.count(False)} of {len(samples)} samples have no label (.cls or .txt; "
            f"first: {printable(samples[k].key)}); label every sample or none"
        )
    known = _known_classes(os.path.dirname(shards[0]))
    kinds = {kind for kind, _ in raw}
    if known is None and len(kinds) > 1:
        raise UsageError(
            f"{where}: some samples are labelled by .cls (an integer) and others by .txt (a name); "
            f"use one, or list the class names in classes.txt beside the shards"
        )
    values: list[int | str] = []
    for s, (kind, text) in zip(samples, raw):
        if kind == "cls":
            try:
                v = int(text)
            except ValueError:
                v = -1
            if v < 0 or (known is not None and v >= len(known)):
                top = f"0..{len(known) - 1} (classes.txt)" if known is not None else "a non-negative integer"
                raise UsageError(
                    f"{where}: sample {printable(s.key)}: label {text[:40]!r} in .cls is not {top}"
                )
            values.append(v if known is None else known[v])
        else:
            if not text or (known is not None and text not in known):
                raise UsageError(
                    f"{where}: sample {printable(s.key)}: label {text[:40]!r} in .txt is not a "
                    + (f"class of classes.txt ({', '.join(known[:5])}...)" if known else "class name")
                )
            values.append(text)
    if known is not None:
        classes = list(known)
        index = {c: i for i, c in enumerate(classes)}
        return classes, np.array([index[v] for v in values], dtype=np.int64), True
    present = sorted(set(values))  # ints numerically, names alphabetically
    index = {v: i for i, v in enumerate(present)}
    return [str(v) for v in present], np.array([index[v] for v in values], dtype=np.int64), True


def webdataset_source(pattern: str) -> RawSource:
    """The samples of the shards PATTERN names (see the module docstring)."""
    where = f"--data {WDS_PREFIX}{pattern}"
    shards = shard_paths(pattern)
    samples: list[_Sample] = []
    first_shard: dict[str, int] = {}
    for k, path in enumerate(shards):
        for s in index_shard(path, k):
            if s.key in first_shard:
                raise UsageError(
                    f"{where}: key {printable(s.key)} is in {shards[first_shard[s.key]]} and {path}; "
                    f"keys must be unique across shards"
                )
            first_shard[s.key] = k
            samples.append(s)
    notes = []
    without = [s for s in samples if not any(x in s.members for x in IMAGE_SUFFIXES)]
    if without:
        notes.append(
            f"{where}: {len(without)} sample(s) have no image member ({', '.join(IMAGE_SUFFIXES)}) and were "
            f"left out (first: {printable(without[0].key)})"
        )
        samples = [s for s in samples if any(x in s.members for x in IMAGE_SUFFIXES)]
    if not samples:
        raise UsageError(f"{where}: no sample has an image member ({', '.join(IMAGE_SUFFIXES)})")
    classes, labels, labelled = _labels(samples, shards, where)
    where_rows = np.empty((len(samples), 3), dtype=np.int64)
    for i, s in enumerate(samples):
        suffix = next(x for x in IMAGE_SUFFIXES if x in s.members)
        where_rows[i] = (s.shard, *s.members[suffix])
    ids = [printable(s.key) for s in samples]
    h = hashlib.sha256(b"webdataset\n")
    for path in shards:
        st = os.stat(path)
        h.update(f"{os.path.basename(path)}\0{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(("\0".join(classes) + "\n").encode())
    h.update(labels.tobytes())
    if not labelled:
        notes.append(
            f"{where}: no sample has a label: read as unlabelled data (extract, export and predict "
            f"work; fit, score and bench need labels)"
        )
    folder = os.path.dirname(shards[0])
    return RawSource(
        name=os.path.basename(folder) or "webdataset",
        spec=WDS_PREFIX + os.path.abspath(os.path.expanduser(pattern)),
        classes=classes,
        ids=ids,
        labels=labels,
        splits=None,
        loader=ShardLoader(shards, where_rows, ids),
        fingerprint=h.hexdigest(),
        split_source="seeded",
        notes=notes,
        labelled=labelled,
    )
