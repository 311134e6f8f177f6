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
                return "classifier" if CLASSIFIER_KEY in meta else "finetuned" if FINETUNED_KEY in meta else "safetensors"
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


def load_done(out_dir: str, name: str = CELLS_FILE) -> dict[str, dict]:
    """Finished cells (or scores) by key; a torn last line (a killed run) is ignored."""
    done = {}
    path = os.path.join(out_dir, name)
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    done[rec["key"]] = rec["result"]
                except (ValueError, KeyError, TypeError):
                    continue
    except OSError:
        pass
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
