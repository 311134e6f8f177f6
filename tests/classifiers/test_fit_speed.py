"""Choosing C fast: warm starts along the C grid and grid values fitted side by side, with the
same choice as from-scratch fits and numbers that never depend on --jobs."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import featx.classifiers.grid as grid
from conftest import REPO, TIMINGS, write_codes
from featx.classifiers.fit import fit, fit_cell
from featx.classifiers.grid import chains
from featx.classifiers.protocol import Protocol, protocol_for

ROOT = str(REPO)  # the repository root (benchmarks/ beside tests/)


def codes(tmp_path, n=1400, d=64, c=5, noise=2.0, seed=0, name="p.h5", val=False):
    """Post-ReLU-like codes: class means in a 16-d latent space, a random linear map, rectified.
    One image in seven is a test image (and, with `val`, one in seven a val image)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    rng.shuffle(y)
    z = rng.normal(0, 1, (c, 16))[y] + rng.normal(0, noise, (n, 16))
    X = np.maximum(z @ rng.normal(0, 0.25, (16, d)) + rng.normal(0, 0.5, (n, d)), 0)
    s = np.array(["train"] * n, dtype=object)
    s[::7] = "test"
    if val:
        s[3::7] = "val"
    return write_codes(tmp_path / name, {"L": X}, y, s, [f"k{i}" for i in range(c)])


def same_numbers(a: dict, b: dict) -> bool:
    # timings, and the layer's cost that `fit` adds to a cell's result (featx.classifiers.cost)
    skip = (*TIMINGS, "inference_batch_size", "total_params")
    a, b = ({k: v for k, v in r.items() if k not in skip} for r in (a, b))
    return a == b


@pytest.mark.parametrize(
    "shape",
    [
        dict(n=1400, d=64, c=5, noise=2.0, seed=0),
        dict(n=2100, d=96, c=10, noise=1.5, seed=1),
        dict(n=1400, d=48, c=3, noise=3.0, seed=2, val=True),
        dict(n=210, d=32, c=5, noise=1.5, seed=3),
    ],
)
def test_warm_starts_choose_the_same_C_as_fits_from_scratch(tmp_path, shape):
    """Hold-out, val split and (210 images: under 10 per class in a hold-out) k-fold CV."""
    path = codes(tmp_path, **shape)
    proto = protocol_for("softmax")
    cold, cold_pipe = fit_cell(path, ["L"], proto, return_model=True, warm=False)
    warm, warm_pipe = fit_cell(path, ["L"], proto, return_model=True, warm=True)
    assert warm["val_source"] == cold["val_source"]
    assert warm["C"] == cold["C"]
    assert abs(warm["accuracy"] - cold["accuracy"]) <= 0.005, (warm["accuracy"], cold["accuracy"])
    assert warm["val_score"] == pytest.approx(cold["val_score"], abs=0.005)
    # the final models themselves agree: nearly every test prediction is the same
    from featx.store.codes import CodesFile

    with CodesFile(path) as f:
        X = f.codes("L", np.flatnonzero(f.split == "test"))
    assert np.mean(warm_pipe.predict(X) == cold_pipe.predict(X)) >= 0.99


def test_the_cold_path_is_the_plain_pipeline_per_C(tmp_path):
    """warm=False (and any --jobs) is exactly what featx did before: every C a fresh Pipeline."""
    from featx.classifiers.estimators import make_pipeline
    from featx.classifiers.grid import val_scores
    from featx.classifiers.protocol import parse_train_size
    from featx.classifiers.rows import select_rows
    from featx.classifiers.selection import best_C
    from featx.store.codes import CodesFile

    path = codes(tmp_path)
    proto = protocol_for("softmax")
    r, pipe = fit_cell(path, ["L"], proto, return_model=True, jobs=2, warm=False)
    with CodesFile(path) as f:
        rows = select_rows(f, proto, parse_train_size("all"), 0)
        X, y = f.codes("L"), f.labels
    tr, va = rows.train, rows.val
    scores = [
        val_scores(make_pipeline(proto, C, 0, len(tr), 64).fit(X[tr], y[tr]), X[va], y[va], proto)
        for C in proto.Cs
    ]
    best = best_C(proto.Cs, scores)
    assert (r["C"], (r["val_score"], r["val_tiebreak"])) == (proto.Cs[best], scores[best])
    both = np.concatenate([tr, va])
    ref = make_pipeline(proto, proto.Cs[best], 0, len(both), 64).fit(X[both], y[both])
    assert np.array_equal(pipe.named_steps["clf"].coef_, ref.named_steps["clf"].coef_)


