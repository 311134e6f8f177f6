"""The torch solver for softmax: scikit-learn's LogisticRegression objective solved by torch
L-BFGS in float32, checked on the CPU against scikit-learn itself."""

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from conftest import assert_one_line_error, cli, write_codes
from featx.classifiers.fit import fit_cell
from featx.classifiers.protocol import Protocol, protocol_for
from featx.classifiers.torch_softmax import TorchSoftmax, resolve_solver
from featx.errors import UsageError


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """torch's CPU threads spin when the machine is oversubscribed (2 shared cores here): one thread
    keeps these tests fast under load; the numbers checked do not depend on it."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def unbalanced(n_classes=5, dim=24, seed=0, n=900):
    """Gaussian blobs with class shares 1 : 2 : ... : K, standardized, plus a held-out set."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, n_classes + 1) / np.arange(1, n_classes + 1).sum()
    y = rng.choice(n_classes, size=2 * n, p=p)
    means = rng.normal(0, 1.2, (n_classes, dim))
    X = (means[y] + rng.normal(0, 1.0, (2 * n, dim))).astype(np.float32)
    X = StandardScaler().fit(X[:n]).transform(X).astype(np.float32)
    return X[:n], y[:n], X[n:], y[n:]


def objective(clf, X, y, C: float) -> float:
    """scikit-learn's objective in numpy float64: C * sum of log-losses + ||coef||^2 / 2."""
    Z = X.astype(np.float64) @ np.asarray(clf.coef_, np.float64).T + np.asarray(clf.intercept_, np.float64)
    cls = np.searchsorted(clf.classes_, y)
    if Z.shape[1] == 1:
        loss = np.logaddexp(0.0, Z[:, 0]) - (cls == 1) * Z[:, 0]
    else:
        m = Z.max(axis=1)
        loss = m + np.log(np.exp(Z - m[:, None]).sum(axis=1)) - Z[np.arange(len(y)), cls]
    return float(C * loss.sum() + 0.5 * np.sum(np.asarray(clf.coef_, np.float64) ** 2))


@pytest.mark.parametrize("n_classes", [2, 5])
@pytest.mark.parametrize("C", [1e-3, 0.03, 1.0, 10.0])
def test_same_objective_and_predictions_as_sklearn(n_classes, C):
    X, y, Xh, yh = unbalanced(n_classes, seed=n_classes)
    ref = LogisticRegression(C=C, max_iter=5000, tol=1e-10).fit(X, y)  # the optimum, tightly
    sk = LogisticRegression(C=C, max_iter=2000).fit(X, y)  # what featx's sklearn path finds
    tc = TorchSoftmax(C=C, max_iter=2000, device="cpu").fit(X, y)
    assert tc.coef_.shape == sk.coef_.shape and np.array_equal(tc.classes_, sk.classes_)
    best, f_sk, f_tc = objective(ref, X, y, C), objective(sk, X, y, C), objective(tc, X, y, C)
    assert f_tc >= best * (1 - 1e-6)  # not below the optimum: it is the same objective
    assert (f_tc - best) / best <= max(1e-3, 2 * (f_sk - best) / best), (f_tc, f_sk, best)
    assert np.mean(tc.predict(Xh) == sk.predict(Xh)) >= 0.995
    p = tc.predict_proba(Xh)
    assert p.shape == (len(Xh), n_classes) and np.allclose(p.sum(axis=1), 1.0)
    plain = tc.to_sklearn()  # what featx saves: the same arrays in a LogisticRegression
    assert np.array_equal(plain.predict(Xh), tc.predict(Xh)) and np.array_equal(plain.predict_proba(Xh), p)


def test_a_warm_start_reaches_the_same_solution_in_fewer_iterations():
    X, y, _, _ = unbalanced(4, seed=7)
    cold = TorchSoftmax(C=1.0, device="cpu").fit(X, y)
    prev = TorchSoftmax(C=0.3, device="cpu").fit(X, y)
    warm = TorchSoftmax(C=1.0, device="cpu", warm_start=True)
    warm.coef_, warm.intercept_ = prev.coef_, prev.intercept_
    warm.fit(X, y)
    assert warm.n_iter_[0] < cold.n_iter_[0]
    assert objective(warm, X, y, 1.0) == pytest.approx(objective(cold, X, y, 1.0), rel=1e-3)  # both meet tol


def test_hitting_max_iter_is_a_convergence_warning():
    from sklearn.exceptions import ConvergenceWarning

    X, y, _, _ = unbalanced(3, seed=1)
    with pytest.warns(ConvergenceWarning):
        TorchSoftmax(C=10.0, max_iter=2, device="cpu").fit(X, y)


