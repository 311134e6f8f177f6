"""featx.sources.neighbours: the approximate searches against the exact ones, on codes with planted
near-copies (as benchmarks/near_duplicates_speed.py, smaller), and which method `auto` picks."""

import numpy as np
import pytest

from featx.sources import neighbours
from featx.sources.autogroups import auto_groups


def _planted(n, dims=256, seed=0, classes=8):
    """ReLU'd codes of a low-rank latent with per-dimension noise; 30% of rows are near-copies of
    another row (cosine 0.8-0.997 to it), so many pairs sit around 0.9."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((32, dims)).astype(np.float32) / np.sqrt(32)
    y = rng.integers(0, classes, n)
    means = rng.standard_normal((classes, 32)).astype(np.float32)
    pre = (means[y] + rng.standard_normal((n, 32)).astype(np.float32)) @ w
    pre += 0.7 * rng.standard_normal((n, dims)).astype(np.float32)
    k = int(0.3 * n)
    copies = rng.choice(n, k, replace=False)
    src = rng.choice(np.setdiff1d(np.arange(n), copies), k)
    pre[copies] = pre[src] + rng.uniform(0.15, 1.0, (k, 1)).astype(np.float32) * rng.standard_normal(
        (k, dims)
    ).astype(np.float32)
    y[copies] = y[src]
    return np.maximum(pre, 0), y


def _set(pairs):
    return set(map(tuple, pairs.tolist()))


def test_approximate_pairs_find_the_exact_pairs_and_nothing_else():
    x, _ = _planted(2500)
    for t in (0.85, 0.9, 0.95):
        exact = neighbours.similar_pairs(x, t, method="exact")
        approx = neighbours.similar_pairs(x, t, method="approximate")
        assert len(exact) > 150
        assert _set(approx) <= _set(exact)  # every similarity is exact: no false pair
        assert len(approx) >= 0.995 * len(exact)
        assert np.all(approx[:, 0] < approx[:, 1]) and np.array_equal(approx, np.unique(approx, axis=0))


def test_approximate_pairs_are_deterministic_and_groups_match():
    x, _ = _planted(2000, seed=1)
    a = neighbours.similar_pairs(x, 0.9, method="approximate")
    assert np.array_equal(a, neighbours.similar_pairs(x, 0.9, method="approximate"))
    ga = auto_groups(x, 0.9, method="approximate")
    ge = auto_groups(x, 0.9, method="exact")
    assert np.array_equal(ga, auto_groups(x, 0.9, method="approximate"))
    same = np.mean(ga[:, None] == ga[None, :]) / np.mean(ge[:, None] == ge[None, :])
    assert same > 0.999


@pytest.mark.parametrize("skip", [False, True])
def test_approximate_nearest_agrees_with_exact(skip):
    x, y = _planted(3000, seed=2)
    q, r = x[:800], x[800:]
    keys = (y[:800], y[800:]) if skip else None
    ie, se = neighbours.nearest(q, r, skip=keys, method="exact")
    ia, sa = neighbours.nearest(q, r, skip=keys, method="approximate")
    assert np.mean(ia == ie) > 0.98
    assert np.all(sa <= se + 1e-5) and np.max(se - sa) < 0.05  # the similarity returned is exact
    u = neighbours.normalise(x)
    assert np.allclose(sa, np.einsum("ij,ij->i", u[:800], u[800:][ia]), atol=1e-5)
    i_self, s_self = neighbours.nearest(x[:1500], method="approximate")
    assert np.all(i_self != np.arange(1500))
    assert np.mean(i_self == neighbours.nearest(x[:1500], method="exact")[0]) > 0.98


def test_approximate_nearest_with_few_candidates_and_none():
    x = np.abs(np.random.default_rng(3).standard_normal((40, 300))).astype(np.float32)
    keys = np.zeros(40)
    keys[:3] = 1  # queries keyed 1: only the 37 rows keyed 0 are candidates
    i, s = neighbours.nearest(x[:3], x, skip=(np.ones(3), keys), method="approximate")
    assert np.all(keys[i] == 0) and np.array_equal(
        i, neighbours.nearest(x[:3], x, skip=(np.ones(3), keys))[0]
    )
    i, s = neighbours.nearest(x[:3], x[:3], skip=(np.ones(3), np.ones(3)), method="approximate")
    assert np.all(i == -1) and np.all(np.isnan(s))


def test_auto_picks_exact_for_small_inputs():
    x, _ = _planted(500)
    assert np.array_equal(neighbours.similar_pairs(x, 0.9), neighbours.similar_pairs(x, 0.9, method="exact"))
    with pytest.raises(ValueError, match="method must be one of"):
        neighbours.similar_pairs(x, 0.9, method="fast")
    basis = neighbours.projection(neighbours.normalise(x), 64)
    assert basis.shape == (256, 64) and np.allclose(basis.T @ basis, np.eye(64), atol=1e-4)
