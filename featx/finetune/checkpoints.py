"""Per-epoch checkpoints in NAME.ckpt/: written atomically and sealed, resumed only when whole and right.

A checkpoint `epoch-NNNN.safetensors` holds the network (`model.*`), the optimizer's tensors
(`opt.PID.NAME`) and, in its header, the run's state as JSON (fingerprint, epoch, history, best
epoch, optimizer scalars), sealed with a sha256 of all of it (`featx.models.sealed`). Before a
rerun resumes from one, it must pass every check: the digest, finite tensors, the state's schema
(types and ranges; the epoch matching the file name, the history and the best epoch), and the
tensors' names, shapes and dtypes against the network and optimizer being trained. A file that
fails is set aside as `*.corrupt` with a warning and the next older one is tried, else the run
starts over; so a resumed run ends as an uninterrupted one. Nothing is loaded into the network
before every check has passed.

`OutLock` keeps two runs from writing the same `--out` at once.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import math
import os
import re
from dataclasses import dataclass

from featx.errors import FeatxError
from featx.files import lock_file
from featx.models.sealed import CHECKPOINT_KEY, DamagedFile, read_sealed, seal

log = logging.getLogger("featx")

NAME = re.compile(r"epoch-(\d{4})\.safetensors")
OPT_PARAM_SHAPED = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def tensors_bytes(tensors: dict, header: dict) -> bytes:
    """A sealed safetensors file's bytes: the tensors, `header` as JSON and the digest of both."""
    return seal(tensors, header)


def write_file(path: str, data: bytes) -> None:
    from featx.files import fsync_dir, write_atomic

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write_atomic(path, write)
    fsync_dir(os.path.dirname(path))


def read_checkpoint_file(path: str, key: str = CHECKPOINT_KEY) -> tuple[dict, dict] | None:
    """(tensors, header[key]) of a whole, verified file, or None for a missing, torn, damaged or foreign one."""
    try:
        return read_sealed(path, key)
    except (DamagedFile, OSError):
        return None


def save_checkpoint(folder: str, epoch: int, module, optimizer, state: dict) -> str:
    """Write epoch `epoch`'s checkpoint atomically; a full disk is one line (the rerun resumes from the last one)."""
    tensors = {f"model.{k}": v for k, v in module.state_dict().items()}
    scalars = {}
    opt_state = optimizer.state_dict()["state"]
    for pid, st in opt_state.items():
        for k, v in st.items():
            if hasattr(v, "dtype"):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    path = os.path.join(folder, f"epoch-{epoch:04d}.safetensors")
    header = {
        **state,
        "epoch": epoch,
        "opt_scalars": scalars,
        "opt_params": sorted(int(p) for p in opt_state),
    }
    try:
        write_file(path, tensors_bytes(tensors, {CHECKPOINT_KEY: header}))
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        raise FeatxError(
            f"{path}: cannot write the checkpoint ({e.strerror or e}); "
            + ("free some space and rerun: " if full else "fix that and rerun: ")
            + "it resumes from the last checkpoint"
        ) from None
    return path


@dataclass
class Found:
    """A checkpoint that passed every check: its path, tensors and state, and the best epoch's weights."""

    path: str
    tensors: dict
    state: dict
    best_weights: dict


def load_checkpoint(found: Found, module, optimizer) -> dict:
    """Load a checked checkpoint into `module` and `optimizer`; returns the run's state (with `best_weights`)."""
    tensors = found.tensors
    module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt: dict = {pid: {} for pid in found.state["opt_params"]}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            opt[int(pid)][name] = v
    for k, v in found.state["opt_scalars"].items():
        pid, name = k.split(".", 1)
        opt[int(pid)][name] = v
    optimizer.load_state_dict({"state": opt, "param_groups": optimizer.state_dict()["param_groups"]})
    state = {k: v for k, v in found.state.items() if k not in ("opt_scalars", "opt_params")}
    state["best_weights"] = found.best_weights
    return state


def set_aside(path: str, reason: str, damaged: bool = True) -> None:
    """Rename a damaged (or another run's) checkpoint to PATH.corrupt, kept for inspection, with one warning."""
    try:
        os.replace(path, path + ".corrupt")
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(path)
    log.warning(
        "set aside the %scheckpoint %s as %s.corrupt (%s)",
        "damaged " if damaged else "",
        path,
        os.path.basename(path),
        reason,
    )


