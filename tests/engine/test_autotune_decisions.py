"""The cache, store and reliability paths under both outcomes of `--precision auto`.

Which precision `auto` picks depends on the CPU (bf16 wins where the CPU has bf16 units), so these
tests force each decision with `FEATX_AUTOTUNE` and assert only what must hold for either: the
whole suite then behaves the same on any machine. torch runs bf16 on any x86 CPU, slowly where it
has no bf16 units, so the set is kept small.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import cli, make_images, run_cli, sigkill_when
from featx.classifiers.fit import fit
from featx.classifiers.protocol import protocol_for
from featx.engine.extract import extract
from featx.store.codes import open_codes
from featx.store.verify import verify

# FAST without the pinned precision: these tests are about what `auto` resolves to
AUTO = dict(weights="none", image_size=32, workers=0, batch_size=4)
OTHER = {"fp32": "bf16", "bf16": "fp32"}


@pytest.fixture(params=["fp32", "bf16"])
def decision(request, monkeypatch) -> str:
    monkeypatch.setenv("FEATX_AUTOTUNE", request.param)  # subprocesses inherit it
    return request.param


def test_auto_follows_the_decision_and_shares_the_explicit_entry(decision, image_folder, tmp_path):
    cache = str(tmp_path / "c")
    a = extract("resnet18", str(image_folder), "layer2,avgpool", cache_dir=cache, **AUTO)
    assert not a.hit and verify(a.path) is None
    with open_codes(a.path) as f:
        assert f.attrs["precision"] == decision
        assert all(np.isfinite(f.codes(n)).all() for n in f.layers)
    again = extract("resnet18", str(image_folder), "layer2,avgpool", cache_dir=cache, **AUTO)
    explicit = extract(
        "resnet18", str(image_folder), "layer2,avgpool", cache_dir=cache, precision=decision, **AUTO
    )
    assert again.hit and explicit.hit and again.path == explicit.path == a.path
    other = extract(
        "resnet18", str(image_folder), "layer2,avgpool", cache_dir=cache, precision=OTHER[decision], **AUTO
    )
    assert not other.hit and other.path != a.path
    with open_codes(a.path) as f, open_codes(other.path) as g:
        ca, cb = f.codes("avgpool"), g.codes("avgpool")
        assert f.paths == g.paths
    assert np.linalg.norm(ca - cb) / np.linalg.norm(ca) < 2e-2  # bf16's documented tolerance
    report = fit(a.path, None, protocol_for("softmax", Cs=(1.0,)))
    assert {r["layer"] for r in report.results} == {"layer2", "avgpool"}
    assert all(r["n_test"] > 0 and 0.0 <= r["accuracy"] <= 1.0 for r in report.results)


def test_a_forced_decision_is_its_own_request(image_folder, tmp_path, monkeypatch):
    """An `auto` request remembered under one decision is not answered with the other's entry."""
    cache = str(tmp_path / "c")
    paths = {}
    for d in ("fp32", "bf16", "fp32"):
        monkeypatch.setenv("FEATX_AUTOTUNE", d)
        r = extract("resnet18", str(image_folder), "layer3", cache_dir=cache, **AUTO)
        with open_codes(r.path) as f:
            assert f.attrs["precision"] == d
        paths.setdefault(d, r.path)
        assert r.path == paths[d]
    assert paths["fp32"] != paths["bf16"]


def test_a_bad_forced_decision_is_one_line(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_AUTOTUNE", "fp64")
    rc, out, err = cli(
        "extract",
        "--model",
        "resnet18",
        "--data",
        image_folder,
        "--weights",
        "none",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--cache-dir",
        tmp_path / "c",
    )
    assert rc == 2 and "FEATX_AUTOTUNE" in err and "fp32 or bf16" in err and "Traceback" not in err, err


def _samples_done(entry: str) -> int:
    try:
        with open(entry + ".partial/progress.json") as f:
            return int(json.load(f)["samples_done"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def test_killed_auto_extract_resumes_to_the_uninterrupted_file(decision, tmp_path):
    data = make_images(tmp_path / "d", per_class=30, size=(64, 64))
    args = [
        "extract",
        "--model",
        "resnet50",
        "--data",
        str(data),
        "--layers",
        "layer2,avgpool",
        "--weights",
        "none",
        "--image-size",
        "64",
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--cache-dir",
    ]
    ref = run_cli(*args, str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    ref_path = ref.stdout.strip().splitlines()[-1]
    cache = tmp_path / "c"
    entry = str(cache / os.path.basename(ref_path))
    sigkill_when([*args, cache], lambda: _samples_done(entry) >= 12, timeout=300)
    assert not os.path.exists(entry), "the run finished before it could be killed"
    done = _samples_done(entry)
    assert 12 <= done < 90
    r = run_cli(*args, str(cache))
    assert r.returncode == 0, r.stderr
    assert f"at image {done}" in r.stderr
    with open_codes(ref_path) as a, open_codes(entry) as b:
        assert a.attrs["precision"] == b.attrs["precision"] == decision
        assert a.paths == b.paths and len(b) == 90
        for n in a.layers:
            np.testing.assert_array_equal(a.codes(n), b.codes(n))
