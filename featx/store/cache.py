"""The cache directory: entry names and keys, the request memo that makes repeat commands fast,
locks between processes, and listing/removing entries.

An entry is `<dataset>--<model>--<key16>.h5`, where the key is a sha256 of everything that
changes the codes: model, weights identity (a local file's content hash), resolved layers and
their activation, pooling, preprocessing (input size included), dtype, precision and the dataset
fingerprint. Device, batch size and worker count are not in the key: they change codes only
within float tolerance.

The request memo maps a hash of the command as typed (plus library versions and the dataset
fingerprint) to an entry, so that a repeated command finds its file without importing torch or
building the model. It is only a shortcut: a memo that points to a missing or incomplete file is
ignored.

Locks are `fcntl.flock` on `<entry>.lock`: the kernel releases them when a process dies, even
by kill -9, so a stale lock never blocks anyone.

`CacheEntry` is the protocol `extract` follows: find (memo, then the file), lock, verify, set a
damaged file aside as `<entry>.corrupt` (one warning naming it) so it is rebuilt, remember.
A cache hit is always a verified entry.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass

from featx.errors import FeatxError, UsageError, first_line
from featx.files import write_json_atomic
from featx.store.journal import journal_path, journal_problem, journal_progress, read_progress, set_aside
from featx.store.parts import parts_path
from featx.store.verify import forget_verified, verify

log = logging.getLogger("featx")

ENV_CACHE_DIR = "FEATX_CACHE_DIR"


def default_cache_dir() -> str:
    """`$FEATX_CACHE_DIR`, else `./cache` (the repository's top-level cache/ when run from its root)."""
    return os.environ.get(ENV_CACHE_DIR) or os.path.join(os.getcwd(), "cache")


def ensure_writable(cache_dir: str) -> str:
    if not isinstance(cache_dir, str) or "\0" in cache_dir or not cache_dir.strip():
        raise UsageError(f"--cache-dir {cache_dir!r}: not a usable path")
    cache_dir = os.path.abspath(cache_dir)
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise FeatxError(
            f"cannot create cache directory {cache_dir} ({e.strerror}); pass --cache-dir or set {ENV_CACHE_DIR}"
        ) from None
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        raise FeatxError(
            f"cache directory {cache_dir} is not writable; pass --cache-dir DIR or set {ENV_CACHE_DIR}"
        )
    return cache_dir


def digest(fields: dict) -> str:
    return hashlib.sha256(
        json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str).encode()
    ).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def entry_path(cache_dir: str, dataset_name: str, model_name: str, key: str) -> str:
    return os.path.join(cache_dir, f"{_slug(dataset_name)}--{_slug(model_name)}--{key[:16]}.h5")


# -- request memo --------------------------------------------------------------------------------


def _memo_file(cache_dir: str, request_key: str) -> str:
    return os.path.join(cache_dir, ".requests", f"{request_key}.json")


def memo_lookup(cache_dir: str, request_key: str) -> str | None:
    """The complete entry a previous identical request produced, or None. The memo names the entry
    and its cache key; an entry whose file holds another key (a garbled memo) is ignored."""
    import h5py

    try:
        with open(_memo_file(cache_dir, request_key), encoding="utf-8") as f:
            memo = json.load(f)
        name, key = memo["entry"], memo["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (
        not isinstance(name, str)
        or not isinstance(key, str)
        or os.sep in name
        or name.startswith(".")
        or "\0" in name
    ):
        return None
    path = os.path.join(cache_dir, name)
    if not os.path.isfile(path) or verify(path) is not None:
        return None
    try:
        with h5py.File(path, "r") as f:
            found = f.attrs.get("cache_key")
    except OSError:
        return None
    return path if (found.decode() if isinstance(found, bytes) else found) == key else None


