"""featx.stats against hand-computed values."""

import math

import numpy as np
import pytest

from featx.stats import mcnemar_exact, wilson_interval


@pytest.mark.parametrize(
    "k,n,low,high",
    [
        (5, 10, 0.2366, 0.7634),  # symmetric around 1/2
        (9, 10, 0.5958, 0.9821),
        (0, 10, 0.0, 0.2775),  # the normal interval would be [0, 0]
        (10, 10, 0.7225, 1.0),
        (95, 100, 0.8882, 0.9785),
    ],
)
def test_wilson_interval_matches_hand_computed_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_interval_formula_by_hand():
    # k = 3, n = 20, z = 1.96: centre = (0.15 + 1.9208/20) / (1 + 3.8416/20), half = 1.96 sqrt(...) / (...)
    z = 1.96
    p, n = 0.15, 20
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo, hi = wilson_interval(3, 20, z=1.96)
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_mcnemar_exact_on_hand_made_pairs():
    # 7 discordant images: A alone right on 1, B alone right on 6: p = 2 * (C(7,0) + C(7,1)) / 2^7 = 0.125
    a = np.array([1, 0, 0, 0, 0, 0, 0, 1, 1, 0], bool)
    b = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 0], bool)
    r = mcnemar_exact(a, b)
    assert (r.a_only, r.b_only, r.n_discordant) == (1, 6, 7)
    assert r.p == pytest.approx(0.125)
    assert mcnemar_exact(b, a).p == pytest.approx(0.125)  # symmetric
    # 0 vs 5: p = 2 / 32
    assert mcnemar_exact(np.zeros(5, bool), np.ones(5, bool)).p == pytest.approx(0.0625)
    # identical classifiers: nothing to tell apart
    same = np.array([1, 0, 1], bool)
    assert mcnemar_exact(same, same).p == 1.0
    # balanced disagreement is no evidence: p is capped at 1
    assert mcnemar_exact([1, 0], [0, 1]).p == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact([1, 0], [1])
