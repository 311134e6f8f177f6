"""The `--data` spec: which reader opens it (folder, CSV manifest, image list, idx, digits,
torchvision:NAME, wds:PATTERN), then the cut.
"""

from __future__ import annotations

from pathlib import Path

from featx.errors import UsageError
from featx.settings import DataOptions
from featx.sources.builtin import digits_source, idx_files, idx_source, torchvision_source
from featx.sources.cutting import cut, groups_from_paths
from featx.sources.dataset import Dataset
from featx.sources.decode import (
    check_limits,
)
from featx.sources.folders import folder_source
from featx.sources.manifests import LIST_SUFFIXES, list_source, manifest_source
from featx.sources.webdataset import WDS_PREFIX, webdataset_source


def open_source(spec: str, options: DataOptions | None = None) -> Dataset:
    """List the samples of `spec` (see the module docstring) and cut them per `options`."""
    opts = options or DataOptions()
    check_limits()
    if not isinstance(opts.seed, int) or opts.seed < 0:
        raise UsageError(f"--seed {opts.seed}: must be a non-negative integer")
    spec = (spec or "").strip()
    if not spec:
        raise UsageError(
            "--data is empty; give an image folder, a CSV manifest, sklearn:digits or torchvision:NAME"
        )
    if spec == "sklearn:digits":
        raw = digits_source()
    elif spec.startswith("sklearn:"):
        raise UsageError(f"--data {spec}: the bundled scikit-learn source is sklearn:digits")
    elif spec.startswith(WDS_PREFIX):
        raw = webdataset_source(spec[len(WDS_PREFIX) :])
    elif spec.startswith("torchvision:"):
        raw = torchvision_source(spec[len("torchvision:") :], opts.data_root)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise UsageError(f"--data {spec}: no such file or folder")
        if path.is_file():
            if path.suffix.lower() in LIST_SUFFIXES:
                raw = list_source(path.resolve())
            elif path.suffix.lower() != ".csv":
                raise UsageError(
                    f"--data {spec}: a file must be a CSV manifest (path,label[,split]) ending in .csv, "
                    f"or a list of image paths ending in .txt"
                )
            else:
                raw = manifest_source(path.resolve())
        elif idx_files(path):
            raw = idx_source(path.resolve())
        else:
            raw = folder_source(path.resolve())
    if opts.group_by:
        raw.groups = groups_from_paths(raw.ids, opts.group_by)
    return cut(raw, opts)
