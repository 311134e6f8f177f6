"""fit's memory guard: an in-memory fit whose codes cannot fit in what the machine (or `ulimit -v`)
leaves is refused in one line before any codes are read, naming the ways out."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_one_line_error, write_codes
from featx.classifiers import fit as fitmod
from featx.errors import FeatxError


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """3,000 rows x 2,000 dims: an in-memory fit needs about 0.11 GiB."""
    rng = np.random.default_rng(0)
    n = 3000
    labels = np.arange(n) % 3
    splits = np.where(np.arange(n) % 5 == 0, "test", "train")
    return write_codes(
        tmp_path_factory.mktemp("mem") / "wide.h5",
        {"fc": rng.standard_normal((n, 2000), np.float32)},
        labels,
        splits,
        ["a", "b", "c"],
    )


def _fit_under_rlimit_as(path, *args, room_mb=60):
    code = (
        "import resource, sys\n"
        "import torch, numpy, h5py, sklearn.linear_model, sklearn.pipeline, featx.classifiers.fit\n"
        "from featx.cli.main import main\n"
        "used = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:'))\n"
        f"resource.setrlimit(resource.RLIMIT_AS, (used + {room_mb} * 2**20, resource.RLIM_INFINITY))\n"
        f"sys.exit(main(['fit', {str(path)!r}, *{list(args)!r}]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": ":".join(sys.path),
        },
    )


def test_a_fit_beyond_rlimit_as_is_one_line_before_reading(wide):
    p = _fit_under_rlimit_as(wide, "--classifier", "softmax", "-q")
    assert_one_line_error(
        p.returncode,
        p.stderr,
        code=1,
        needles=(
            "3,000 rows x 2,000 dims",
            "address-space limit",
            "--classifier sgd",
            "--pca K",
            "--chunk-rows",
        ),
    )


def test_the_guard_compares_the_estimate_with_what_is_left(monkeypatch):
    monkeypatch.setattr(fitmod, "memory_limit", lambda: (10 << 20, "available memory"))
    fitmod.check_memory(100, 100, ["fc"])  # 0.2 MB: fine
    with pytest.raises(
        FeatxError, match=r"10,000 rows x 1,000 dims needs about 0\.2 GiB but available memory"
    ):
        fitmod.check_memory(10_000, 1_000, ["fc"])
    monkeypatch.setattr(fitmod, "memory_limit", lambda: (None, ""))
    fitmod.check_memory(10**9, 10**6, ["fc"])  # unknown: no guess


def test_the_limit_reads_the_machine():
    room, bound = fitmod.memory_limit()
    assert room is None or (room > 0 and bound)
