"""Small file helpers: atomic writes with fsync, file digests, and the crash-safe JSON-lines log
(one fsync'ed record per line; a torn last line is set aside, never believed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

from featx.errors import UsageError


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


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


# safetensors header keys of featx's own files (the classifier and fine-tuned model descriptions)
CLASSIFIER_KEY = "featx_classifier"
FINETUNED_KEY = "featx_finetuned"


def file_kind(path: str) -> str:
    """What a file is, from its first bytes: 'hdf5', 'classifier' / 'finetuned' (featx safetensors
    files), 'safetensors', 'pytorch' (a zip or pickle checkpoint), 'joblib-json' (a classifier's
    side file) or 'other'. For one-line advice when a file of the wrong kind is given."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if head == b"\x89HDF\r\n\x1a\n":
                return "hdf5"
            if head.startswith((b"PK\x03\x04", b"\x80")):
                return "pytorch"
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if 2 <= n <= 100_000_000:
                header = json.loads(f.read(n))
                meta = header.get("__metadata__") or {}
                return (
                    "classifier"
                    if CLASSIFIER_KEY in meta
                    else "finetuned"
                    if FINETUNED_KEY in meta
                    else "safetensors"
                )
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return "other"
    return "other"


def what_it_is(path: str) -> str:
    """A phrase for a file given where another kind was expected, with the command that takes it."""
    return {
        "hdf5": "an HDF5 file",
        "classifier": "a featx classifier (from featx fit --out; `featx predict` uses it)",
        "finetuned": "a fine-tuned model (from featx finetune; `featx predict` uses it, `featx extract --weights` taps it)",
        "safetensors": "a safetensors file",
        "pytorch": "a PyTorch checkpoint",
    }.get(file_kind(path), "not a file featx wrote")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


CELLS_FILE = "cells.jsonl"


def record_checksum(key, result) -> str:
    """The checksum a cells.jsonl/scores.jsonl line carries: sha256 of its key and result as canonical JSON."""
    return hashlib.sha256(json.dumps([key, result], sort_keys=True).encode()).hexdigest()[:32]


def load_done(out_dir: str, name: str = CELLS_FILE) -> dict[str, dict]:
    """Finished cells (or scores) by key. A torn last line (a killed run) is ignored. Every line featx
    writes carries a checksum of its key and result (`sum`); a line whose checksum does not match, or
    one without a checksum in a file that has checksummed lines (featx releases before checksums wrote
    none, and such a file loads whole), is ignored with a warning, and its cell is fitted again. A key
    recorded twice with different results keeps its first record, with a warning."""
    import logging

    rows, lines = [], []
    path = os.path.join(out_dir, name)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError:
        pass
    for line in lines:
        try:
            rec = json.loads(line)
            rows.append((rec["key"], rec["result"], rec.get("sum")))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    checked = any(s is not None for _, _, s in rows)
    done: dict[str, dict] = {}
    bad = twice = 0
    for key, result, got in rows:
        if not isinstance(key, str) or (checked and got != record_checksum(key, result)):
            bad += 1
            continue
        if key in done:
            twice += done[key] != result
            continue
        done[key] = result
    log = logging.getLogger("featx")
    if bad:
        log.warning(
            "%s: %d lines fail their checksum (edited or damaged) and are ignored; their cells are computed "
            "again",
            path,
            bad,
        )
    if twice:
        log.warning(
            "%s: %d cells are recorded twice with different results; the first record of each is kept",
            path,
            twice,
        )
    return done


def open_log(out_dir: str, name: str = CELLS_FILE):
    """`out_dir/name` (cells.jsonl, scores.jsonl) opened for appending records with `append_record`; a
    torn last line from a killed run is ended first, so it cannot swallow the next record."""
    path = os.path.join(out_dir, name)
    fh = open(path, "a", encoding="utf-8")
    if fh.tell() > 0 and not _ends_with_newline(path):
        fh.write("\n")
    return fh


def append_record(fh, rec: dict) -> None:
    """Append {key, result} with its checksum (`sum`), flushed and fsync'ed."""
    rec = {**rec, "sum": record_checksum(rec["key"], rec["result"])}
    fh.write(json.dumps(rec) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def make_out_dir(path: str) -> None:
    """--out is a folder: a file there, or one that cannot be made, is one line (not FileExistsError)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {path}: is a file; bench writes a folder of results, give a folder path")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {path}: cannot make the results folder ({e.strerror or e})") from None


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def lock_file(path: str, cannot_create: str, busy: str) -> int:
    """A descriptor holding an exclusive, non-blocking flock on `path` (created if missing; the kernel
    releases it even on kill -9), with this process's pid written in it. `cannot_create` (with
    {reason}) and `busy` (with {holder}, the holder's pid) word the one-line errors (placeholders
    replaced, not str.format: a path may hold braces). A lock file that
    its finishing holder removed between our open and our flock is opened again."""
    import fcntl

    from featx.errors import FeatxError

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise FeatxError(cannot_create.replace("{reason}", str(e.strerror or e))) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 100, 0).decode("utf-8", "replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            raise FeatxError(busy.replace("{holder}", holder or "another process")) from None
        try:  # the file we locked must still be the one at the path
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}".encode())
    return fd


class FolderLock:
    """An exclusive flock on FOLDER/.lock (released by the kernel even on kill -9): a second process
    on the same folder gets one line, `busy`, with the holder's pid, instead of writing beside the first."""

    def __init__(self, folder: str, busy: str):
        self.path, self.busy = os.path.join(folder, ".lock"), busy
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        self._fd = lock_file(
            self.path,
            f"{self.path}: cannot create the lock ({{reason}}); is the folder writable?",
            f"{self.busy} ({{holder}}); wait for it or stop it, or give another --out",
        )
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
