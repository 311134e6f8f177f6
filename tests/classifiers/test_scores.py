"""featx.classifiers.scores and `featx score`: hand-computed cases, agreement with the reference algorithms,
ranking sanity, training rows only, and one-line CLI errors."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, blobs, write_codes
from featx.classifiers import scores
from featx.errors import FeatxError, UsageError

ROOT = str(REPO)  # the repository root (benchmarks/ beside tests/)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from reference_scores import REFERENCES, gbc_reference, hscore_reference, logme_reference  # noqa: E402


def fixed(n, d, c):
    """Deterministic codes (no RNG stream involved) with class structure; full rank."""
    i, j = np.arange(n)[:, None], np.arange(d)[None, :]
    y = (np.arange(n) * 7) % c
    return np.sin(0.37 * i * (j + 1) + 0.5 * j) + np.cos(1.3 * y[:, None] * (j + 2)), y


# thuml/LogME's LogME().fit(X, y) (its default fixed-point algorithm, run once on `fixed`)
THUML_LOGME = {
    (120, 10, 3): -0.2068331379542309,
    (900, 300, 5): 1.1263707638143463,
    (40, 60, 4): 2.723885848321223,
}


# -- hand-computed --------------------------------------------------------------------------------


def test_hscore_by_hand():
    # 1-D codes 0,0,2,2 with labels 0,0,1,1: cov = 1, cov(E[f|y]) = 1, no shrinkage in 1-D -> H = 1
    X, y = np.array([[0.0], [0.0], [2.0], [2.0]]), np.array([0, 0, 1, 1])
    assert scores.score(X, y, ["hscore"])["hscore"] == pytest.approx(1.0, rel=1e-12)


def test_transrate_by_hand():
    # codes 0,0,0,4, labels 0,0,0,1; centred: -1,-1,-1,3. R = 1/2 log(1 + sum f^2 / (n eps))
    X, y, eps = np.array([[0.0], [0.0], [0.0], [4.0]]), np.array([0, 0, 0, 1]), scores.TRANSRATE_EPS
    whole = 0.5 * math.log(1 + 12 / (4 * eps))
    parts = [0.5 * math.log(1 + 3 / (3 * eps)), 0.5 * math.log(1 + 9 / (1 * eps))]
    assert scores.score(X, y, ["transrate"])["transrate"] == pytest.approx(whole - np.mean(parts), rel=1e-12)


def test_gbc_by_hand():
    # 1-D (PCA is the identity up to sign): class 0 at 0, 2 (mean 1, 1/N variance 1), class 1 at 3, 7
    # (mean 5, variance 4); s = 2.5, D_B = 16 / 2.5 / 8 + 1/2 log(2.5 / sqrt(1 * 4)); both ordered pairs
    X, y = np.array([[0.0], [2.0], [3.0], [7.0]]), np.array([0, 0, 1, 1])
    d_b = 16 / 2.5 / 8 + 0.5 * math.log(2.5 / 2)
    assert scores.score(X, y, ["gbc"])["gbc"] == pytest.approx(-2 * math.exp(-d_b), rel=1e-12)
    # a constant class: its variance is floored at 1e-4, not zero
    X2 = np.array([[1.0], [1.0], [3.0], [7.0]])
    s = (1e-4 + 4) / 2
    d_b2 = 16 / s / 8 + 0.5 * (math.log(s) - 0.5 * math.log(1e-4) - 0.5 * math.log(4))
    assert scores.score(X2, y, ["gbc"])["gbc"] == pytest.approx(-2 * math.exp(-d_b2), rel=1e-12)


@pytest.mark.parametrize("shape", [(120, 10, 3), (500, 280, 6), (60, 90, 4)])
def test_gbc_matches_the_reference_and_ignores_rotations(shape):
    """Dense (10 dims) and banded (280) routes, and N < D, against the PCA + loop reference; the
    principal-component step makes GBC blind to a rotation of the codes."""
    X, y = fixed(*shape)
    ours = scores.score(X, y, ["gbc"])["gbc"]
    assert ours == pytest.approx(gbc_reference(X, y), rel=1e-7)
    Q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(shape[1], shape[1])))
    assert scores.score(X @ Q, y, ["gbc"])["gbc"] == pytest.approx(ours, rel=1e-7)


def test_logme_is_the_maximum_evidence():
    """LogME is max over alpha, beta of log N(y | 0, I/beta + F F^T/alpha) / N per class (the paper's
    eq. 2), averaged: here maximised by a generic optimiser on the dense Gaussian, independently of
    both implementations' fixed-point algebra."""
    from scipy.optimize import minimize

    X, y = fixed(60, 4, 2)
    n = len(y)

    def neg_evidence(p, yc):
        C = np.eye(n) / np.exp(p[1]) + X @ X.T / np.exp(p[0])
        logdet = np.linalg.slogdet(C)[1]
        return 0.5 * (logdet + yc @ np.linalg.solve(C, yc) + n * np.log(2 * np.pi)) / n

    best = [
        -minimize(
            neg_evidence,
            [0.0, 0.0],
            args=((y == c).astype(float),),
            method="Nelder-Mead",
            options={"xatol": 1e-8, "fatol": 1e-12, "maxiter": 4000},
        ).fun
        for c in range(2)
    ]
    assert scores.score(X, y, ["logme"])["logme"] == pytest.approx(np.mean(best), abs=1e-5)


