"""featx.classifiers.neardup: the nearest row, the leakage check of a split, groups of near-duplicates."""

import numpy as np
import pytest

from featx.classifiers import neardup
from featx.errors import FeatxError, UsageError


def _brute(q, r, same=False, keys=None):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    rn = r / np.linalg.norm(r, axis=1, keepdims=True)
    s = (qn @ rn.T).astype(np.float64)
    if same:
        np.fill_diagonal(s, -np.inf)
    if keys is not None:
        s[keys[0][:, None] == keys[1][None, :]] = -np.inf
    return s.argmax(1), s.max(1)


def _images(n_sources=12, copies=4, singles=20, size=32, seed=0):
    """Tiny generated RGB images: smooth random sources, near-copies (a one-pixel shift plus noise),
    and unrelated singletons; returns codes (centred pixels), the true group of each row, labels."""
    rng = np.random.default_rng(seed)

    def source():
        coarse = rng.uniform(0, 255, size=(4, 4, 3))
        return np.kron(coarse, np.ones((size // 4, size // 4, 1)))  # blocky, like a thumbnail

    rows, groups = [], []
    for g in range(n_sources):
        img = source()
        for _ in range(copies):
            shifted = np.roll(img, int(rng.integers(0, 2)), axis=1)  # 0 or 1 pixel
            rows.append(np.clip(shifted + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8))
            groups.append(g)
    for k in range(singles):
        rows.append(source().astype(np.uint8))
        groups.append(n_sources + k)
    codes = np.stack(rows).reshape(len(rows), -1).astype(np.float32) - 128.0
    groups = np.array(groups)
    return codes, groups, groups % 3


@pytest.mark.parametrize("block", [1, 3, 7, 1000])
def test_blocked_nearest_equals_brute_force(block):
    rng = np.random.default_rng(1)
    q, r = rng.standard_normal((23, 9)), rng.standard_normal((31, 9))
    i, s = neardup.nearest(q, r, block=block)
    bi, bs = _brute(q, r)
    assert np.array_equal(i, bi) and np.allclose(s, bs, atol=1e-6)
    i, s = neardup.nearest(r, block=block)  # self search: own row skipped
    bi, bs = _brute(r, r, same=True)
    assert np.array_equal(i, bi) and np.allclose(s, bs, atol=1e-6)
    assert not np.any(i == np.arange(len(r)))
    qy, ry = rng.integers(0, 3, 23), rng.integers(0, 3, 31)
    i, s = neardup.nearest(q, r, skip=(qy, ry), block=block)
    bi, bs = _brute(q, r, keys=(qy, ry))
    assert np.array_equal(i, bi) and np.allclose(s, bs, atol=1e-6)
    assert np.all(qy != ry[i])


def test_nearest_with_no_candidate_gives_minus_one_and_nan():
    x = np.eye(3)
    i, s = neardup.nearest(x, x, skip=(np.zeros(3), np.zeros(3)))
    assert i.tolist() == [-1, -1, -1] and np.isnan(s).all()
    i, s = neardup.nearest(x[:1])  # one row against itself: nothing else
    assert i.tolist() == [-1]


def test_exact_duplicates_are_one_group_and_the_rest_alone():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((10, 32))
    codes = np.vstack([x, x[3], x[7], x[3] * 2.5])  # scaled copies have cosine 1 too
    g = neardup.auto_groups(codes, 0.999)
    assert g[10] == g[3] == g[12] and g[11] == g[7] and g[3] != g[7]
    assert len(np.unique(g)) == 10
    assert g.tolist()[:10] == list(range(10))  # ids in order of first appearance


def test_near_duplicates_join_transitively():
    a = np.array([1.0, 0.0])
    b = np.array([np.cos(0.3), np.sin(0.3)])  # cos(a, b) = cos(b, c) = 0.955; cos(a, c) = 0.825
    c = np.array([np.cos(0.6), np.sin(0.6)])
    far = np.array([-1.0, 0.2])
    x = np.vstack([a, far, c, b])
    assert float(a @ c) < 0.95
    assert neardup.auto_groups(x, 0.95).tolist() == [0, 1, 0, 0]
    pairs = neardup.similar_pairs(x, 0.95)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 3), (2, 3)]  # the chain, not a-c


def test_groups_are_deterministic_and_independent_of_the_block_size():
    codes, truth, _ = _images()
    first = neardup.auto_groups(codes, 0.95)
    for block in (1, 5, 64, None):
        assert np.array_equal(neardup.auto_groups(codes, 0.95, block=block), first)
    # relabelled by first appearance: permuting the rows permutes the partition, nothing else
    perm = np.random.default_rng(3).permutation(len(codes))
    again = neardup.auto_groups(codes[perm], 0.95)
    assert neardup.pair_scores(again, first[perm]) == (1.0, 1.0)
    assert again[0] == 0 and np.all(np.diff(np.unique(again, return_index=True)[1]) > 0)


def test_generated_image_copies_are_found():
    codes, truth, _ = _images()  # copies' pixel cosine is >= 0.77, unrelated images' <= 0.4
    precision, recall = neardup.pair_scores(neardup.auto_groups(codes, 0.7), truth)
    assert precision == 1.0 and recall == 1.0


def test_pair_scores_against_hand_counts():
    # truth: {0,1,2} {3,4}; found: {0,1} {2,3,4}: pairs found 1 + 3 = 4, true 3 + 1 = 4, both: (0,1), (3,4)
    assert neardup.pair_scores([0, 0, 1, 1, 1], [5, 5, 5, 9, 9]) == (0.5, 0.5)
    assert neardup.pair_scores([0, 1, 2], [0, 1, 2]) == (1.0, 1.0)


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), "high"])
def test_threshold_outside_0_1_is_a_one_line_usage_error(bad):
    with pytest.raises(UsageError) as e:
        neardup.auto_groups(np.eye(3), bad)
    msg = str(e.value)
    assert msg.startswith("--group-by auto: threshold ") and "\n" not in msg and "; " in msg


