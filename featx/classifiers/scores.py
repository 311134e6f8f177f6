"""Label-aware transferability scores of one feature matrix: how well a layer's codes fit the labels,
in seconds, without fitting a probe. Higher is better for every score; they rank layers or models on
the same data and mean nothing across datasets.

- `logme`: LogME (You et al. 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer
  Learning"): the log marginal likelihood per sample of Bayesian linear regression from the codes to
  each one-hot label column, with the prior precision alpha and noise precision beta maximised by the
  fixed-point updates of You et al. 2022 (thuml/LogME's default `_fit_fixed_point`: at most 11 steps,
  stop when alpha/beta moves less than 0.1%), averaged over classes. One correction to the reference
  code: log|alpha I + beta F^T F| runs over all D eigenvalues (thuml/LogME issue #23), so results
  equal the reference's whenever N > D with full-rank codes and differ from it when N <= D.
- `hscore`: H-score (Bao et al. 2019, "An Information-theoretic Approach to Transferability in Task
  Transfer Learning"), tr(cov(f)^-1 cov(E[f|y])), with the covariance shrunk by Ledoit-Wolf:
  (1 - a) tr(cov_a(f)^-1 cov(E[f|y])), cov_a = (1 - a) cov + a (tr(cov) / D) I, a the Ledoit-Wolf
  shrinkage; this is the regularised H-score of Ibrahim et al. 2022 ("Newer is not always better"),
  which stays finite for the rank-deficient covariances of wide layers, where the plain inverse
  does not exist. Covariances are the 1/N (maximum-likelihood) ones.
- `transrate`: TransRate (Huang et al. 2022, "Frustratingly Easy Transferability Estimation"):
  R(f) - mean_c R(f_c), R(Z) = 1/2 log det(I + Z^T Z / (n eps)), eps = 1e-4, on codes centred by
  their mean: how much the classes compress the codes' coding rate.
- `gbc`: Gaussian Bhattacharyya Coefficient (Pandy et al. 2022, "Transferability Estimation using
  Bhattacharyya Class Separability"), as google-research's stable_transfer reference computes it for
  classification: the centred codes projected on their top `GBC_DIMS` (64) principal components
  (fewer when D or N is smaller), each class a diagonal Gaussian (its mean and 1/N per-dimension
  variance, floored at 1e-4), and GBC = -sum over ordered class pairs i != j of exp(-D_B(i, j)),
  D_B = 1/8 sum (mu_i - mu_j)^2 / s + 1/2 sum log(s / sqrt(s_i s_j)), s = (s_i + s_j) / 2. At most 0
  (no overlap); the principal components come from the same banded reduction (a banded
  eigen-solve of the top 64 only).

Speed: the straightforward versions eigendecompose a D x D matrix (and LogME then loops over classes
in that eigenbasis); at D = 2048 the eigendecomposition alone takes seconds, because its reduction
to tridiagonal form runs at matrix-vector speed. Here the covariance is reduced once to a banded
matrix B = Q^T cov Q by blocked Householder reflections (matrix-matrix speed); the eigenvalues of B
come from LAPACK's banded solver and every per-class quantity from banded Cholesky solves (LogME's
uncentred F^T F is B plus a rank-one term, handled by Sherman-Morrison), so the answers are exact
and nothing is approximated. `benchmarks/score_speed.py` measures both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from featx.errors import FeatxError, UsageError, first_line

METRICS = ("logme", "hscore", "transrate", "gbc")
TRANSRATE_EPS = 1e-4
GBC_DIMS = 64  # principal components GBC models the classes in
GBC_VAR_FLOOR = 1e-4  # the reference's floor on a per-dimension variance
MAX_DIM = 8192  # a D x D float64 covariance of 0.5 GiB, and a few copies of it
# bandwidth of the reduced covariance: wide enough for matrix-matrix speed, narrow for cheap solves
_BAND = 64
_DENSE_MAX = 256  # below this dimension a plain eigendecomposition is the fastest route


def parse_metrics(text: str | Sequence[str] | None) -> list[str]:
    """`logme,hscore` (or a list) -> validated metric names; None or `all` -> every metric."""
    if text is None or text == "all":
        return list(METRICS)
    names = [m.strip().lower() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    if not names:
        raise UsageError(f"--metric is empty; use one or more of {', '.join(METRICS)}")
    for m in names:
        if m not in METRICS:
            raise UsageError(f"--metric {m!r}: unknown score; use one or more of {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def score(
    X: np.ndarray,
    y: np.ndarray,
    metrics: Sequence[str] = METRICS,
    precision: str = "float64",
    errors: dict | None = None,
) -> dict[str, float | None]:
    """Every score in `metrics` of codes X [N, D] for labels y [N] (any integer class ids).

    A metric that is numerically undefined on these codes raises FeatxError, or, when an `errors`
    dict is given, scores None with its one-line reason in `errors[metric]`.

    `precision` is that of the covariance product, the one step of size N x D x D: float64 (default)
    is exact to rounding; float32 halves its time but accumulates rounding over N rows: 1e-8 on codes
    with a well-spread spectrum, but LogME moved by 0.3% and 19% on two nearly rank-deficient test
    matrices, so it is for benchmarks, not the default."""
    metrics = parse_metrics(list(metrics))
    X = np.asarray(X)
    if X.ndim != 2 or len(X) != len(y):
        raise FeatxError(f"codes of shape {X.shape} do not match {len(y)} labels")
    classes, y = np.unique(np.asarray(y), return_inverse=True)
    if len(classes) < 2:
        raise FeatxError("scores need two or more classes among the rows scored")
    if X.shape[1] > MAX_DIM:
        raise FeatxError(
            f"codes of {X.shape[1]} dims: scores need a D x D covariance "
            f"({X.shape[1] ** 2 * 8 / 2**30:.1f} GiB), featx scores up to {MAX_DIM} dims; "
            f"extract the layer pooled (--pool avg) or score another layer"
        )
    if not np.isfinite(X).all():
        raise FeatxError("the codes hold NaN or infinite values; scores need finite codes")
    if precision not in ("float64", "float32"):
        raise UsageError(f"precision {precision!r}: use float64 or float32")
    failures = (np.linalg.LinAlgError, ValueError, FloatingPointError, FeatxError)
    out, spec, broken = {}, None, None
    try:
        with np.errstate(all="ignore"):
            spec = _Spectrum(X.astype(precision, copy=False))
    except failures as e:  # degenerate codes: no metric has its covariance, each fails for that reason
        broken = e
    for m in metrics:
        try:
            if broken is not None:
                raise broken
            with np.errstate(all="ignore"):
                value = float(_SCORES[m](spec, y, len(classes)))
            if not np.isfinite(value):
                raise FloatingPointError(f"the result is {value}")
        except failures as e:
            # degenerate codes (dead channels, a random-init layer on a few rows): this metric only
            problem = FeatxError(f"{m} is not defined on these codes ({first_line(e)})")
            if errors is None:
                raise problem from None
            errors[m], value = str(problem), None
        out[m] = value
    return out


class _Spectrum:
    """The centred codes' covariance S = Xc^T Xc / N in a banded basis: S = Q B Q^T, B's eigenvalues."""

    def __init__(self, X: np.ndarray):
        self.n, self.d = X.shape
        self.mean = X.mean(axis=0, dtype=np.float64)
        self.Xc = X - self.mean.astype(X.dtype)
        S = (self.Xc.T @ self.Xc).astype(np.float64) / self.n
        self.S = (S + S.T) / 2
        if self.d <= _DENSE_MAX:
            lam, V = np.linalg.eigh(self.S)
            self.band, self._V, self._panels = lam[None, :], V, None
        else:
            B, self._panels = _band_reduce(self.S, _BAND)
            self.band, self._V = _lower_band(B, _BAND), None
        import scipy.linalg as sl

        self.eigvals = (
            self.band[0].copy() if self.band.shape[0] == 1 else sl.eigvals_banded(self.band, lower=True)
        )
        # S is PSD; rounding leaves its null space at +-(rounding level), below zero too
        self._rounding = max(0.0, -float(self.eigvals.min())) + 1e-14 * max(float(self.eigvals.max()), 1e-300)
        self.eigvals = np.clip(self.eigvals, 0.0, None)

    def to_basis(self, Z: np.ndarray) -> np.ndarray:
        """Q^T Z for Z [D, k]."""
        if self._V is not None:
            return self._V.T @ Z
        Z = np.array(Z, dtype=np.float64, copy=True)
        for s, V, T in self._panels:
            Z[s:] -= V @ (T.T @ (V.T @ Z[s:]))
        return Z

    def top_components(self, k: int) -> np.ndarray:
        """The covariance's k leading eigenvectors [D, k] (principal axes), largest first."""
        if self._V is not None:
            return self._V[:, ::-1][:, :k]
        import scipy.linalg as sl

        # LAPACK's selected-eigenvector path on the dense S: 0.3 s for 64 of 2,048 on 2 cores, where
        # eig_banded's (dsbevx) forms the whole reduction's Q first (1.5-2 s)
        _, v = sl.eigh(self.S, subset_by_index=[self.d - k, self.d - 1], driver="evx")
        return v[:, ::-1]

    def solver(self, scale: float, shift: float):
        """x -> (scale B + shift I)^-1 x, and log det(scale B + shift I)."""
        ab = self.band * scale
        ab[0] += shift
        if ab.shape[0] == 1:
            return (lambda r: r / ab[0][:, None]), float(np.log(ab[0]).sum())
        import scipy.linalg as sl

        try:
            cb = sl.cholesky_banded(ab, lower=True)
        except np.linalg.LinAlgError:
            # a shift below the rounding level of a rank-deficient S (dead channels, N <= D, float32):
            # lift it just above, so that the solve sees the PSD matrix S is
            ab[0] += 2 * scale * self._rounding
            try:
                cb = sl.cholesky_banded(ab, lower=True)
            except np.linalg.LinAlgError:
                raise FeatxError(
                    "the codes' covariance is numerically singular; no score is defined"
                ) from None
        return (lambda r: sl.cho_solve_banded((cb, True), r)), float(2.0 * np.log(cb[0]).sum())


