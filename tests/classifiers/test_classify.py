"""featx fit: protocols, honest validation, presets, errors, determinism, bounded-memory SGD."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import TIMINGS, blobs, write_codes
from featx.classifiers.estimators import L2Normalize, PerClassSVM
from featx.classifiers.fit import fit, fit_cell
from featx.classifiers.protocol import PRESETS, VISSL_COSTS, parse_train_size, protocol_for
from featx.errors import FeatxError, UsageError

CLASSES = ["a", "b", "c"]


def _splits(y, test_every=4, val_every=None):
    s = np.array(["train"] * len(y), dtype=object)
    s[::test_every] = "test"
    if val_every:
        s[1::val_every] = "val"
    return s


@pytest.fixture
def codes(tmp_path):
    X, y = blobs(40, 3, 16)
    X2 = X[:, ::-1] * 0.5 + np.random.default_rng(1).normal(size=X.shape)  # a second, noisier layer
    return write_codes(tmp_path / "c.h5", {"good": X, "noisy": X2}, y, _splits(y), CLASSES)


def _strip(r):
    return {k: v for k, v in r.items() if k not in TIMINGS}


def test_fit_reports_what_the_issue_asks(codes):
    r = fit_cell(
        codes, ["good"], protocol_for("softmax", min_val_per_class=0), "all", 0
    )  # the plain hold-out
    for key in (
        "accuracy",
        "balanced_accuracy",
        "per_class",
        "confusion_matrix",
        "C",
        "seed",
        "train_size",
        "fit_seconds",
    ):
        assert key in r
    assert r["accuracy"] >= 0.85 and r["test_split"] == "test" and r["val_source"] == "hold-out 20% of train"
    assert r["n_test"] == 30 and r["train_size"] == 90 and r["n_fit"] == 90 and r["n_val"] == 18
    assert np.array(r["confusion_matrix"]).sum() == 30 and set(r["per_class"]) == set(CLASSES)


def test_test_split_never_influences_choices(tmp_path):
    X, y = blobs(40, 3, 16)
    s = _splits(y)
    a = write_codes(tmp_path / "a.h5", {"L": X}, y, s, CLASSES)
    X2 = X.copy()
    X2[s == "test"] = np.random.default_rng(5).normal(size=X2[s == "test"].shape) * 100  # garbage test codes
    b = write_codes(tmp_path / "b.h5", {"L": X2}, y, s, CLASSES)
    for proto in (protocol_for("svm"), protocol_for("softmax", cv=3), protocol_for("sgd")):
        ra, rb = fit_cell(a, ["L"], proto, "all", 0), fit_cell(b, ["L"], proto, "all", 0)
        assert ra["C"] == rb["C"] and ra["val_score"] == rb["val_score"]
        assert ra["accuracy"] != rb["accuracy"]


def test_val_split_and_missing_test_split(tmp_path):
    X, y = blobs(40, 3, 16)
    with_val = write_codes(tmp_path / "v.h5", {"L": X}, y, _splits(y, 4, 4), CLASSES)
    r = fit_cell(with_val, ["L"], protocol_for("svm"), "all", 0)
    assert r["val_source"] == "val split" and r["n_fit"] == r["train_size"] + r["n_val"]
    s = np.where(np.arange(len(y)) % 4 == 0, "val", "train")
    no_test = write_codes(tmp_path / "n.h5", {"L": X}, y, s, CLASSES)
    r = fit_cell(no_test, ["L"], protocol_for("svm", min_val_per_class=0), "all", 0)
    assert r["test_split"] == "val" and r["val_source"].startswith("hold-out") and r["n_test"] == 30


def test_train_sizes(codes):
    r = fit_cell(codes, ["good"], protocol_for("softmax"), "5/class", 1)
    assert r["train_size"] == 15
    r = fit_cell(codes, ["good"], protocol_for("softmax"), "30", 1)
    assert r["train_size"] == 30
    assert parse_train_size("10/class").kind == "per_class" and str(parse_train_size("all")) == "all"
    with pytest.raises(FeatxError, match="larger than the 90 training images"):
        fit_cell(codes, ["good"], protocol_for("softmax"), "500", 0)
    with pytest.raises(FeatxError, match="class 'a' has only 30 training images"):
        fit_cell(codes, ["good"], protocol_for("softmax"), "31/class", 0)
    with pytest.raises(FeatxError, match="smaller than the number of classes"):
        fit_cell(codes, ["good"], protocol_for("softmax"), "2", 0)
    with pytest.raises(UsageError, match="--train-size"):
        parse_train_size("lots")


def test_bad_files_and_layers(tmp_path, codes):
    X, y = blobs(10, 2, 4)
    only_test = write_codes(tmp_path / "t.h5", {"L": X}, y, ["test"] * len(y), ["a", "b"])
    with pytest.raises(FeatxError, match="has no train split"):
        fit_cell(only_test, ["L"], protocol_for("svm"))
    y1 = np.where(np.arange(len(y)) % 3 == 0, y, 0)
    s = np.where(np.arange(len(y)) % 3 == 0, "test", "train")
    single = write_codes(tmp_path / "s.h5", {"L": X}, y1, s, ["a", "b"])
    with pytest.raises(FeatxError, match=r"single class \(a\)"):
        fit_cell(single, ["L"], protocol_for("svm"))
    with pytest.raises(FeatxError, match="layer 'nope' is not in .*it holds good, noisy"):
        fit(codes, "nope")
    with pytest.raises(UsageError, match="--classifier"):
        protocol_for("ridge")  # knn is a classifier now
    with pytest.raises(UsageError, match="--preset"):
        protocol_for(preset="simclr")


def test_deterministic_and_parallel(codes):
    a = fit(codes, "good,noisy", protocol_for("svm"), seeds=(0, 1), jobs=1, concat=True)
    b = fit(codes, "good,noisy", protocol_for("svm"), seeds=(0, 1), jobs=2, concat=True)
    assert [_strip(r) for r in a.results] == [_strip(r) for r in b.results]
    assert a.best == "good" and {s["layer"] for s in a.summary()} == {"good", "noisy", "good+noisy"}
    concat = next(r for r in a.results if r["layer"] == "good+noisy")
    assert concat["dim"] == 32
    s = next(s for s in a.summary() if s["layer"] == "noisy")
    assert s["seeds"] == [0, 1] and s["accuracy_std"] >= 0


def test_the_model_does_not_depend_on_the_process_or_its_threads(tmp_path):
    """A softmax fitted in this process (BLAS free to use every core) and one fitted in a joblib
    worker (one BLAS thread) are bit-identical: results must not change with --jobs or cores."""
    from joblib import Parallel, delayed

    X, y = blobs(300, 4, 512, sep=1.0)
    path = write_codes(tmp_path / "big.h5", {"x": X}, y, _splits(y), list("abcd"))
    proto = protocol_for("softmax", Cs=(1.0,))
    here = fit_cell(path, ["x"], proto, return_model=True)[1]
    (there,) = Parallel(n_jobs=2)(delayed(fit_cell)(path, ["x"], proto, return_model=True) for _ in range(1))
    assert np.array_equal(here.named_steps["clf"].coef_, there[1].named_steps["clf"].coef_)


def test_kornblith_preset():
    p = PRESETS["kornblith"]
    wd = np.logspace(-6, 5, 45)
    assert p.classifier == "softmax" and p.scale == "none" and len(p.Cs) == 45
    np.testing.assert_allclose(p.Cs, 1.0 / wd)
    assert p.val_fraction == 0.2 and p.cv is None


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_vissl_preset_matches_vissl_procedure(tmp_path):
    """PerClassSVM = VISSL's recipe, recomputed here with plain scikit-learn calls."""
    from sklearn.model_selection import cross_val_score
    from sklearn.svm import LinearSVC

    X, y = blobs(20, 3, 8, sep=1.5, seed=3)
    Xn = L2Normalize().fit_transform(X)
    np.testing.assert_allclose(Xn, X / (np.linalg.norm(X, axis=1, keepdims=True) + 1e-5))
    ours = PerClassSVM().fit(Xn, y)
    for k, c in enumerate(np.unique(y)):
        yb = np.where(y == c, 1, -1)
        aps = []
        for cost in VISSL_COSTS:
            svm = LinearSVC(
                C=cost,
                class_weight={1: 2, -1: 1},
                intercept_scaling=1.0,
                penalty="l2",
                loss="squared_hinge",
                tol=1e-4,
                dual=True,
                max_iter=2000,
                random_state=0,
            )
            aps.append(cross_val_score(svm, Xn, yb, cv=3, scoring="average_precision").mean())
        assert ours.costs_[k] == VISSL_COSTS[int(np.argmax(aps))]
    assert ours.decision_function(Xn).shape == (60, 3)
    path = write_codes(tmp_path / "v.h5", {"L": X}, y, _splits(y), CLASSES)
    r = fit_cell(path, ["L"], protocol_for(preset="vissl-svm"), "all", 0)
    assert r["preset"] == "vissl-svm" and r["val_source"] == "3-fold cv" and len(r["C"]) == 3


