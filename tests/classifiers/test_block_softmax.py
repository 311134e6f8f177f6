"""BlockSoftmax: scikit-learn's lbfgs logistic regression, summed over fixed row blocks in threads."""

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from featx.classifiers import block_softmax
from featx.classifiers.block_softmax import BlockSoftmax
from featx.classifiers.fit import fit_cell
from featx.classifiers.io import load_classifier, save_classifier
from featx.classifiers.protocol import protocol_for
from tests.classifiers.test_fit_speed import codes, same_numbers


def data(n=3000, d=40, k=5, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.standard_normal((n, d)).astype(np.float32)
    X[:, :3] += y[:, None] * 0.7
    return X, y


@pytest.mark.parametrize("k", [2, 5])
def test_one_block_solves_scikit_learns_objective(k):
    """One block: the same objective, optimiser and options as LogisticRegression; the solutions agree
    to what lbfgs's tolerance leaves (the two sum the penalty's gradient in a different order)."""
    X, y = data(k=k)
    ref = LogisticRegression(C=0.1).fit(X, y)
    got = BlockSoftmax(C=0.1, block_rows=10**9).fit(X, y)
    assert got.coef_.shape == ref.coef_.shape and got.intercept_.shape == ref.intercept_.shape
    assert got.coef_.dtype == ref.coef_.dtype
    assert np.abs(got.coef_ - ref.coef_).max() < 0.01
    assert abs(int(got.n_iter_[0]) - int(ref.n_iter_[0])) <= 10
    assert np.mean(got.predict(X) == ref.predict(X)) >= 0.995
    np.testing.assert_allclose(got.predict_proba(X), ref.predict_proba(X), atol=2e-3)


@pytest.mark.parametrize("k", [2, 4])
def test_blocks_give_the_same_bits_whatever_the_thread_count(k):
    X, y = data(n=2500, k=k, seed=1)
    fits = [BlockSoftmax(C=1.0, block_rows=300, threads=t).fit(X, y) for t in (1, 2, 3)]
    for other in fits[1:]:
        assert np.array_equal(other.coef_, fits[0].coef_) and np.array_equal(
            other.intercept_, fits[0].intercept_
        )
    ref = LogisticRegression(C=1.0).fit(X, y)
    assert np.mean(fits[0].predict(X) == ref.predict(X)) >= 0.995  # blocks change rounding, not the answer


def test_warm_start_from_the_solution_stops_at_once_and_max_iter_warns():
    X, y = data(seed=2)
    ref = LogisticRegression(C=0.1).fit(X, y)
    warm = BlockSoftmax(C=0.1, warm_start=True, block_rows=500)
    warm.coef_, warm.intercept_ = ref.coef_.copy(), ref.intercept_.copy()
    warm.fit(X, y)
    assert int(warm.n_iter_[0]) <= 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        BlockSoftmax(C=10.0, max_iter=2).fit(X, y)
    assert any(issubclass(w.category, ConvergenceWarning) for w in caught)


def test_a_refit_larger_than_a_block_spreads_over_jobs_with_the_same_numbers(tmp_path, monkeypatch):
    """fit_cell's refit on train + val uses BlockSoftmax once it holds more than one block of rows:
    results equal across jobs, close to the plain (cold) path, saved as a plain LogisticRegression."""
    monkeypatch.setattr(block_softmax, "BLOCK_ROWS", 256)
    used = []
    real = BlockSoftmax.fit

    def spy(self, X, y):
        used.append((len(y), self.threads))
        return real(self, X, y)

    monkeypatch.setattr(BlockSoftmax, "fit", spy)
    path = codes(tmp_path, n=1400)
    proto = protocol_for("softmax")
    one, pipe = fit_cell(path, ["L"], proto, return_model=True, jobs=1)
    two = fit_cell(path, ["L"], proto, jobs=2)
    assert used == [(1200, 1), (1200, 2)]
    assert same_numbers(one, two)
    assert type(pipe.named_steps["clf"]) is LogisticRegression
    cold = fit_cell(path, ["L"], proto, warm=False)
    assert len(used) == 2  # the old path keeps scikit-learn's own fit
    assert cold["C"] == one["C"] and abs(cold["accuracy"] - one["accuracy"]) <= 0.01
    save_classifier(tmp_path / "m", pipe, str(path), ["L"])
    back, _ = load_classifier(str(tmp_path / "m"))
    X = np.random.default_rng(0).random((5, 64)).astype(np.float32)
    assert np.array_equal(back.predict(X), pipe.predict(X))