def _band_reduce(A: np.ndarray, b: int):
    """Q^T A Q = B with bandwidth b, by blocked Householder reflections (LAPACK's sy2sb step, in numpy).
    Returns B and Q as panels (row offset s, reflectors V, triangular factor T): Q_k = I - V T V^T."""
    A = np.array(A, dtype=np.float64, copy=True)
    n = len(A)
    panels = []
    for k in range(0, n - b - 1, b):
        s = k + b
        h, tau = np.linalg.qr(A[s:, k:s], mode="raw")
        qr = h.T
        w = min(qr.shape)
        V = np.tril(qr[:, :w], -1)
        V[np.arange(w), np.arange(w)] = 1.0
        VtV = V.T @ V
        T = np.zeros((w, w))
        for i in range(w):  # LAPACK's larft: the compact-WY factor of H_1 ... H_w
            T[i, i] = tau[i]
            T[:i, i] = -tau[i] * (T[:i, :i] @ VtV[:i, i])
        A[s:, k:s] = 0.0
        A[s : s + w, k:s] = np.triu(qr[:w, :])
        A[k:s, s:] = A[s:, k:s].T
        A22 = A[s:, s:]  # H^T A22 H = A22 - Y V^T - V Y^T
        W = (A22 @ V) @ T
        Y = W - 0.5 * V @ (T.T @ (V.T @ W))
        A22 -= np.hstack([Y, V]) @ np.hstack([V, Y]).T  # one product: one pass over A22
        panels.append((s, V, T))
    return A, panels