def codes(tmp_path, n=1400, d=48, c=5, seed=0):
    """Unbalanced post-ReLU-like codes with a test split of one image in seven."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, c + 1) / np.arange(1, c + 1).sum()
    y = rng.choice(c, size=n, p=p)
    z = rng.normal(0, 1, (c, 16))[y] + rng.normal(0, 1.6, (n, 16))
    X = np.maximum(z @ rng.normal(0, 0.25, (16, d)) + rng.normal(0, 0.5, (n, d)), 0)
    s = np.array(["train"] * n, dtype=object)
    s[::7] = "test"
    return write_codes(tmp_path / "c.h5", {"L": X}, y, s, [f"k{i}" for i in range(c)])


@pytest.mark.parametrize(
    "shape,Cs",
    [
        (dict(seed=0), None),
        (dict(n=2100, d=64, c=8, seed=1), None),
        (dict(n=280, seed=2), (1e-3, 0.01, 0.1, 1.0, 10.0)),
    ],
)
def test_the_selection_picks_the_same_C_with_either_solver(tmp_path, shape, Cs):
    """Through classify's real selection (hold-out; 280 images: auto k-fold CV, on a grid without
    the near-separable C = 100, 1000 that make the tiny folds slow), warm starts included."""
    path = codes(tmp_path, **shape)
    grid = {"Cs": Cs} if Cs else {}
    sk, sk_pipe = fit_cell(path, ["L"], protocol_for("softmax", solver="sklearn", **grid), return_model=True)
    tc, tc_pipe = fit_cell(
        path, ["L"], protocol_for("softmax", solver="torch", device="cpu", **grid), return_model=True
    )
    assert tc["val_source"] == sk["val_source"]
    assert tc["C"] == sk["C"]
    assert abs(tc["accuracy"] - sk["accuracy"]) <= 0.005
    from featx.store.codes import CodesFile

    with CodesFile(path) as f:
        X = f.codes("L", np.flatnonzero(f.split == "test"))
    assert np.mean(tc_pipe.predict(X) == sk_pipe.predict(X)) >= 0.995
    assert type(tc_pipe.named_steps["clf"]) is LogisticRegression  # what featx saves, whoever solved it


def test_torch_results_do_not_depend_on_jobs(tmp_path):
    path = codes(tmp_path)
    proto = protocol_for("softmax", solver="torch", device="cpu")
    (a, pa), (b, pb) = (fit_cell(path, ["L"], proto, return_model=True, jobs=j) for j in (1, 2))
    a.pop("fit_seconds"), b.pop("fit_seconds")
    assert a == b
    assert np.array_equal(pa.named_steps["clf"].coef_, pb.named_steps["clf"].coef_)


def test_torch_fits_on_the_cpu_use_one_thread_like_blas(tmp_path, monkeypatch):
    """featx's one-thread rule holds for torch's intra-op threads too, in the grid's threads."""
    import threading

    import torch

    import featx.classifiers.grid as grid

    seen, real = [], grid.run_chain

    def chain(*args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real(*args, **kwargs)

    monkeypatch.setattr(grid, "run_chain", chain)
    torch.set_num_threads(2)
    fit_cell(
        codes(tmp_path, n=420),
        ["L"],
        protocol_for("softmax", solver="torch", device="cpu", Cs=(0.1, 1.0)),
        jobs=2,
    )
    assert torch.get_num_threads() == 2  # restored
    assert seen and all(n == 1 for _, n in seen), seen


def test_a_saved_torch_classifier_reloads_and_predicts_the_same(tmp_path):
    from featx.classifiers.io import load_classifier, save_classifier
    from featx.store.codes import CodesFile

    path = codes(tmp_path)
    _, pipe = fit_cell(path, ["L"], protocol_for("softmax", solver="torch", device="cpu"), return_model=True)
    saved = save_classifier(str(tmp_path / "m"), pipe, codes=path, layers=["L"])
    loaded, _ = load_classifier(saved)
    with CodesFile(path) as f:
        X = f.codes("L")
    assert np.array_equal(loaded.predict(X), pipe.predict(X))
    assert np.array_equal(loaded.predict_proba(X), pipe.predict_proba(X))


def test_solver_identity_auto_and_errors():
    assert Protocol(solver="auto", device="cpu").validate().solver == "sklearn"  # CPU: exactly today's path
    assert Protocol("svm", solver="auto").validate().solver == "sklearn"
    assert "solver" not in Protocol().validate().to_dict()  # sklearn protocols keep their old keys
    torch_proto = Protocol(solver="torch", device="cpu").validate()
    assert torch_proto.to_dict()["solver"] == "torch" and "device" not in torch_proto.to_dict()
    assert torch_proto == Protocol(solver="torch", device="cuda:3")  # the device is not identity
    for bad, needle in [
        (dict(solver="newton"), "--solver 'newton'"),
        (dict(classifier="svm", solver="torch"), "softmax only"),
        (dict(solver="torch", device="tpu"), "--device"),
    ]:
        with pytest.raises(UsageError, match=needle):
            Protocol(**bad).validate()
    assert resolve_solver("auto", "softmax", "cpu") == "sklearn"


@pytest.fixture
def fit_file(tmp_path):
    return codes(tmp_path, n=700, d=16, c=3)


def test_cli_fit_with_the_torch_solver(tmp_path, fit_file):
    rc, out, err = cli(
        "-q",
        "fit",
        fit_file,
        "--solver",
        "torch",
        "--device",
        "cpu",
        "--C",
        "0.1,1",
        "--json",
        "--out",
        tmp_path / "m",
    )
    assert rc == 0, err
    data = json.loads(out)
    assert data["protocol"]["solver"] == "torch" and data["results"][0]["C"] in (0.1, 1.0)
    assert (tmp_path / "m.safetensors").is_file()


def test_cli_bad_solver_is_a_one_line_error(fit_file):
    rc, _, err = cli("fit", fit_file, "--solver", "gpu")
    assert_one_line_error(rc, err, code=2, needles=("--solver", "auto, sklearn, torch"))
    rc, _, err = cli("fit", fit_file, "--classifier", "svm", "--solver", "torch")
    assert_one_line_error(rc, err, code=2, needles=("--solver torch",))
