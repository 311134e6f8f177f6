"""Uncertainty of a measured accuracy, and whether two classifiers differ beyond noise.

Every accuracy featx reports is a proportion of a finite test set, so it carries a binomial error.
The Wilson score interval is used for it (it stays inside [0, 1] and keeps its coverage near 0 and 1
and for small n, where the normal "p ± 1.96 sqrt(p(1-p)/n)" interval fails). Two classifiers
evaluated on the *same* test images are compared with the exact McNemar test on the images where
exactly one of them is right: the paired test, which is far more sensitive than comparing two
intervals, because both share each image's difficulty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the two-sided 95% normal quantile


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of `correct` successes out of `n` (95% by default)."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in [0, {n}], got {correct}")
    p = correct / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Paired:
    """McNemar on one test set: `a_only` images only A gets right, `b_only` only B; `p` two-sided."""

    a_only: int
    b_only: int
    p: float

    @property
    def n_discordant(self) -> int:
        return self.a_only + self.b_only


def mcnemar_exact(a_correct, b_correct) -> Paired:
    """The exact (binomial) McNemar test of two classifiers' per-image correctness on the same images."""
    from scipy.stats import binom

    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"need two equal-length 1-d vectors of per-image correctness, got {a.shape} and {b.shape}"
        )
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    n = a_only + b_only
    p = 1.0 if n == 0 else min(1.0, 2.0 * float(binom.cdf(min(a_only, b_only), n, 0.5)))
    return Paired(a_only, b_only, p)


def pack_correct(correct) -> str:
    """Per-image correctness on a test set as a compact hex string (1 bit an image), so that
    results can be compared image by image later (`unpack_correct`)."""
    return np.packbits(np.asarray(correct, dtype=bool)).tobytes().hex()


def unpack_correct(text: str, n: int) -> np.ndarray:
    """The boolean vector `pack_correct` stored, for `n` test images."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(bool)
