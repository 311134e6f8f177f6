"""Multinomial logistic regression solved by torch (L-BFGS, float32, full batch), on the CPU or a GPU.

`TorchSoftmax(C)` minimises exactly scikit-learn's LogisticRegression(C=C) objective (sklearn 1.9,
`sklearn/linear_model/_logistic.py`, lbfgs): scaled by 1 / (C n),

    mean over rows of the log-loss + ||W||^2 / (2 C n),     intercept unpenalised,

with the multinomial loss and one coefficient row per class for three or more classes, and the
binomial loss with one row (classes_[1] positive) for two, as scikit-learn does. It stops like
scikit-learn's lbfgs: when the largest gradient component of that objective is at most `tol`
(1e-4), or after `max_iter` iterations (then a ConvergenceWarning, which featx counts). Solved in
float32 with torch.optim.LBFGS (strong-Wolfe line search, 10 correction pairs as scipy's
L-BFGS-B), so the solution differs from scikit-learn's by what the tolerance and float32 allow
(tests/classifiers/test_torch_softmax.py bounds it). `warm_start=True` starts from `coef_`/`intercept_`,
which is how classify walks the C grid.

Prediction is scikit-learn's arithmetic on the solution (numpy, `LinearClassifierMixin`), and
`to_sklearn()` turns the fitted estimator into a plain LogisticRegression with the same arrays:
the pipelines featx saves hold that, so saved files, `predict` and reports do not know the solver.

`resolve_solver` decides what `--solver auto` means: torch when softmax fits on a CUDA device
(`--device auto` with CUDA present, or `--device cuda[:N]`), else scikit-learn, so CPU runs give
exactly today's numbers.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model._base import LinearClassifierMixin

from featx.errors import UsageError
from featx.settings import SOLVERS

MAX_EVAL = 15000  # objective evaluations, scipy L-BFGS-B's default maxfun (line searches included)


def fit_device(device: str | None) -> str:
    """The torch device a `device` option names (as `featx.engine.compute.resolve_device` reads it: auto =
    cuda if available, else cpu), limited to the devices the solver runs on."""
    from featx.engine.compute import resolve_device

    dev = resolve_device((device or "auto").strip().lower())
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: the torch solver runs on cpu or cuda")
    return str(dev)


def fit_device_is_cpu(device: str | None) -> bool:
    return fit_device(device) == "cpu"


def resolve_solver(solver: str, classifier: str, device: str | None, per_class: bool = False) -> str:
    """'sklearn' or 'torch' for `--solver` (see the module docstring)."""
    if solver not in SOLVERS:
        raise UsageError(f"--solver {solver!r}: use one of {', '.join(SOLVERS)}")
    softmax = classifier == "softmax" and not per_class
    if solver == "torch" and not softmax:
        raise UsageError(
            f"--solver torch fits softmax only; use --solver sklearn for --classifier {classifier}"
        )
    if solver == "torch":
        fit_device(device)  # a clear error now, not in the middle of a grid
    if solver != "auto":
        return solver
    if not softmax or (device or "auto").strip().lower() == "cpu":
        return "sklearn"
    return "torch" if fit_device(device).startswith("cuda") else "sklearn"


class TorchSoftmax(LinearClassifierMixin, BaseEstimator):
    """scikit-learn's LogisticRegression(C) objective solved by torch L-BFGS on `device`."""

    def __init__(
        self,
        C: float = 1.0,
        tol: float = 1e-4,
        max_iter: int = 100,
        warm_start: bool = False,
        device: str = "auto",
        history_size: int = 10,
    ):
        self.C = C
        self.tol = tol
        self.max_iter = max_iter
        self.warm_start = warm_start
        self.device = device
        self.history_size = history_size

    def fit(self, X, y):
        import torch

        X, y = np.asarray(X), np.asarray(y)
        if X.ndim != 2 or len(X) != len(y):
            raise ValueError(f"X of shape {X.shape} and y of {y.shape} rows do not match")
        classes, yi = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(f"needs two or more classes; the data has {len(classes)}")
        n, d = X.shape
        dev = torch.device(fit_device(self.device))
        Xt = torch.as_tensor(X, dtype=torch.float32).to(dev)
        yt = torch.as_tensor(yi.reshape(-1), dtype=torch.int64).to(dev)
        W = torch.zeros((1 if len(classes) == 2 else len(classes), d + 1), dtype=torch.float32, device=dev)
        if self.warm_start and getattr(self, "coef_", None) is not None and self.coef_.shape == (len(W), d):
            W[:, :d] = torch.as_tensor(np.asarray(self.coef_, dtype=np.float32))
            W[:, d] = torch.as_tensor(np.asarray(self.intercept_, dtype=np.float32))
        W.requires_grad_(True)
        n_iter = self._solve(Xt, yt, W, 1.0 / (self.C * n))
        self.classes_ = classes
        self.coef_ = W[:, :d].detach().cpu().numpy().copy()
        self.intercept_ = W[:, d].detach().cpu().numpy().copy()
        self.n_features_in_ = d
        self.n_iter_ = np.array([n_iter], dtype=np.int32)
        return self

    def _solve(self, X, y, W, l2: float) -> int:
        import torch

        opt = torch.optim.LBFGS(
            [W],
            lr=1.0,
            max_iter=int(self.max_iter),
            max_eval=MAX_EVAL,
            tolerance_grad=self.tol,
            tolerance_change=1e-9,
            history_size=self.history_size,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            f = objective(X, y, W, l2)
            f.backward()
            return f

        opt.step(closure)
        n_iter = int(opt.state[W].get("n_iter", 0))
        if n_iter >= self.max_iter:
            from sklearn.exceptions import ConvergenceWarning

            warnings.warn(
                f"torch lbfgs failed to converge after {n_iter} iterations (C={self.C:g}); increase "
                f"--max-iter or scale the codes",
                ConvergenceWarning,
                stacklevel=3,
            )
        return n_iter

    def predict_proba(self, X):
        return self.to_sklearn().predict_proba(X)

    def predict_log_proba(self, X):
        return np.log(self.predict_proba(X))

    def to_sklearn(self):
        """A fitted LogisticRegression holding this solution (what featx saves and predicts with)."""
        from featx.classifiers.block_softmax import as_logistic_regression

        return as_logistic_regression(self)


def objective(X, y, W, l2: float):
    """torch: mean log-loss + l2 / 2 ||coef||^2 at W = [coef | intercept] (one row: binomial)."""
    import torch

    d = X.shape[1]
    Z = torch.addmm(W[:, d], X, W[:, :d].T)
    if W.shape[0] == 1:
        z = Z[:, 0]
        loss = torch.nn.functional.softplus(z) - y.to(z.dtype) * z
    else:
        loss = torch.logsumexp(Z, dim=1) - Z.gather(1, y[:, None])[:, 0]
    return loss.mean() + 0.5 * l2 * (W[:, :d] ** 2).sum()
