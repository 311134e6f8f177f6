"""The benchmark scripts still run against the current code (a tiny run; no timing is checked)."""

import os
import re
import subprocess
import sys

import pytest

from conftest import make_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extract_speed_runs_and_checks_the_bytes(tmp_path):
    data = make_images(tmp_path / "data", per_class=6, size=(40, 40))
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "extract_speed.py"),
            "--data",
            str(data),
            "--limit",
            "12",
            "--methods",
            "limit,featx,hand-loop",
            "--batch-size",
            "4",
            "--image-size",
            "32",
            "--rounds",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for method in ("limit", "featx", "hand-loop"):
        assert re.search(rf"^{method} +\d+\.\d+ +\d\.\d\d", r.stdout, re.M), (method, r.stdout)
    assert "codes written 2048 B/image (dims 512 x 4 B = 2048 B; OK)" in r.stdout
    assert "limit ratio: featx end to end / bare forward" in r.stdout


@pytest.mark.slow  # four torchrun launches: ~1 min on 2 shared cores
def test_distributed_scaling_prints_a_table_of_world_sizes(tmp_path):
    data = make_images(tmp_path / "data", per_class=3, size=(40, 40))
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "distributed_scaling.py"),
            "--data",
            str(data),
            "--limit",
            "8",
            "--nproc",
            "1,2",
            "--image-size",
            "32",
            "--batch-size",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "8 images" in r.stdout
    assert re.search(r"^ +1 +\d+ +\d+\.\d +\d+\.\d +1\.00$", r.stdout, re.M), r.stdout
    assert re.search(r"^ +2 +\d+ +\d+\.\d +\d+\.\d +\d\.\d\d$", r.stdout, re.M), r.stdout


def test_selection_regret_compares_the_rules_on_the_cells_fit_fits(tmp_path):
    """regrets() on a tiny codes file: the old rule holds out, the new one cross-validates, the oracle
    refits match fit_cell's own accuracies (asserted inside), and regrets are non-negative."""
    import numpy as np

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from selection_regret import regrets

    from conftest import blobs, write_codes

    X, y = blobs(20, 3, 8, sep=2.0, seed=1)
    noisy = X + np.random.default_rng(0).normal(size=X.shape)
    split = np.where(np.arange(len(y)) % 4 == 0, "test", "train").astype(object)
    path = write_codes(
        tmp_path / "r.h5", {"a": noisy, "b": X}, y, split, ["x", "y", "z"], depths={"a": 0.5, "b": 1.0}
    )
    out = regrets(path, ["a", "b"], "5/class", 0, (0.01, 0.1, 1.0), "softmax", {})
    assert out["old"]["source"].startswith("hold-out") and out["new"]["source"] == "5-fold cv"
    for rule in ("old", "new"):
        assert all(out[rule][k] >= 0 for k in ("layer", "C", "total", "floor"))
        assert out[rule]["total"] >= out[rule]["layer"] - 1e-12