def _lower_band(B: np.ndarray, b: int) -> np.ndarray:
    """LAPACK lower band storage: ab[i, j] = B[i + j, j]."""
    n = len(B)
    ab = np.zeros((b + 1, n))
    for i in range(b + 1):
        ab[i, : n - i] = np.diagonal(B, -i)
    return ab


def _class_sums(X: np.ndarray, y: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class row counts [C] and column sums [D, C] (one matrix product, no per-class loop)."""
    onehot = np.zeros((len(y), c), dtype=X.dtype)
    onehot[np.arange(len(y)), y] = 1.0
    return onehot.sum(axis=0).astype(np.float64), (X.T @ onehot).astype(np.float64)


def _logme(spec: _Spectrum, y: np.ndarray, c: int) -> float:
    n, d = spec.n, spec.d
    counts, centred_sums = _class_sums(spec.Xc, y, c)
    # F^T y_c for the uncentred codes F = Xc + 1 mean^T, and F^T F = N (S + mean mean^T)
    Z = spec.to_basis(centred_sums + np.outer(spec.mean, counts))
    u = np.sqrt(n) * spec.to_basis(spec.mean[:, None])[:, 0]
    lam = spec.eigvals * n

    def at(t: float, z: np.ndarray):
        """(G + tI)^-1 z, tr (G + tI)^-1 and log det (G + tI) for G = F^T F, in the banded basis."""
        solve, logdet = spec.solver(n, t)
        sol = solve(np.column_stack([z, u]))
        Az, Au = sol[:, 0], sol[:, 1]
        denom = 1.0 + u @ Au
        m = Az - Au * ((u @ Az) / denom)  # Sherman-Morrison for the rank-one mean term
        trace = float((1.0 / (lam + t)).sum() - (Au @ Au) / denom)
        return m, trace, logdet + float(np.log(denom))

    evidences = []
    for k in range(c):
        z = Z[:, k]
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            m, trace, _ = at(t, z)
            gamma = d - t * trace
            m2 = float(m @ m)
            res2 = counts[k] - float(z @ m) - t * m2  # ||y - F m||^2, with m^T G m = z^T m - t m^T m
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        logdet = at(alpha / beta, z)[2] + d * np.log(beta)  # log det(alpha I + beta G)
        ev = (
            d / 2 * np.log(alpha)
            + n / 2 * np.log(beta)
            - logdet / 2
            - beta / 2 * res2
            - alpha / 2 * m2
            - n / 2 * np.log(2 * np.pi)
        )
        evidences.append(ev / n)
    return float(np.mean(evidences))


def ledoit_wolf_shrinkage(Xc: np.ndarray, S: np.ndarray) -> float:
    """Ledoit-Wolf's shrinkage for centred X [N, D] with covariance S = Xc^T Xc / N (scikit-learn's
    formula; its sum over (X^2)^T X^2 is the sum of squared squared row norms)."""
    n, d = Xc.shape
    mu = np.trace(S) / d
    row_sq = np.einsum("ij,ij->i", Xc, Xc, dtype=np.float64)
    beta_ = float(row_sq @ row_sq)
    delta_ = float((S * S).sum())
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * np.trace(S) + d * mu**2) / d
    beta = min(beta, delta)
    return 0.0 if beta == 0 else float(beta / delta)


def _hscore(spec: _Spectrum, y: np.ndarray, c: int) -> float:
    counts, sums = _class_sums(spec.Xc, y, c)
    mu = float(np.trace(spec.S)) / spec.d
    if mu == 0:  # constant codes carry no information
        return 0.0
    a = ledoit_wolf_shrinkage(spec.Xc, spec.S)
    means = spec.to_basis(sums / counts)  # class means of the centred codes, in the banded basis
    solve, _ = spec.solver(1.0 - a, a * mu)
    p = counts / spec.n
    return float((1.0 - a) * np.einsum("ij,ij,j->", means, solve(means), p))


def _transrate(spec: _Spectrum, y: np.ndarray, c: int, eps: float = TRANSRATE_EPS) -> float:
    whole = 0.5 * float(np.log1p(spec.eigvals / eps).sum())
    parts = []
    for k in range(c):
        f = spec.Xc[y == k]
        nk = len(f)
        # det(I + f^T f / (n eps)) = det(I + f f^T / (n eps)): factor the smaller Gram matrix
        gram = (f @ f.T if nk < spec.d else f.T @ f).astype(np.float64) / (nk * eps)
        gram[np.diag_indices_from(gram)] += 1.0
        try:
            L = np.linalg.cholesky(gram)
        except np.linalg.LinAlgError:
            raise FeatxError("a class's codes have a non-positive Gram matrix; no score is defined") from None
        parts.append(float(np.log(np.diagonal(L)).sum()))  # 1/2 log det = sum log diag(L)
    return whole - float(np.mean(parts))


def _gbc(spec: _Spectrum, y: np.ndarray, c: int) -> float:
    k = min(GBC_DIMS, spec.d, spec.n)
    P = spec.Xc @ spec.top_components(k).astype(spec.Xc.dtype)  # [N, k], principal-component scores
    groups = [P[y == i].astype(np.float64) for i in range(c)]
    means = [g.mean(axis=0) for g in groups]
    var = [np.maximum(g.var(axis=0), GBC_VAR_FLOOR) for g in groups]  # 1/N variance per dimension
    total = 0.0
    for i in range(c):
        for j in range(i + 1, c):
            s = (var[i] + var[j]) / 2
            d_b = ((means[i] - means[j]) ** 2 / s).sum() / 8 + 0.5 * (
                np.log(s).sum() - 0.5 * np.log(var[i]).sum() - 0.5 * np.log(var[j]).sum()
            )
            total += 2.0 * np.exp(-d_b)  # D_B is symmetric: (i, j) and (j, i) alike
    return 0.0 - total  # not -0.0 when no classes overlap


_SCORES = {"logme": _logme, "hscore": _hscore, "transrate": _transrate, "gbc": _gbc}


# -- codes files ---------------------------------------------------------------------------------


def training_rows(f) -> np.ndarray:
    """The rows a probe trains on (the `train` split, as classify.select_rows takes them before any
    subsampling or hold-out); scores never see validation or test rows."""
    rows = np.flatnonzero(f.split == "train")
    if not len(rows):
        present = [s for s in ("train", "val", "test") if (f.split == s).any()]
        raise FeatxError(
            f"{f.path} has no train split (splits: {', '.join(present) or 'none'}); scores use "
            f"training images only: extract data with a train split, or without splits"
        )
    return rows


def _layer_names(f, layers: str | Sequence[str] | None) -> list[str]:
    if layers in (None, "all"):
        return list(f.layers)
    names = [x.strip() for x in layers.split(",")] if isinstance(layers, str) else list(layers)
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise UsageError("--layer is empty; name layers of the file (featx info FILE lists them), or all")
    for n in names:
        if n not in f.layers:
            raise UsageError(f"--layer {n!r}: {f.path} has no such layer; it holds {', '.join(f.layers)}")
    return names


def score_file(
    path: str, layers: str | Sequence[str] | None = None, metrics: Sequence[str] = METRICS
) -> dict:
    """Every score of every (or each named) layer of a codes file, on its training rows.

    Returns a plain dict: the file, model, weights, dataset, the training rows' count and class
    count, and per layer its name, relative depth, dim, scores and seconds."""
    import time

    from featx.store.codes import CodesFile

    metrics = parse_metrics(list(metrics))
    with CodesFile(path) as f:
        f.require_labels("score")
        names = _layer_names(f, layers)
        rows = training_rows(f)
        y = f.labels[rows]
        out = {
            "file": f.path,
            "model": f.attrs.get("model"),
            "weights": f.attrs.get("weights"),
            "dataset": f.attrs.get("dataset"),
            "rows": int(len(rows)),
            "classes": int(len(np.unique(y))),
            "train_sha256": _rows_digest([f.paths[i] for i in rows], y),
            "layers": [],
        }
        for name in names:
            t0 = time.perf_counter()
            errors: dict[str, str] = {}
            values = score(f.codes(name, rows), y, metrics, errors=errors)
            depth = f.layer_attrs(name).get("depth")
            out["layers"].append(
                {
                    "layer": name,
                    "depth": depth if isinstance(depth, (int, float)) else None,
                    "dim": f.dim(name),
                    "scores": values,
                    "errors": errors,
                    "seconds": round(time.perf_counter() - t0, 3),
                }
            )
    return out


def _rows_digest(ids: list[str], labels: np.ndarray) -> str:
    """Which images, in which order, with which labels: equal digests mean the same training data."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps([ids, [int(v) for v in labels]]).encode()).hexdigest()


def rank_models(results: Sequence[dict], metrics: Sequence[str]) -> dict[str, list[dict]]:
    """Per metric, the files (models) ordered by their best layer's score, best first. The files must
    hold the same training images with the same labels: a score compares models on one data set only."""
    first = results[0]
    for r in results[1:]:
        if r["train_sha256"] != first["train_sha256"]:
            raise UsageError(
                f"{r['file']} and {first['file']} hold different training images or labels; "
                f"featx score ranks models extracted from the same data only"
            )
    ranking = {}
    for m in metrics:
        scored = [(r, [ly for ly in r["layers"] if ly["scores"][m] is not None]) for r in results]
        best = [(max(layers, key=lambda ly: ly["scores"][m]), r) for r, layers in scored if layers]
        best.sort(key=lambda br: -br[0]["scores"][m])
        ranking[m] = [
            {
                "file": r["file"],
                "model": r["model"],
                "weights": r["weights"],
                "layer": ly["layer"],
                "score": ly["scores"][m],
            }
            for ly, r in best
        ]
    return ranking
