"""scikit-learn's lbfgs LogisticRegression, with its loss and gradient summed over row blocks in threads.

`BlockSoftmax(C, threads=N)` minimises exactly LogisticRegression(C=C, solver="lbfgs")'s objective
(scikit-learn 1.9: the mean log-loss + ||W||^2 / (2 C n), intercept unpenalised; the multinomial
loss with one coefficient row per class, or the binomial loss with one row for two classes) with
scipy's L-BFGS-B and scikit-learn's options (maxiter, maxls 50, gtol = tol, ftol = 64 eps), using
scikit-learn's own `LinearModelLoss` for the arithmetic. The one difference: the data term is
evaluated on fixed blocks of `block_rows` rows, each a one-BLAS-thread task, and the blocks' sums
are added in block order. So a fit uses `threads` cores, yet its numbers depend only on the data
and `block_rows`, never on `threads` or the machine (a multi-threaded BLAS, by contrast, changes
its summation order with its thread count: tested on this project's OpenBLAS, `X.T @ G` differs in
the last bits between 1 and 2 threads). Against a plain LogisticRegression the solution differs by
the rounding of that summation order, which lbfgs's tolerance absorbs (tests/classifiers/test_block_softmax.py).

classify uses it for the refit on train + val at the chosen C, the one fit that otherwise runs
alone on one core while the others idle. `to_sklearn()` gives the plain LogisticRegression that
featx saves.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model._base import LinearClassifierMixin

BLOCK_ROWS = 8192  # fixed: the numbers depend on it (and on nothing about the machine)


class BlockSoftmax(LinearClassifierMixin, BaseEstimator):
    """LogisticRegression(C, solver="lbfgs") whose loss sums fixed row blocks in `threads` threads."""

    def __init__(
        self,
        C: float = 1.0,
        tol: float = 1e-4,
        max_iter: int = 100,
        warm_start: bool = False,
        threads: int = 1,
        block_rows: int = BLOCK_ROWS,
    ):
        self.C = C
        self.tol = tol
        self.max_iter = max_iter
        self.warm_start = warm_start
        self.threads = threads
        self.block_rows = block_rows

    def fit(self, X, y):
        from concurrent.futures import ThreadPoolExecutor

        from scipy import optimize
        from sklearn._loss.loss import HalfBinomialLoss, HalfMultinomialLoss
        from sklearn.linear_model._linear_loss import LinearModelLoss
        from sklearn.utils.optimize import _check_optimize_result
        from threadpoolctl import threadpool_limits

        X = np.ascontiguousarray(X, dtype=X.dtype if X.dtype in (np.float32, np.float64) else np.float64)
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        n, d = X.shape
        k = len(self.classes_)
        if k < 2:
            raise ValueError(f"needs samples of at least 2 classes; got {k}")
        binary = k == 2
        if binary:
            target = (y == self.classes_[1]).astype(X.dtype)
            loss = LinearModelLoss(base_loss=HalfBinomialLoss(), fit_intercept=True)
            w0 = np.zeros(d + 1, dtype=X.dtype)
        else:
            target = np.searchsorted(self.classes_, y).astype(X.dtype)
            loss = LinearModelLoss(base_loss=HalfMultinomialLoss(n_classes=k), fit_intercept=True)
            w0 = np.zeros((k, d + 1), order="F", dtype=X.dtype)
        if self.warm_start and hasattr(self, "coef_"):
            start = np.hstack([np.atleast_2d(self.coef_), np.reshape(self.intercept_, (-1, 1))])
            w0[...] = start[0] if binary else start
        if not binary:
            w0 = w0.ravel(order="F")
        l2 = 1.0 / (self.C * n)
        intercepts = 1 if binary else k  # w is [coef | intercept], flattened column by column (F order)
        cuts = list(range(0, n, self.block_rows)) + [n]
        blocks = [(X[a:b], target[a:b], (b - a) / n) for a, b in zip(cuts[:-1], cuts[1:])]

        def block(w, part):
            Xb, tb, share = part
            value, grad = loss.loss_gradient(w, Xb, tb, None, l2_reg_strength=0.0, n_threads=1)
            return value * share, grad * share

        pool = ThreadPoolExecutor(max(1, int(self.threads)))

        def fun(w):
            parts = list(pool.map(lambda p: block(w, p), blocks))
            value, grad = 0.0, np.zeros_like(w, dtype=np.float64)
            for v, g in parts:  # block order, whatever finished first
                value += v
                grad += g
            weights, _ = loss.weight_intercept(w)
            penalty = l2 * w
            penalty[-intercepts:] = 0.0  # the intercepts, last in either layout, are not penalised
            return value + loss.l2_penalty(weights, l2), grad + penalty

        try:
            with threadpool_limits(limits=1, user_api="blas"):
                res = optimize.minimize(
                    fun,
                    w0,
                    method="L-BFGS-B",
                    jac=True,
                    options={
                        "maxiter": self.max_iter,
                        "maxls": 50,
                        "gtol": self.tol,
                        "ftol": 64 * np.finfo(float).eps,
                    },
                )
        finally:
            pool.shutdown()
        self.n_iter_ = np.array([_check_optimize_result("lbfgs", res, self.max_iter)])
        w = res.x.astype(X.dtype)
        if binary:
            self.coef_, self.intercept_ = w[None, :d].copy(), w[d:].copy()
        else:
            W = w.reshape((k, d + 1), order="F")
            self.coef_, self.intercept_ = np.ascontiguousarray(W[:, :d]), W[:, d].copy()
        self.n_features_in_ = d
        return self

    def predict_proba(self, X):
        return self.to_sklearn().predict_proba(X)

    def to_sklearn(self):
        """The fitted solution as a plain LogisticRegression (what featx saves and predicts with)."""
        return as_logistic_regression(self)


def as_logistic_regression(est):
    """A fitted LogisticRegression holding a softmax solver's solution (BlockSoftmax, TorchSoftmax)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=est.C, tol=est.tol, max_iter=est.max_iter)
    for a in ("classes_", "coef_", "intercept_", "n_features_in_", "n_iter_"):
        setattr(clf, a, getattr(est, a))
    return clf