def test_sgd_learns(codes):
    r = fit_cell(codes, ["good"], protocol_for("sgd", chunk_rows=16), "all", 0)
    assert r["accuracy"] > 0.85 and r["classifier"] == "sgd"
    with pytest.raises(UsageError, match="--cv is for svm and softmax"):
        fit_cell(codes, ["good"], protocol_for("sgd", cv=3), "all", 0)


def test_pca_and_scaling(codes):
    r = fit_cell(codes, ["good"], protocol_for("softmax", pca=4, scale="l2"), "all", 0, return_model=True)
    res, pipe = r
    assert [name for name, _ in pipe.steps] == ["scale", "pca", "clf"] and pipe.named_steps[
        "pca"
    ].n_components == 4


_MEMORY_PROBE = """
import resource, sys
import numpy as np
from featx.classifiers.fit import fit_cell
from featx.classifiers.protocol import protocol_for
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r = fit_cell(sys.argv[1], ["big"], protocol_for("sgd", Cs=(1.0,), epochs=1, chunk_rows=512), "all", 0)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, r["accuracy"])
"""


def test_sgd_memory_stays_bounded(tmp_path):
    """A 160 MB file, streamed in 512-row chunks: peak memory grows by a small fraction of it."""
    rng = np.random.default_rng(0)
    n, d = 20_000, 2048
    y = rng.integers(0, 4, n)
    X = rng.normal(size=(n, d)).astype(np.float32)
    X[np.arange(n), y] += 4.0
    path = write_codes(tmp_path / "big.h5", {"big": X}, y, _splits(y), ["a", "b", "c", "d"])
    size = X.nbytes
    del X
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, path], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    grown, acc = out.stdout.split()
    assert int(grown) < size / 4, (
        f"peak grew by {int(grown) / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"
    )
    assert float(acc) > 0.9