def test_ledoit_wolf_shrinkage_equals_scikit_learn():
    from sklearn.covariance import ledoit_wolf_shrinkage

    for n, d in ((50, 8), (30, 80)):
        X, _ = fixed(n, d, 3)
        Xc = X - X.mean(axis=0)
        assert scores.ledoit_wolf_shrinkage(Xc, Xc.T @ Xc / n) == pytest.approx(
            ledoit_wolf_shrinkage(Xc), rel=1e-10
        )


# -- the reference algorithms ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(120, 10, 3), (900, 300, 5), (40, 60, 4)])
def test_logme_matches_thuml_reference(shape):
    X, y = fixed(*shape)
    n, d, _ = shape
    # the same algorithm on the same data; 1e-9 leaves room for BLAS/CPU summation order (N < D
    # goes through an ill-conditioned SVD: 1e-11 apart on an AMD EPYC, equal on a Xeon)
    assert logme_reference(X, y, pad=False) == pytest.approx(THUML_LOGME[shape], rel=1e-9)
    ours = scores.score(X, y, ["logme"])["logme"]
    if n > d:  # full rank, N > D: the reference's numbers exactly
        assert ours == pytest.approx(THUML_LOGME[shape], rel=1e-9)
    else:  # N <= D: the log-determinant over all D eigenvalues (thuml/LogME issue #23), not the reference's
        assert ours == pytest.approx(logme_reference(X, y, pad=True), rel=1e-6)
        assert abs(ours - THUML_LOGME[shape]) > 0.1


@pytest.mark.parametrize("shape", [(120, 10, 3), (40, 60, 4), (500, 280, 6)])
def test_scores_match_reference_versions(shape):
    """Small dims take the dense route, 300 and 400 the banded one; both agree with the references."""
    X, y = fixed(*shape)
    n = shape[0]
    ours = scores.score(X, y)
    assert ours["logme"] == pytest.approx(logme_reference(X, y), rel=1e-6)
    # the reference's cov(E[f|y]) is np.cov's 1/(N-1) against LedoitWolf's 1/N covariance; featx uses 1/N for both
    assert ours["hscore"] == pytest.approx(hscore_reference(X, y) * (n - 1) / n, rel=1e-8)
    assert ours["transrate"] == pytest.approx(REFERENCES["transrate"](X, y), rel=1e-7)


def test_float32_precision():
    """float32 codes (as files hold them) score as float64 ones; the float32 covariance product (an
    option for speed) agrees on codes with a well-spread spectrum."""
    X, y = fixed(300, 260, 5)
    a = scores.score(X, y)
    assert scores.score(X.astype(np.float32), y) == pytest.approx(a, rel=1e-6)
    rng, ys = np.random.default_rng(0), np.arange(600) % 4
    Xs = (rng.normal(size=(600, 300)) + rng.normal(size=(4, 300))[ys]).astype(np.float32)
    assert scores.score(Xs, ys, precision="float32") == pytest.approx(scores.score(Xs, ys), rel=1e-5)