def test_the_refit_starts_from_the_chosen_Cs_solution(tmp_path):
    """The warm refit needs fewer lbfgs iterations than the cold one (and ends as a plain model)."""
    path = codes(tmp_path)
    proto = protocol_for("softmax", Cs=(0.3,))
    _, cold = fit_cell(path, ["L"], proto, return_model=True, warm=False)
    _, warm = fit_cell(path, ["L"], proto, return_model=True, warm=True)
    assert warm.named_steps["clf"].n_iter_[0] < cold.named_steps["clf"].n_iter_[0]
    assert warm.named_steps["clf"].warm_start is False


@pytest.mark.parametrize(
    "proto,shape",
    [
        (Protocol("softmax"), {}),
        (Protocol("softmax"), dict(n=210)),
        (Protocol("svm"), {}),
        (Protocol("softmax", cv=3), {}),
        (Protocol("softmax", max_iter=5), {}),
    ],
)
def test_results_are_bit_identical_whatever_jobs(tmp_path, proto, shape):
    """Hold-out, auto CV, svm, --cv 3 and non-converging fits (the warning count too)."""
    path = codes(tmp_path, **shape)
    proto = proto.validate()
    (a, pa), (b, pb) = (fit_cell(path, ["L"], proto, return_model=True, jobs=j) for j in (1, 2))
    assert same_numbers(a, b)
    assert np.array_equal(pa.named_steps["clf"].coef_, pb.named_steps["clf"].coef_)
    if proto.max_iter == 5:
        assert a["convergence_warnings"] > 0
    c = fit(path, ["L"], proto, jobs=2).results[0]  # fit hands a single cell all its jobs
    assert same_numbers(a, c)


def test_a_single_layer_fit_runs_grid_chains_side_by_side(tmp_path, monkeypatch):
    """fit(jobs=2) on one layer: the warm-start chains of the 8-value grid run two at a time (each
    waits at a barrier for another; run one after another, the barrier would time out)."""
    barrier, real = threading.Barrier(2, timeout=20), grid.run_chain
    seen = []

    def chain(*args, **kwargs):
        seen.append(threading.current_thread().name)
        barrier.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(grid, "run_chain", chain)
    fit(codes(tmp_path), ["L"], protocol_for("softmax"), jobs=2)
    assert len(set(seen)) == 2


def test_chains_walk_the_sorted_grid_and_do_not_depend_on_jobs():
    proto = Protocol("softmax", Cs=(10.0, 0.1, 1.0, 0.01, 100.0, 1e-3, 1e3, 1e-4))
    walk = chains(proto, warm=True)
    pairs = [[1e-4, 1e-3], [0.01, 0.1], [1.0, 10.0], [100.0, 1e3]]
    assert [[proto.Cs[i] for i in c] for c in walk] == pairs
    kornblith = chains(Protocol("softmax", Cs=tuple(np.logspace(-6, 5, 45))), warm=True)
    assert len(kornblith) == 23 and sorted(i for c in kornblith for i in c) == list(range(45))
    assert chains(Protocol("svm", Cs=(1.0, 0.1)), warm=True) == [[1], [0]]
    assert chains(proto, warm=False) == [[i] for i in np.argsort(proto.Cs)]


def test_fit_speed_benchmark_runs(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "fit_speed.py"),
            "--shapes",
            "700x32x5",
            "--jobs",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "700x32x5" in r.stdout and "ratio" in r.stdout
    import json

    (row,) = json.loads(out.read_text())
    assert row["C_old"] == row["C_new"] and row["grid"] == 8
    assert row["C_torch"] == row["C_old"] and "new/torch" in r.stdout  # the torch solver's columns