class _Foreign(Exception):
    pass


def latest_checkpoint(folder: str, fingerprint: str, module, optimizer, epochs: int) -> Found | None:
    """The newest checkpoint of this run (same fingerprint) that passes every check, with its best
    epoch's weights; damaged ones are set aside on the way; None: start over. `.tmp` files (writes
    that never finished) are never read."""
    numbered = []
    for path in glob.glob(os.path.join(folder, "epoch-*.safetensors")):
        m = NAME.fullmatch(os.path.basename(path))
        if m is None:
            set_aside(path, "its name is not epoch-NNNN.safetensors")
        else:
            numbered.append((int(m[1]), path))
    files = dict(numbered)
    for epoch, path in sorted(numbered, reverse=True):
        if not os.path.exists(path):  # set aside above, as another one's best epoch
            continue
        try:
            tensors, state = _checked(path, epoch, fingerprint, module, optimizer, epochs)
        except _Foreign:
            set_aside(path, "it belongs to another run: other settings or data", damaged=False)
            continue
        if tensors is None:
            continue
        best = state["best_epoch"]
        model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        if best == epoch:
            return Found(path, tensors, state, model)
        best_path = files.get(best)
        try:
            got = (
                _checked(best_path, best, fingerprint, module, optimizer, epochs)
                if best_path
                else (None, None)
            )
        except _Foreign:  # its best epoch's file is another run's: this one cannot finish as it would have
            set_aside(best_path, "it belongs to another run: other settings or data", damaged=False)
            got = (None, None)
        if got[0] is None:
            files.pop(best, None)
            log.warning("not resuming from %s: the checkpoint of its best epoch (%d) is gone", path, best + 1)
            continue
        return Found(path, tensors, state, {k[6:]: v for k, v in got[0].items() if k.startswith("model.")})
    return None


def _checked(path: str, epoch: int, fingerprint: str, module, optimizer, epochs: int):
    """(tensors, state) of a checkpoint that passes every check; (None, None) after setting a bad one aside."""
    try:
        tensors, state = read_sealed(path, CHECKPOINT_KEY)
    except OSError as e:
        log.warning("cannot read the checkpoint %s (%s)", path, e.strerror or e)
        return None, None
    except DamagedFile as e:
        set_aside(path, str(e).split(": ", 1)[-1])
        return None, None
    if not isinstance(state.get("fingerprint"), str):
        set_aside(path, "its fingerprint is not text")
        return None, None
    if state["fingerprint"] != fingerprint:
        raise _Foreign
    problem = state_problem(state, epoch, epochs) or tensors_problem(tensors, state, module, optimizer)
    if problem:
        set_aside(path, problem)
        return None, None
    return tensors, state


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def state_problem(state: dict, epoch: int, epochs: int) -> str | None:
    """What is wrong with a checkpoint's state (types, ranges, consistency with its file's epoch), or None."""
    got = state.get("epoch")
    if not isinstance(got, int) or isinstance(got, bool) or got != epoch:
        return f"its header says epoch {str(got)[:20]}, its name epoch {epoch}"
    if not epoch < epochs:
        return f"epoch {epoch + 1} is beyond this run's {epochs} epochs"
    history = state.get("history")
    if not isinstance(history, list) or len(history) != epoch + 1:
        return f"its history is not a list of {epoch + 1} epochs"
    for i, h in enumerate(history):
        if not isinstance(h, dict) or h.get("epoch") != i + 1:
            return f"history entry {i} is not epoch {i + 1}'s"
        if not all(_num(h.get(k)) for k in ("train_loss", "val_accuracy", "val_loss", "seconds")):
            return f"history entry {i} lacks a number"
        if not (0 <= h["val_accuracy"] <= 1 and math.isfinite(h["train_loss"]) and h["seconds"] >= 0):
            return f"history entry {i} holds a value out of range"
    best, scores = state.get("best_epoch"), state.get("best")
    if not isinstance(best, int) or isinstance(best, bool) or not 0 <= best <= epoch:
        return f"its best epoch {str(best)[:20]} is not one of epochs 0..{epoch}"
    if not isinstance(scores, list) or len(scores) != 2 or not all(_num(v) for v in scores):
        return "its best scores are not two numbers"
    if scores != [history[best]["val_accuracy"], -history[best]["val_loss"]]:
        return "its best scores are not its best epoch's"
    scalars, params = state.get("opt_scalars"), state.get("opt_params")
    if not isinstance(scalars, dict) or not all(
        _num(v) and re.fullmatch(r"\d+\.\w+", k) for k, v in scalars.items()
    ):
        return "its optimizer scalars are not numbers by PID.NAME"
    if not isinstance(params, list) or not all(
        isinstance(p, int) and not isinstance(p, bool) for p in params
    ):
        return "its optimizer parameter list is not a list of numbers"
    return None