def test_degenerate_codes_are_refused_in_one_line():
    with pytest.raises(UsageError, match=r"^--group-by auto: all rows have identical codes.*; check"):
        neardup.auto_groups(np.ones((5, 4)), 0.95)
    with pytest.raises(
        UsageError,
        match=r"every row chains into one group, so there is nothing to split; raise the threshold$",
    ):
        neardup.auto_groups(np.abs(np.random.default_rng(0).standard_normal((20, 8))) + 5, 0.5)
    with pytest.raises(UsageError, match=r"^--group-by auto: needs at least 2 rows"):
        neardup.auto_groups(np.ones((1, 4)), 0.95)
    x = np.eye(4)
    x[2, 1] = np.nan
    with pytest.raises(FeatxError, match=r"^codes: 1 of 4 rows have NaN or infinite values \(first: row 2\)"):
        neardup.auto_groups(x, 0.95)


def test_independent_split_is_not_flagged():
    codes, truth, labels = _images(n_sources=0, singles=300, seed=4)
    rng = np.random.default_rng(0)
    for seed in range(3):
        perm = rng.permutation(len(codes))
        report = neardup.leakage(codes, perm[60:], perm[:60], labels, seed=seed)
        assert not report.leaky and report.closer < neardup.LEAK_MIN_ROWS
        assert report.reference == "other-class" and report.checked == 60


def test_leaky_split_is_flagged_and_a_grouped_split_is_not():
    codes, truth, labels = _images(n_sources=40, copies=4, singles=100, seed=5)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(codes))
    held = np.zeros(len(codes), bool)
    held[perm[: len(codes) // 5]] = True
    report = neardup.leakage(codes, ~held, held, labels)
    assert report.leaky and report.fraction > 0.3
    i, j = report.example
    assert held[i] and not held[j] and truth[i] == truth[j]
    assert report.quantiles[1] > report.reference_quantiles[1]
    assert "near-copies of training rows" in report.summary()
    held_groups = rng.permutation(np.unique(truth))[: len(np.unique(truth)) // 5]
    grouped = np.isin(truth, held_groups)
    assert not neardup.leakage(codes, ~grouped, grouped, labels).leaky
    # without labels the fixed cut still sees the copies
    assert neardup.leakage(codes, ~held, held).reference == "fixed"
    assert neardup.leakage(codes, ~held, held).leaky


def test_leakage_needs_both_sides():
    with pytest.raises(UsageError, match="needs training and held-out rows"):
        neardup.leakage(np.eye(3), np.arange(3), np.array([], dtype=int))