def test_dead_channels_leave_logme_and_transrate_unchanged():
    """Zero columns (dead ReLU channels) add zero eigenvalues: LogME (with the log-determinant over
    all D) and TransRate do not move; the 300-dim matrix is rank-deficient and takes the banded route."""
    X, y = blobs(n_per_class=50, n_classes=3, dim=20, sep=3.0)
    padded = np.hstack([X, np.zeros((len(y), 280))])
    a, b = scores.score(X, y), scores.score(padded, y)
    assert b["logme"] == pytest.approx(a["logme"], rel=1e-9)
    assert b["transrate"] == pytest.approx(a["transrate"], rel=1e-9)
    assert b["hscore"] == pytest.approx(hscore_reference(padded, y) * (len(y) - 1) / len(y), rel=1e-8)


def test_band_reduction_is_exact():
    X, _ = fixed(400, 280, 4)
    S = np.cov(X, rowvar=False)
    B, panels = scores._band_reduce(S, 64)
    assert np.abs(np.tril(B, -65)).max() == 0.0
    np.testing.assert_allclose(
        np.linalg.eigvalsh(B), np.linalg.eigvalsh(S), rtol=0, atol=1e-12 * np.abs(S).max()
    )


# -- ranking sanity ----------------------------------------------------------------------------


def test_separable_layer_scores_above_noise():
    X, y = blobs(n_per_class=100, n_classes=4, dim=24, sep=5.0)
    rng = np.random.default_rng(1)
    good, bad = scores.score(X, y), scores.score(rng.normal(size=X.shape), y)
    for m in scores.METRICS:
        assert good[m] > bad[m], m
    # 288 dims (the banded route): the same signal beside 264 noise dims, against 288 noise dims
    wide_good = scores.score(np.hstack([X, rng.normal(size=(len(y), 264))]), y)
    wide_bad = scores.score(rng.normal(size=(len(y), 288)), y)
    for m in scores.METRICS:
        assert wide_good[m] > wide_bad[m], m


def test_bad_metric_and_single_class():
    with pytest.raises(UsageError, match="--metric 'ncti'.*logme, hscore, transrate, gbc"):
        scores.parse_metrics("logme,ncti")
    assert scores.parse_metrics("all") == list(scores.METRICS)
    with pytest.raises(FeatxError, match="two or more classes"):
        scores.score(np.ones((5, 3)), np.zeros(5, int))
    with pytest.raises(FeatxError, match="8193 dims.*--pool avg"):
        scores.score(np.ones((4, scores.MAX_DIM + 1), np.float32), np.array([0, 0, 1, 1]))
    with pytest.raises(FeatxError, match="NaN"):
        scores.score(np.array([[0.0], [np.nan], [1.0]]), np.array([0, 1, 1]))


# -- codes files: training rows only ------------------------------------------------------------


def _file(tmp_path, name="c.h5", model="resnet18", test_separable=True):
    """Train rows: weak signal; val and test rows: classes far apart (or not), so any use of
    non-training rows moves every score."""
    rng = np.random.default_rng(0)
    Xtr, ytr = blobs(n_per_class=30, n_classes=3, dim=12, sep=1.0, seed=0)
    Xte, yte = blobs(n_per_class=10, n_classes=3, dim=12, sep=40.0 if test_separable else 0.0, seed=1)
    Xva, yva = blobs(n_per_class=5, n_classes=3, dim=12, sep=40.0, seed=2)
    X = np.vstack([Xtr, Xte, Xva])
    y = np.concatenate([ytr, yte, yva])
    splits = ["train"] * len(ytr) + ["test"] * len(yte) + ["val"] * len(yva)
    layers = {"a": X, "b": rng.normal(size=X.shape)}
    return write_codes(tmp_path / name, layers, y, splits, ["x", "y", "z"], model=model), X[: len(ytr)], ytr