# -- selection that survives small data -----------------------------------------------


def test_small_hold_outs_become_cross_validation(tmp_path):
    """A 20% hold-out of 30 training images per class keeps 6 per class: C is chosen by 5-fold CV
    on the training images; with 100 per class the hold-out keeps 20 per class and stays."""
    X, y = blobs(40, 3, 16)
    small = write_codes(tmp_path / "s.h5", {"L": X}, y, _splits(y), CLASSES)
    r = fit_cell(small, ["L"], protocol_for("softmax"), "all", 0)
    assert r["val_source"] == "5-fold cv" and r["n_val"] == 0 and r["n_fit"] == r["train_size"] == 90
    assert (
        fit_cell(small, ["L"], protocol_for("softmax"), "3/class", 0)["val_source"] == "3-fold cv"
    )  # k <= smallest
    assert fit_cell(small, ["L"], protocol_for("sgd"), "all", 0)["val_source"].startswith(
        "hold-out"
    )  # streams
    X, y = blobs(134, 3, 16)
    large = write_codes(tmp_path / "l.h5", {"L": X}, y, _splits(y), CLASSES)
    r = fit_cell(large, ["L"], protocol_for("softmax"), "all", 0)
    assert r["val_source"] == "hold-out 20% of train" and r["n_val"] >= 3 * 10