def memo_store(cache_dir: str, request_key: str, entry: str, key: str) -> None:
    path = _memo_file(cache_dir, request_key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json_atomic(path, {"entry": os.path.basename(entry), "key": key})
    except OSError:
        pass  # the memo is only a shortcut


# -- locks ---------------------------------------------------------------------------------------


class EntryLock:
    """An exclusive lock on one entry. `wait=False` raises at once if another process holds it;
    otherwise waits (up to `timeout` seconds, None = forever), saying whom it waits for."""

    def __init__(self, entry: str, wait: bool = True, timeout: float | None = None):
        self.path = entry + ".lock"
        self.wait, self.timeout = wait, timeout
        self._fd: int | None = None

    def __enter__(self) -> EntryLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise FeatxError(
                f"cannot create lock {self.path} ({e.strerror}); is the cache directory writable?"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _holder(self.path)
            if not self.wait:
                os.close(fd)
                raise FeatxError(
                    f"another featx process ({holder}) is writing {self.path[:-5]}; wait for it or stop it, then rerun"
                ) from None
            log.warning(
                "waiting for another featx process (%s) that is writing %s",
                holder,
                os.path.basename(self.path[:-5]),
            )
            self._wait(fd, holder)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._fd = fd
        return self

    def _wait(self, fd: int, holder: str) -> None:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError:
                if deadline is not None and time.monotonic() > deadline:
                    os.close(fd)
                    raise FeatxError(
                        f"gave up after {self.timeout:g}s waiting for featx process ({holder}) writing {self.path[:-5]}"
                    ) from None
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _holder(lock_path: str) -> str:
    try:
        with open(lock_path, encoding="utf-8", errors="replace") as f:
            return f.read().strip() or "unknown pid"
    except OSError:
        return "unknown pid"


def is_locked(entry: str) -> bool:
    try:
        fd = os.open(entry + ".lock", os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def remove_stale_temporaries(entry: str) -> None:
    """Leftovers of an interrupted finalization (call while holding the entry's lock), and the
    journal of an entry that is complete (a run killed between the rename and the cleanup)."""
    import shutil

    parts = glob.escape(parts_path(entry))
    for tmp in glob.glob(glob.escape(entry) + ".tmp-*") + glob.glob(os.path.join(parts, "*.h5.tmp-*")):
        with contextlib.suppress(OSError):
            os.remove(tmp)
    if os.path.isdir(journal_path(entry)) and os.path.isfile(entry) and verify(entry) is None:
        shutil.rmtree(journal_path(entry), ignore_errors=True)


def tidy_complete(entry: str) -> None:
    """Remove a complete entry's leftover journal if no process holds its lock (cheap when there is none)."""
    if not os.path.isdir(journal_path(entry)):
        return
    try:
        with EntryLock(entry, wait=False):
            remove_stale_temporaries(entry)
    except (FeatxError, OSError):
        pass


# -- the entry protocol --------------------------------------------------------------------------


class CacheEntry:
    """One request's entry in `cache_dir`: find it, lock it, verify it, set a damaged one aside,
    remember it. `extract` uses it as

        entry = CacheEntry(cache_dir, request)
        if entry.remembered(): ...hit...             # the request memo, no model needed
        if entry.find(dataset, model, key): ...hit...
        with entry.locked(wait):
            if entry.ready(): ...hit...               # finished by another process, or set aside
            ...build entry.path...
        entry.remember()
    """

    def __init__(self, cache_dir: str, request: str):
        self.cache_dir, self.request = cache_dir, request
        self.path: str | None = None
        self.key: str | None = None

    def remembered(self) -> bool:
        """True when the request memo names a verified entry (then `path` is it)."""
        self.path = memo_lookup(self.cache_dir, self.request)
        return self.path is not None

    def find(self, dataset_name: str, model_name: str, key: str) -> bool:
        """Name the entry for cache key `key`; True when it is there and verified (no lock needed:
        complete files only ever appear by an atomic rename)."""
        self.path, self.key = entry_path(self.cache_dir, dataset_name, model_name, key), key
        if os.path.exists(self.path) and verify(self.path) is None:
            self.remember()
            return True
        return False

    @contextlib.contextmanager
    def locked(self, wait: bool = True):
        """Hold the entry's lock; clears leftovers of an interrupted finalization."""
        with EntryLock(self.path, wait=wait):
            remove_stale_temporaries(self.path)
            yield self

    def ready(self) -> bool:
        """Under the lock: True when the file is there and verified; a damaged one is set aside
        (renamed `<entry>.corrupt`, replacing an older one) with one warning, and False."""
        if not os.path.lexists(self.path):
            return False
        reason = verify(self.path)
        if reason is None:
            self.remember()
            return True
        try:
            aside = set_aside(self.path)
            # its part files go with it (the rebuild writes new ones)
            if os.path.isdir(parts_path(self.path)):
                set_aside(parts_path(self.path))
        except OSError as e:
            raise FeatxError(
                f"cache entry {self.path} is not usable ({reason}) and cannot be set aside "
                f"({e.strerror or e}); remove it and rerun"
            ) from None
        forget_verified(self.path)
        log.warning(
            "cache entry %s is not usable (%s); set it aside as %s and rebuilding it",
            self.path,
            reason,
            os.path.basename(aside),
        )
        return False

    def remember(self) -> None:
        """Point the request memo at the entry (a shortcut for the next identical request)."""
        memo_store(self.cache_dir, self.request, self.path, self.key)


# -- listing and removing ------------------------------------------------------------------------


@dataclass
class EntryStatus:
    path: str
    state: str  # 'complete' | 'partial' | 'corrupt' | 'set aside' (a damaged copy, `*.corrupt`)
    size: int
    detail: dict


def _size(path: str) -> int:
    """Bytes in a file or a folder's files (0 for what vanished meanwhile: another process may be at work)."""
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            return sum(_size(os.path.join(path, n)) for n in os.listdir(path))
        return os.lstat(path).st_size
    return 0


def _complete_status(path: str) -> EntryStatus:
    import h5py

    reason = verify(path)
    if reason is None:
        try:
            with h5py.File(path, "r") as f:
                a = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        except (OSError, ValueError, TypeError) as e:  # replaced or damaged since verify
            reason = f"it is not readable ({first_line(e, 160)})"
    size = _size(path) + _size(parts_path(path))  # an entry assembled from ranks: its part files too
    if reason:
        return EntryStatus(path, "corrupt", size, {"reason": reason})
    detail = {k: a.get(k) for k in ("model", "weights", "dataset", "rows", "created")}
    detail["layers"] = [str(x) for x in a.get("layers", [])]
    if os.path.isdir(parts_path(path)):
        detail["parts"] = len(glob.glob(os.path.join(glob.escape(parts_path(path)), "*.h5")))
    return EntryStatus(path, "complete", size, detail)


def _partial_status(path: str) -> EntryStatus:
    size = _size(journal_path(path))
    prog = read_progress(path)
    if prog is None:
        why = journal_problem(path) or "unreadable partial journal"
        return EntryStatus(path, "corrupt", size, {"reason": f"partial journal: {why}"})
    detail = {
        "samples_done": prog["samples_done"],
        "samples": prog["samples"],
        "rows": prog["rows_done"],
        "layers": prog["layers"],
    }
    return EntryStatus(path, "partial", size, detail)


def shards_path(entry: str) -> str:
    """Where a distributed (torchrun) extraction keeps its per-rank journals until finalize
    (featx.engine.distributed writes them; the cache lists and removes them)."""
    return entry + ".shards"


SHARD_NAME = re.compile(r"from-\d{12}")  # one shard's journal folder in shards_path(entry)


def shard_range(meta: dict | None) -> tuple[int, int] | None:
    """The [start, stop) sample range a shard journal's meta claims, or None when it is not a valid one."""
    rng = meta.get("shard") if meta else None
    ok = (
        isinstance(rng, list)
        and len(rng) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in rng)
    )
    return (rng[0], rng[1]) if ok and 0 <= rng[0] < rng[1] else None


def _shards_status(path: str) -> EntryStatus:
    """An entry that only a distributed run's shards hold so far: images done over all shards."""
    root = shards_path(path)
    done, samples, layers, n = 0, None, [], 0
    for name in sorted(os.listdir(root)):
        prog = journal_progress(os.path.join(root, name)) if SHARD_NAME.fullmatch(name) else None
        rng = shard_range(prog["meta"]) if prog else None
        if rng is None:
            continue
        n += 1
        done += max(0, min(prog["samples_done"], rng[1]) - rng[0])
        samples, layers = prog["samples"], prog["layers"]
    size = _size(root)
    if not n:
        return EntryStatus(path, "corrupt", size, {"reason": "distributed shards: none readable"})
    return EntryStatus(
        path,
        "partial",
        size,
        {"samples_done": done, "samples": samples, "rows": None, "layers": layers, "shards": n},
    )


def list_entries(cache_dir: str) -> list[EntryStatus]:
    """Every entry in `cache_dir`: complete files, partial journals (an entry's `.partial`, or a
    distributed run's `.shards`), damaged files, set-aside copies."""
    cache_dir = os.path.abspath(cache_dir)
    if not os.path.isdir(cache_dir):
        return []
    out = []
    here = glob.escape(cache_dir)
    names = set(glob.glob(os.path.join(here, "*.h5")))
    names |= {p[: -len(".partial")] for p in glob.glob(os.path.join(here, "*.h5.partial"))}
    names |= {p[: -len(".shards")] for p in glob.glob(os.path.join(here, "*.h5.shards")) if os.path.isdir(p)}
    names |= {p[: -len(".parts")] for p in glob.glob(os.path.join(here, "*.h5.parts")) if os.path.isdir(p)}
    for path in sorted(names):
        if os.path.exists(path):
            out.append(_complete_status(path))
        elif not os.path.isdir(journal_path(path)) and not os.path.isdir(shards_path(path)):
            why = "part files without their entry file and shards; remove them with featx cache rm"
            out.append(EntryStatus(path, "corrupt", _size(parts_path(path)), {"reason": why}))
        elif os.path.isdir(journal_path(path)) or not os.path.isdir(shards_path(path)):
            out.append(_partial_status(path))
        else:
            out.append(_shards_status(path))
    for path in sorted(
        glob.glob(os.path.join(here, "*.h5.corrupt"))
        + glob.glob(os.path.join(here, "*.h5.partial.corrupt"))
        + glob.glob(os.path.join(here, "*.h5.parts.corrupt"))
    ):
        out.append(
            EntryStatus(
                path,
                "set aside",
                _size(path),
                {"reason": "a damaged copy featx set aside; remove it with featx cache rm"},
            )
        )
    return out


def _choose(entries: list[EntryStatus], targets: list[str]) -> list[EntryStatus]:
    if not targets:
        raise UsageError("featx cache rm: name entries (file name, path or key prefix) or pass --all")
    chosen = []
    for t in targets:
        name = os.path.basename(t.rstrip("/"))
        base = name if name.endswith(".corrupt") else name.removesuffix(".partial")
        if not base or base in (".", ".."):
            raise UsageError(
                f"featx cache rm {t!r}: name an entry by file name, path or key prefix (4+ characters)"
            )
        key_prefix = len(base) >= 4 and re.fullmatch(r"[0-9a-f]+", base) is not None
        hits = [
            e
            for e in entries
            if os.path.basename(e.path) == base
            or (
                key_prefix
                and e.state != "set aside"
                and os.path.basename(e.path).split("--")[-1].startswith(base)
            )
        ]
        if len(hits) != 1:
            known = ", ".join(os.path.basename(e.path) for e in entries) or "none"
            what = "matches no entry" if not hits else f"matches {len(hits)} entries"
            raise UsageError(f"featx cache rm {t}: {what}; entries: {known}")
        chosen.extend(hits)
    return chosen


def _remove_tree_or_file(path: str) -> None:
    import shutil

    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def remove_entries(
    cache_dir: str, targets: list[str], remove_all: bool = False
) -> tuple[list[str], list[str]]:
    """Remove entries named by path, file name or key prefix (or all): (removed, busy). An entry
    another process holds the lock of is kept and listed in `busy`; the others are removed."""
    entries = list_entries(cache_dir)
    chosen = entries if remove_all else _choose(entries, targets)
    removed, busy = [], []
    for e in chosen:
        if e.state == "set aside":
            _remove_tree_or_file(e.path)
            removed.append(e.path)
            continue
        if is_locked(e.path):
            busy.append(e.path)
            continue
        for p in (e.path, e.path + ".lock"):
            _remove_tree_or_file(p)
        _remove_tree_or_file(journal_path(e.path))
        _remove_tree_or_file(shards_path(e.path))
        _remove_tree_or_file(parts_path(e.path))
        forget_verified(e.path)
        remove_stale_temporaries(e.path)
        removed.append(e.path)
    return removed, busy


def verify_entries(cache_dir: str, targets: list[str]) -> list[tuple[str, str | None]]:
    """Every complete entry named (all when `targets` is empty) checked in full: structure, rows,
    part files and every codes checksum, whatever check is remembered; (path, problem or None)."""
    entries = [e for e in list_entries(cache_dir) if e.state in ("complete", "corrupt")]
    chosen = _choose(entries, targets) if targets else entries
    out = []
    for e in chosen:
        if not os.path.isfile(e.path):
            out.append((e.path, e.detail.get("reason", "its entry file is missing")))
            continue
        reason = verify(e.path, full=True)
        if reason is not None:
            forget_verified(e.path)
        out.append((e.path, reason))
    return out