def test_score_file_uses_training_rows_only(tmp_path):
    path, Xtr, ytr = _file(tmp_path)
    r = scores.score_file(path)
    assert r["rows"] == 90 and r["classes"] == 3 and [ly["layer"] for ly in r["layers"]] == ["a", "b"]
    assert r["layers"][0]["scores"] == pytest.approx(scores.score(Xtr, ytr))
    # the same file with test rows that carry no class signal: nothing changes
    other, _, _ = _file(tmp_path, "d.h5", test_separable=False)
    assert scores.score_file(other)["layers"][0]["scores"] == r["layers"][0]["scores"]


def test_score_file_without_train_split(tmp_path):
    X, y = blobs(10, 3, 4)
    path = write_codes(tmp_path / "t.h5", {"a": X}, y, ["test"] * len(y), ["x", "y", "z"])
    with pytest.raises(FeatxError, match="no train split"):
        scores.score_file(path)


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, "-m", "featx.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_table_json_and_model_ranking(tmp_path):
    path, _, _ = _file(tmp_path)
    # a second "model": the same images and labels, codes without class signal
    from featx.store.codes import CodesFile

    with CodesFile(path) as f:
        labels, splits = f.labels.copy(), f.split.copy()
    noise = np.random.default_rng(5).normal(size=(len(labels), 8))
    worse = write_codes(tmp_path / "w.h5", {"only": noise}, labels, splits, ["x", "y", "z"], model="vgg11")
    r = _cli("score", path, "--metric", "logme,hscore")
    assert r.returncode == 0, r.stderr
    assert "90 training images, 3 classes" in r.stdout
    assert "logme" in r.stdout and "hscore" in r.stdout and "transrate" not in r.stdout
    r = _cli("score", worse, path, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [f["model"] for f in out["files"]] == ["vgg11", "resnet18"]
    for m in scores.METRICS:
        assert [e["model"] for e in out["ranking"][m]] == ["resnet18", "vgg11"], m
        assert out["ranking"][m][0]["layer"] == "a"
    r = _cli("score", worse, path, "--layer", "a")
    assert r.returncode == 2 and "--layer 'a'" in r.stderr and "w.h5" in r.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--metric", "ncti"], "--metric 'ncti'"),
        (["--layer", "nope"], "--layer 'nope'"),
        (["--metric", ""], "--metric is empty"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, needle):
    path, _, _ = _file(tmp_path)
    r = _cli("score", path, *args)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_cli_missing_file_and_other_data(tmp_path):
    r = _cli("score", str(tmp_path / "none.h5"))
    assert r.returncode == 2 and "no such codes file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    a, _, _ = _file(tmp_path)
    X, y = blobs(10, 3, 4)
    b = write_codes(tmp_path / "other.h5", {"a": X}, y, ["train"] * len(y), ["x", "y", "z"])
    r = _cli("score", a, b)
    assert r.returncode == 2 and "different training images" in r.stderr, r.stderr


def test_score_speed_benchmark_runs(tmp_path):
    """benchmarks/score_speed.py on small shapes (dense and banded routes): values agree with the references."""
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "score_speed.py"),
            "--shapes",
            "200x20x3,400x270x3",
            "--rounds",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for shape in ("200 x 20 x 3", "400 x 270 x 3"):
        for m in ("shared", *scores.METRICS, "all"):
            assert re.search(rf"^ *{shape} +{m} +\d+\.\d+", r.stdout, re.M), (shape, m, r.stdout)
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) > 9 and parts[5] in ("logme", "transrate"):
            assert float(parts[-1]) == pytest.approx(float(parts[-2]), rel=1e-4), line


def test_undefined_scores_are_one_line_errors_or_none_with_a_reason():
    """Codes whose covariance overflows (degenerate layers do this) give no traceback: a one-line
    FeatxError, or, for featx score and bench, None with its reason so other layers still score."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 8)) * 1e170, np.arange(40) % 3
    with pytest.raises(FeatxError, match="logme is not defined on these codes"):
        scores.score(X, y, ["logme"])
    errors: dict = {}
    values = scores.score(X, y, ["logme", "hscore"], errors=errors)
    assert values == {"logme": None, "hscore": None}
    assert set(errors) == {"logme", "hscore"} and all("not defined" in e for e in errors.values())
    ok = scores.score(rng.normal(size=(40, 8)), y, ["logme"], errors=errors)
    assert np.isfinite(ok["logme"])
