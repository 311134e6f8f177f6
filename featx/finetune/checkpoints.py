"""Per-epoch checkpoints in NAME.ckpt/: written atomically, read back whole or not at all.
"""

from __future__ import annotations

import glob
import json
import logging
import os

log = logging.getLogger("featx")


def tensors_bytes(tensors: dict, header: dict) -> bytes:
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return save(flat, metadata={k: json.dumps(v) for k, v in header.items()})


def write_file(path: str, data: bytes) -> None:
    from featx.files import fsync_dir, write_atomic

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write_atomic(path, write)
    fsync_dir(os.path.dirname(path))


def read_checkpoint_file(path: str, key: str) -> tuple[dict, dict] | None:
    """(tensors, header[key]) of a complete file, or None for a missing, torn or foreign one."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            head = json.loads((f.metadata() or {})[key])
            return {k: f.get_tensor(k) for k in f.keys()}, head  # noqa: SIM118 (not a dict)
    except Exception:  # noqa: BLE001 (a torn file raises whatever safetensors meets first)
        return None


def save_checkpoint(folder: str, epoch: int, module, optimizer, state: dict) -> str:
    tensors = {f"model.{k}": v for k, v in module.state_dict().items()}
    scalars = {}
    for pid, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            if hasattr(v, "dtype"):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    path = os.path.join(folder, f"epoch-{epoch:04d}.safetensors")
    write_file(path, tensors_bytes(tensors, {"featx_checkpoint": {**state, "epoch": epoch, "opt_scalars": scalars}}))
    return path


def load_checkpoint(path: str, module, optimizer) -> dict:
    tensors, state = read_checkpoint_file(path, "featx_checkpoint")
    module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            opt.setdefault(int(pid), {})[name] = v
    for k, v in state["opt_scalars"].items():
        pid, name = k.split(".", 1)
        opt.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": opt, "param_groups": optimizer.state_dict()["param_groups"]})
    return state


def latest_checkpoint(folder: str, fingerprint: str) -> tuple[str, dict] | None:
    """The newest complete checkpoint of this run (same fingerprint); torn files and `.tmp` files
    (a write that never finished) are never loaded."""
    for path in sorted(glob.glob(os.path.join(folder, "epoch-*.safetensors")), reverse=True):
        got = read_checkpoint_file(path, "featx_checkpoint")
        if got is None:
            log.warning("ignoring the incomplete checkpoint %s", path)
            continue
        if got[1].get("fingerprint") != fingerprint:
            log.warning("ignoring the checkpoints in %s: they belong to another run (other settings or data)", folder)
            return None
        return path, got[1]
    return None


def prune_checkpoints(folder: str, keep: set[int]) -> None:
    for path in glob.glob(os.path.join(folder, "epoch-*.safetensors")):
        if int(os.path.basename(path)[6:10]) not in keep:
            os.remove(path)