def test_ties_on_accuracy_go_to_the_continuous_score_not_the_grid_order(tmp_path):
    """Well-separated blobs: every C is 100% right on validation; the pick is the C with the best
    mean log-likelihood of the true class (computed here independently), not the smallest C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featx.classifiers.rows import select_rows
    from featx.store.codes import CodesFile

    X, y = blobs(40, 3, 8, sep=12.0)
    path = write_codes(tmp_path / "t.h5", {"L": X}, y, _splits(y), CLASSES)
    Cs = (0.001, 0.01, 0.1, 1.0)
    proto = protocol_for("softmax", Cs=Cs, min_val_per_class=0)
    r = fit_cell(path, ["L"], proto, "all", 0, warm=False)  # from-scratch fits, as computed below
    warm = fit_cell(path, ["L"], proto, "all", 0)  # warm starts: the same pick, a near-equal score
    with CodesFile(path) as f:
        rows = select_rows(f, proto, parse_train_size("all"), 0)
    lik = {}
    for C in Cs:
        m = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000)).fit(
            X[rows.train], y[rows.train]
        )
        assert m.score(X[rows.val], y[rows.val]) == 1.0  # a real tie on accuracy
        lik[C] = -log_loss(y[rows.val], m.predict_proba(X[rows.val]), labels=[0, 1, 2])
    assert r["C"] == max(lik, key=lik.get) != min(Cs)
    assert r["val_tiebreak"] == pytest.approx(lik[r["C"]], rel=1e-6)
    assert warm["C"] == r["C"] and warm["val_tiebreak"] == pytest.approx(lik[r["C"]], rel=1e-2)
    assert r["val_tiebreak_metric"] == "mean log-likelihood"


def test_layers_tied_on_accuracy_are_ranked_by_the_continuous_score(tmp_path):
    """Never by position in the layer list: both orders give the same pick, the layer with the
    better continuous score (for softmax, the sharper layer's higher log-likelihood)."""
    X, y = blobs(40, 3, 8, sep=12.0)
    blurry = X + np.random.default_rng(3).normal(size=X.shape) * 2.0  # still separable, less sharply
    path = write_codes(tmp_path / "r.h5", {"blurry": blurry, "sharp": X}, y, _splits(y), CLASSES)
    for clf in ("softmax", "svm"):
        picks = set()
        for order in (["blurry", "sharp"], ["sharp", "blurry"]):
            rep = fit(path, order, protocol_for(clf, Cs=(0.1, 1.0)))
            s = {x["layer"]: x for x in rep.summary()}
            assert s["blurry"]["val_score"] == s["sharp"]["val_score"] == 1.0
            assert rep.best == max(s, key=lambda n: s[n]["val_tiebreak"])
            picks.add(rep.best)
        assert len(picks) == 1, clf
        if clf == "softmax":
            assert picks == {"sharp"}


def test_every_accuracy_carries_its_wilson_interval(codes):
    from featx.stats import wilson_interval

    r = fit_cell(codes, ["noisy"], protocol_for("softmax"), "all", 0)
    right = round(r["accuracy"] * r["n_test"])
    assert (r["test_ci_low"], r["test_ci_high"]) == wilson_interval(right, r["n_test"])
    assert r["test_ci_low"] <= r["accuracy"] <= r["test_ci_high"]


def test_the_cli_choices_are_the_library_ones():
    """settings.py holds the CLI's choices so that parsing imports nothing heavy; they must match."""
    from featx.classifiers.protocol import PRESETS
    from featx.settings import PRESET_NAMES

    assert tuple(PRESETS) == PRESET_NAMES


def test_parsing_a_command_line_imports_no_heavy_library():
    """A cache hit answers in well under a second: building the parser loads no scikit-learn,
    torch or h5py (each takes a second or more to import)."""
    code = (
        "import sys; from featx.cli.main import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'sklearn', 'h5py', 'timm', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("classifier", "knn?", "--classifier"),
        ("scale", "z", "--scale"),
        ("pca", 0, "--pca"),
        ("cv", 1, "--cv"),
        ("epochs", 0, "--epochs"),
        ("chunk_rows", 8, "--chunk-rows"),
        ("solver", "gpu", "--solver"),
        ("val_fraction", 1.5, "--val-fraction"),
    ],
)
def test_protocol_is_validated_at_construction(field, value, flag):
    """Every way in (fit, fit_cell, bench, a preset) builds a Protocol, so every way is checked."""
    from featx.classifiers.protocol import Protocol

    with pytest.raises(UsageError, match=f"^{flag}"):
        Protocol(**{field: value})


def test_a_chosen_c_at_the_grid_edge_is_flagged(codes, caplog):
    """On separable blobs a grid of tiny C values can only choose its largest: featx says the grid
    may have cut the choice short."""
    import logging

    from featx.classifiers.fit import fit

    with caplog.at_level(logging.WARNING, logger="featx"):
        report = fit(codes, "good", protocol_for("softmax", Cs=(1e-7, 1e-6, 1e-5), min_val_per_class=0))
    assert {r["C"] for r in report.results} == {1e-5}
    assert any("C = 1e-05 is the grid's largest value" in m and "widen --C" in m for m in caplog.messages)