def tensors_problem(tensors: dict, state: dict, module, optimizer) -> str | None:
    """What is wrong with a checkpoint's tensors for this network and optimizer, or None: every
    network tensor present with its shape and dtype, optimizer tensors for exactly the recorded parameters."""
    own = module.state_dict()
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    if set(model) != set(own):
        gone, extra = sorted(set(own) - set(model)), sorted(set(model) - set(own))
        return f"network tensors {'missing: ' + gone[0] if gone else 'not of this network: ' + extra[0]}"
    for k, v in own.items():
        if model[k].dtype != v.dtype or model[k].shape != v.shape:
            return f"tensor {k} is {model[k].dtype} {tuple(model[k].shape)}, not {v.dtype} {tuple(v.shape)}"
    params = [p for g in optimizer.param_groups for p in g["params"]]
    recorded = set(state["opt_params"])
    if not recorded <= set(range(len(params))):
        return "its optimizer state names parameters this optimizer does not have"
    seen = set()
    for k, v in tensors.items():
        if k.startswith("model."):
            continue
        m = re.fullmatch(r"opt\.(\d+)\.(\w+)", k)
        if m is None or int(m[1]) not in recorded:
            return f"tensor {k} is not part of its recorded state"
        pid, name = int(m[1]), m[2]
        seen.add(pid)
        p = params[pid]
        if name in OPT_PARAM_SHAPED and (v.shape != p.shape or v.dtype != p.dtype):
            return f"optimizer tensor {k} is {v.dtype} {tuple(v.shape)}, not {p.dtype} {tuple(p.shape)}"
    seen |= {int(k.split(".", 1)[0]) for k in state["opt_scalars"]}
    if seen != recorded:
        return f"optimizer state missing for {len(recorded - seen)} of {len(recorded)} parameters"
    if not recorded and state["history"]:
        return "its optimizer state is empty after an epoch of training"
    return None


def prune_checkpoints(folder: str, keep: set[int]) -> None:
    for path in glob.glob(os.path.join(folder, "epoch-*.safetensors")):
        m = NAME.fullmatch(os.path.basename(path))
        if m is not None and int(m[1]) not in keep:
            os.remove(path)


class OutLock:
    """An exclusive lock on a fine-tune's `--out` (OUT.safetensors.lock, removed on exit): a second run
    on the same --out refuses at once with one line instead of training into the same checkpoints."""

    def __init__(self, target: str):
        self.path = target + ".lock"
        self._fd: int | None = None

    def __enter__(self) -> OutLock:
        from featx.errors import UsageError

        folder = os.path.dirname(self.path) or "."
        parent = folder
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if parent and not os.path.isdir(parent):
            raise UsageError(f"--out {self.path[:-5]}: {parent} is a file; give a path in a folder")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise UsageError(
                f"--out {self.path[:-5]}: cannot make its folder {folder} ({e.strerror or e}); "
                f"give a path in a folder you can write"
            ) from None
        self._fd = lock_file(
            self.path,
            f"--out {self.path[:-5]}: cannot create its lock ({{reason}})",
            f"--out {self.path[:-5]}: another featx finetune ({{holder}}) is writing it; wait for it or stop it, "
            f"or give another --out",
        )
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path)
            os.close(self._fd)  # closing releases the flock
            self._fd = None
