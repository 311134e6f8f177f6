"""Straightforward versions of featx.classifiers.scores' metrics, written from the published algorithms as their
reference implementations compute them: a full eigendecomposition (or pseudo-inverse) of the D x D
matrix and a loop over classes. Slow; used as the yardstick in benchmarks/score_speed.py and as the
ground truth in tests/classifiers/test_scores.py.

- `logme_reference`: LogME by the fixed-point updates of thuml/LogME's `_fit_fixed_point` (MIT), the
  spectrum from the eigendecomposition of F^T F (N > D) or the SVD of F, rank k = #(s > 1e-10).
  `pad=False` keeps the reference's log-determinant over the k nonzero eigenvalues only (its N <= D
  quirk, thuml/LogME issue #23); `pad=True` (default) sums over all D as the paper's evidence does.
- `hscore_reference`: the regularised H-score as thuml's Transfer-Learning-Library computes it:
  scikit-learn's LedoitWolf covariance, np.cov (1/(N-1)) of the class-mean features, pinv.
- `transrate_reference`: TransRate with a D x D log-determinant per class, eps 1e-4.
- `gbc_reference`: GBC as google-research's stable_transfer computes it: scikit-learn's PCA (full
  SVD) to 64 components, per-class np.var floored at 1e-4, a double loop over ordered class pairs.
"""

from __future__ import annotations

import numpy as np


def logme_reference(X: np.ndarray, y: np.ndarray, pad: bool = True) -> float:
    f = np.asarray(X, dtype=np.float64)
    n, d = f.shape
    if n > d:
        s2, v = np.linalg.eigh(f.T @ f)
        s2, v = s2[::-1], v[:, ::-1]
        s = np.sqrt(np.clip(s2, 0, None))
        k = int((s > 1e-10).sum())
        u = (f @ v[:, :k]) / s[:k]
        s = s[:k]
    else:
        u, s, _ = np.linalg.svd(f, full_matrices=False)
        k = int((s > 1e-10).sum())
        u, s = u[:, :k], s[:k]
    sigma = s**2
    sigma_all = np.concatenate([sigma, np.zeros(d - k)]) if pad else sigma
    evidences = []
    for c in range(int(y.max()) + 1):
        yc = (y == c).astype(np.float64)
        x = u.T @ yc
        x2 = x**2
        res_x2 = yc @ yc - x2.sum()
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = (sigma / (sigma + t)).sum()
            m2 = (sigma * x2 / (t + sigma) ** 2).sum()
            res2 = (x2 / (1 + sigma / t) ** 2).sum() + res_x2
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        evidence = (
            d / 2 * np.log(alpha)
            + n / 2 * np.log(beta)
            - 0.5 * np.log(alpha + beta * sigma_all).sum()
            - beta / 2 * res2
            - alpha / 2 * m2
            - n / 2 * np.log(2 * np.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def hscore_reference(X: np.ndarray, y: np.ndarray) -> float:
    from sklearn.covariance import LedoitWolf

    f = np.asarray(X, dtype=np.float64)
    f = f - f.mean(axis=0, keepdims=True)
    lw = LedoitWolf(assume_centered=False).fit(f)
    g = np.zeros_like(f)
    for c in range(int(y.max()) + 1):
        g[y == c] = f[y == c].mean(axis=0)
    covg = np.cov(g, rowvar=False)
    return float(np.trace(np.linalg.pinv(lw.covariance_, rcond=1e-15) @ ((1 - lw.shrinkage_) * covg)))


def _coding_rate(f: np.ndarray, eps: float) -> float:
    n, d = f.shape
    return 0.5 * float(np.linalg.slogdet(np.eye(d) + f.T @ f / (n * eps))[1])


def transrate_reference(X: np.ndarray, y: np.ndarray, eps: float = 1e-4) -> float:
    f = np.asarray(X, dtype=np.float64)
    f = f - f.mean(axis=0, keepdims=True)
    classes = range(int(y.max()) + 1)
    return _coding_rate(f, eps) - float(np.mean([_coding_rate(f[y == c], eps) for c in classes]))


def gbc_reference(X: np.ndarray, y: np.ndarray, dims: int = 64) -> float:
    from sklearn.decomposition import PCA

    f = np.asarray(X, dtype=np.float64)
    f = PCA(n_components=min(dims, *f.shape), svd_solver="full").fit_transform(f)
    stats = [(f[y == c].mean(axis=0), np.maximum(f[y == c].var(axis=0), 1e-4)) for c in np.unique(y)]
    total = 0.0
    for i, (mi, vi) in enumerate(stats):
        for j, (mj, vj) in enumerate(stats):
            if i != j:
                s = (vi + vj) / 2
                d_b = np.sum((mi - mj) ** 2 / s) / 8 + 0.5 * (
                    np.sum(np.log(s)) - 0.5 * np.sum(np.log(vi)) - 0.5 * np.sum(np.log(vj))
                )
                total += np.exp(-d_b)
    return float(-total)


REFERENCES = {
    "logme": logme_reference,
    "hscore": hscore_reference,
    "transrate": transrate_reference,
    "gbc": gbc_reference,
}
