"""Metrics on small constructed cases whose right answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from imsvd import metrics as ev
from imsvd.errors import ConfigError, DataError


def _clusters(n_per_class: int, classes: int, dim: int, spread: float, seed: int):
    """Gaussian clusters around orthogonal-ish centres; labels 0..classes-1."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 5
    labels = np.repeat(np.arange(classes), n_per_class)
    x = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    return x.astype(np.float32), labels


def _joint(p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    """P = p1^T p2 / N of flattened (N, D) codes (transcription of losses.joint_distribution)."""
    return p1.T @ p2 / p1.shape[0]


def _one_hot(idx: np.ndarray, bins: int) -> np.ndarray:
    """(N, B) bin indices -> (N, B, bins) one-hot float codes."""
    return np.eye(bins)[idx]


# ----------------------------------------------------------------------------- kNN


def test_knn_separable_clusters_are_perfect():
    x_train, y_train = _clusters(30, 4, 16, 0.1, seed=0)
    x_test, y_test = _clusters(10, 4, 16, 0.1, seed=0)
    for k, t in ((20, 0.07), (200, 0.1)):
        acc = ev.knn_accuracy(x_train, y_train, x_test, y_test, k=k, temperature=t)
        assert acc[1] == 1.0
        assert acc[5] == 1.0


def test_knn_k_larger_than_train_set_and_chunking():
    x_train, y_train = _clusters(3, 3, 8, 0.1, seed=1)
    x_test, y_test = _clusters(5, 3, 8, 0.1, seed=1)
    whole = ev.knn_scores(x_train, y_train, x_test, k=500, temperature=0.07)
    chunked = ev.knn_scores(torch.from_numpy(x_train), y_train, x_test, k=500, temperature=0.07, chunk_size=2)
    assert whole.shape == (15, 3)
    torch.testing.assert_close(whole, chunked)
    assert ev.topk_accuracy(whole, y_test)[1] == 1.0  # exp(sim/0.07) lets near neighbours dominate


def _plain_knn(x_train, y_train, x_test, k, t, classes):
    a = x_train / np.linalg.norm(x_train, axis=1, keepdims=True)
    b = x_test / np.linalg.norm(x_test, axis=1, keepdims=True)
    expected = np.zeros((len(x_test), classes))
    for i, row in enumerate(b @ a.T):
        for j in np.argsort(-row)[:k]:
            expected[i, y_train[j]] += math.exp(row[j] / t)
    return expected


def test_knn_matches_plain_transcription():
    rng = np.random.default_rng(2)
    x_train, x_test = rng.normal(size=(25, 6)), rng.normal(size=(7, 6))
    y_train = rng.integers(0, 3, 25)
    got = ev.knn_scores(x_train, y_train, x_test, k=5, temperature=0.1).double().numpy()
    np.testing.assert_allclose(got, _plain_knn(x_train, y_train, x_test, 5, 0.1, 3), rtol=1e-4)


def test_knn_protocols_from_one_pass_match_plain_transcriptions():
    """The evaluation's two protocols (k=20 and k=200) share one similarity pass over
    training chunks smaller than either k: each must still be its own plain kNN."""
    rng = np.random.default_rng(4)
    x_train, x_test = rng.normal(size=(300, 8)), rng.normal(size=(40, 8))
    y_train = rng.integers(0, 4, 300)
    protocols = [(20, 0.07), (200, 0.1), (3, 1.0)]
    got = ev.knn_scores_many(x_train, y_train, x_test, protocols, train_chunk_size=17, chunk_size=9)
    assert len(got) == len(protocols)
    for scores, (k, t) in zip(got, protocols, strict=True):
        expected = _plain_knn(x_train, y_train, x_test, k, t, 4)
        np.testing.assert_allclose(scores.double().numpy(), expected, rtol=1e-4)
    accuracies = ev.knn_accuracies(x_train, y_train, x_test, y_train[:40], protocols[:2])
    assert accuracies[1] == ev.knn_accuracy(x_train, y_train, x_test, y_train[:40], k=200, temperature=0.1)
    with pytest.raises(ConfigError, match="protocol"):
        ev.knn_scores_many(x_train, y_train, x_test, [])


def test_topk_accuracy_top5_at_least_top1_and_clipped():
    rng = np.random.default_rng(3)
    scores, labels = rng.normal(size=(200, 10)), rng.integers(0, 10, 200)
    acc = ev.topk_accuracy(scores, labels, ks=(1, 5, 10, 50))
    assert 0 <= acc[1] <= acc[5] <= acc[10] == acc[50] == 1.0
    assert isinstance(acc[1], float)
    assert ev.topk_accuracy(np.eye(3), [0, 1, 2]) == {1: 1.0, 5: 1.0}


def test_knn_rejects_bad_input():
    x, y = _clusters(4, 2, 4, 0.1, seed=0)
    with pytest.raises(ConfigError, match="temperature"):
        ev.knn_scores(x, y, x, temperature=0)
    with pytest.raises(DataError, match="columns"):
        ev.knn_scores(x, y, x[:, :3])
    with pytest.raises(DataError, match="train_labels"):
        ev.knn_scores(x, y[:-1], x)


# ----------------------------------------------------------------------------- linear probe


def test_linear_probe_separable_is_near_perfect():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    logits = x @ rng.normal(size=(32, 10))
    ranked = np.sort(logits, axis=1)
    keep = ranked[:, -1] - ranked[:, -2] > 1.0  # linearly separable with a margin, by construction
    x, y = x[keep], logits[keep].argmax(1)
    half = len(y) // 2
    acc = ev.linear_probe(x[:half], y[:half], x[half:], y[half:], epochs=200, seed=0)
    assert acc[1] >= 0.97
    assert acc[5] >= acc[1]


def test_linear_probe_random_labels_near_chance_and_seeded():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(800, 32))
    y = rng.integers(0, 10, 800)
    acc = ev.linear_probe(x[:600], y[:600], x[600:], y[600:], epochs=100, seed=1)
    assert acc[1] < 0.25  # chance is 0.1
    again = ev.linear_probe(x[:600], y[:600], x[600:], y[600:], epochs=100, seed=1)
    assert again == acc


def test_linear_probe_standardises_on_train_only():
    # A huge offset and scale must not matter: features are standardised with train statistics.
    x, y = _clusters(40, 3, 8, 1.0, seed=6)
    base = ev.linear_probe(x[::2], y[::2], x[1::2], y[1::2], epochs=50)
    scaled = ev.linear_probe(x[::2] * 1e3 + 1e4, y[::2], x[1::2] * 1e3 + 1e4, y[1::2], epochs=50)
    assert base[1] == scaled[1] == 1.0


# ----------------------------------------------------------------------------- redundancy


def test_off_diagonal_correlation_independent_and_duplicated():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(5000, 8))
    assert ev.mean_abs_off_diagonal_correlation(x) < 0.03
    dup = np.repeat(x[:, :1], 8, axis=1) * np.arange(1, 9)  # copies at different scales
    assert ev.mean_abs_off_diagonal_correlation(dup) == pytest.approx(1.0)


def test_off_block_correlation_leaves_out_pairs_inside_a_block():
    """Soft codes: units of one block sum to 1 (anticorrelated by construction); only
    pairs from different blocks say whether two variables are redundant."""
    rng = np.random.default_rng(3)

    def block(n: int) -> np.ndarray:  # one-hot codes of a uniform 4-state variable
        return np.eye(4)[rng.integers(0, 4, n)]

    first, second = block(5000), block(5000)
    independent = np.concatenate([first, second], axis=1)
    assert ev.mean_abs_off_diagonal_correlation(independent) > 0.1  # within-block pairs
    assert ev.mean_abs_off_diagonal_correlation(independent, block=4) < 0.03
    copied = np.concatenate([first, first], axis=1)  # the second variable repeats the first
    # Across the two blocks: 4 pairs of identical units (|corr| 1), 12 pairs at -1/3.
    assert ev.mean_abs_off_diagonal_correlation(copied, block=4) == pytest.approx((4 + 12 / 3) / 16, abs=0.02)
    with pytest.raises(DataError, match="2 blocks of 4"):
        ev.mean_abs_off_diagonal_correlation(first, block=4)


def test_effective_rank_isotropic_and_rank_one():
    rng = np.random.default_rng(8)
    assert ev.effective_rank(rng.normal(size=(20000, 16))) == pytest.approx(16, rel=0.02)
    rank_one = np.outer(rng.normal(size=500), rng.normal(size=16))
    assert ev.effective_rank(rank_one) == pytest.approx(1.0, abs=0.01)


def test_effective_rank_matches_formula():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(30, 6)) @ np.diag([5, 3, 1, 0.5, 0.1, 0.01])
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum() + 1e-7
    assert ev.effective_rank(x) == pytest.approx(math.exp(-(p * np.log(p)).sum()))


def test_chunked_moments_match_whole_matrix_transcriptions(monkeypatch):
    """Correlation, RankMe and the code statistics are summed over chunks of rows (memory
    O(D²)); with chunks of 7 rows they equal plain whole-matrix formulas, a constant
    column included, and a large mean does not cancel the correlation's digits."""
    from imsvd.losses import joint_distribution, soft_discretize

    rng = np.random.default_rng(11)
    n, d = 101, 12
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 1e4  # mean far above the spread
    x[:, 5] = 3.0  # constant: no defined correlation, counts as 0
    monkeypatch.setattr(ev, "MOMENT_BYTES", 7 * 8 * d)  # 7 rows a chunk, N not a multiple
    stats = ev.moments(x)
    assert stats.n == n
    centred = x - x.mean(0)
    std = np.linalg.norm(centred, axis=0)
    corr = (centred.T @ centred) / np.outer(np.where(std > 0, std, 1), np.where(std > 0, std, 1))
    corr[5, :] = corr[:, 5] = 0
    np.testing.assert_allclose(stats.correlation().numpy(), corr, atol=1e-9)
    owner = np.arange(d) // 3
    expected = np.abs(corr)[owner[:, None] != owner[None, :]].mean()
    assert ev.mean_abs_off_diagonal_correlation(x, block=3) == pytest.approx(expected, rel=1e-9)
    np.testing.assert_allclose(stats.gram().numpy(), x.T @ x, rtol=1e-12)
    s = np.linalg.svd(x - 1e4, compute_uv=False)  # RankMe of a well-conditioned matrix
    p = s / s.sum() + 1e-7
    assert ev.effective_rank(x - 1e4) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
    wide = rng.normal(size=(5, 9))  # N < D: only N singular values, as svdvals gives
    sw = np.linalg.svd(wide, compute_uv=False)
    pw = sw / sw.sum() + 1e-7
    assert ev.effective_rank(wide) == pytest.approx(math.exp(-(pw * np.log(pw)).sum()), rel=1e-6)

    z = rng.normal(size=(n, d)).astype(np.float32)
    codes = soft_discretize(torch.from_numpy(z), 4, 0.5)
    code_stats = ev.code_statistics(z, lambda chunk: soft_discretize(chunk, 4, 0.5))
    assert code_stats.shape == (n, 3, 4)
    np.testing.assert_allclose(code_stats.marginals(), ev.block_marginals(codes), rtol=1e-6)
    np.testing.assert_allclose(code_stats.occupancy(), ev.bin_occupancy(codes))
    flat = codes.reshape(n, -1)
    np.testing.assert_allclose(code_stats.joint(), joint_distribution(flat, flat).numpy(), atol=1e-6)
    assert ev.bin_usage(code_stats) == pytest.approx(ev.bin_usage(codes))


# ----------------------------------------------------------------------------- bin usage, MI


def test_bin_usage_uniform_codes():
    bins = 8
    soft = np.full((50, 4, bins), 1 / bins)  # every sample uniform over bins
    balanced = _one_hot(np.tile(np.arange(bins), (4, 10)).T, bins)  # one-hot, every bin equally often
    for codes in (soft, balanced):
        usage = ev.bin_usage(codes)
        assert usage["normalized_entropy"] == pytest.approx(1.0)
        assert usage["entropy"] == pytest.approx(math.log(bins))
        assert usage["dead_share"] == 0.0
    assert ev.bin_usage(balanced)["collapsed_block_share"] == 0.0


def test_bin_usage_all_in_bin_zero():
    bins = 8
    codes = _one_hot(np.zeros((40, 3), dtype=int), bins)
    usage = ev.bin_usage(codes)
    assert usage["entropy"] == pytest.approx(0.0, abs=1e-12)
    assert usage["normalized_entropy"] == pytest.approx(0.0, abs=1e-12)
    assert usage["dead_share"] == pytest.approx((bins - 1) / bins)
    assert usage["collapsed_block_share"] == 1.0
    np.testing.assert_allclose(ev.bin_occupancy(codes)[:, 0], 1.0)


def test_mutual_information_independent_blocks_is_zero():
    rng = np.random.default_rng(10)
    n, blocks, bins = 200_000, 3, 4
    codes = _one_hot(rng.integers(0, bins, (n, blocks)), bins).reshape(n, -1)
    mi = ev.off_block_mutual_information(_joint(codes, codes), bins)
    assert mi == pytest.approx(0.0, abs=1e-3)


def test_mutual_information_identical_blocks_is_log_bin():
    rng = np.random.default_rng(11)
    n, blocks, bins = 4000, 3, 4
    idx = np.repeat(np.tile(np.arange(bins), n // bins)[:, None], blocks, axis=1)
    rng.shuffle(idx)
    codes = _one_hot(idx, bins).reshape(n, -1)
    mi = ev.off_block_mutual_information(_joint(codes, codes), bins)
    assert mi == pytest.approx(math.log(bins))


def test_mutual_information_matches_loop_and_samples_pairs():
    rng = np.random.default_rng(12)
    n, blocks, bins = 300, 5, 3
    logits = rng.normal(size=(n, blocks, bins))
    logits[:, 1] = logits[:, 0] + 0.3 * rng.normal(size=(n, bins))  # blocks 0 and 1 share information
    p = np.exp(logits) / np.exp(logits).sum(2, keepdims=True)
    flat = p.reshape(n, -1)
    joint = _joint(flat, flat)
    values = []
    for a in range(blocks):
        for b in range(blocks):
            if a != b:
                pab = joint[a * bins : (a + 1) * bins, b * bins : (b + 1) * bins]
                pa, pb = pab.sum(1), pab.sum(0)
                values.append((pab * np.log(pab / np.outer(pa, pb))).sum())
    assert ev.off_block_mutual_information(joint, bins) == pytest.approx(np.mean(values))
    sampled = ev.off_block_mutual_information(joint, bins, max_pairs=6, seed=3)
    assert sampled == ev.off_block_mutual_information(joint, bins, max_pairs=6, seed=3)
    assert min(values) - 1e-12 <= sampled <= max(values) + 1e-12
    with pytest.raises(DataError, match="divide"):
        ev.off_block_mutual_information(joint, 4)


# ----------------------------------------------------------------------------- discrete code


def test_discrete_code_and_bits():
    z = np.zeros((2, 6))
    z[0, [1, 3]] = 1.0  # blocks of 3: bins 1 and 0
    z[1, [2, 5]] = 1.0  # bins 2 and 2
    np.testing.assert_array_equal(ev.discrete_code(z, 3), [[1, 0], [2, 2]])
    np.testing.assert_array_equal(ev.discrete_code(z.reshape(2, 2, 3), 3), [[1, 0], [2, 2]])
    assert ev.code_bits(32, 32) == 160.0
    with pytest.raises(DataError):
        ev.discrete_code(z, 4)


def test_code_knn_separable_codes_are_perfect():
    rng = np.random.default_rng(13)
    blocks, bins, classes = 16, 8, 4
    prototypes = rng.integers(0, bins, (classes, blocks))

    def sample(n_per_class):
        labels = np.repeat(np.arange(classes), n_per_class)
        codes = prototypes[labels].copy()
        flip = rng.random(codes.shape) < 0.1  # perturb 10% of the blocks
        codes[flip] = rng.integers(0, bins, flip.sum())
        return codes, labels

    train, y_train = sample(20)
    test, y_test = sample(10)
    # Through soft one-hot codes and discrete_code, as the pipeline does.
    train = ev.discrete_code(_one_hot(train, bins), bins)
    assert ev.code_knn_accuracy(train, y_train, test, y_test, bins, k=20, temperature=0.07) == 1.0
    assert ev.code_knn_accuracy(train, y_train, test, y_test, bins, k=1000, temperature=0.1) == 1.0


# ----------------------------------------------------------------------------- collapse


def test_collapse_report_rank_one_and_isotropic():
    rng = np.random.default_rng(14)
    rank_one = np.outer(rng.normal(size=400), rng.normal(size=64))
    report = ev.collapse_report(ev.effective_rank(rank_one), 64, ratio=0.05)
    assert report["collapsed"] is True
    assert "effective rank" in report["reason"]
    iso = rng.normal(size=(400, 64))
    report = ev.collapse_report(ev.effective_rank(iso), 64, ratio=0.05)
    assert report == {**report, "collapsed": False, "reason": ""}


def test_collapse_report_constant_code():
    usage = ev.bin_usage(_one_hot(np.zeros((10, 4), dtype=int), 4))
    report = ev.collapse_report(50.0, 64, usage, ratio=0.05)
    assert report["collapsed"] is True
    assert "one bin" in report["reason"]


def test_mutual_information_from_losses_soft_codes():
    # End to end with the training code's own discretisation and joint matrix.
    from imsvd.losses import joint_distribution, soft_discretize

    rng = np.random.default_rng(15)
    n, blocks, bins = 4000, 4, 4
    z = torch.from_numpy(500.0 * rng.normal(size=(n, blocks * bins)))  # sharp: nearly one-hot
    z[:, bins : 2 * bins] = z[:, :bins]  # block 1 is a copy of block 0
    p = soft_discretize(z, bins).reshape(n, -1)
    joint = joint_distribution(p, p)
    np.testing.assert_allclose(joint.numpy(), _joint(p.numpy(), p.numpy()), rtol=1e-6, atol=1e-12)
    mi = ev.off_block_mutual_information(joint, bins)
    pairs = blocks * (blocks - 1)
    assert mi == pytest.approx(2 * math.log(bins) / pairs, abs=0.02)  # only (0, 1) and (1, 0) share
    assert ev.bin_usage(p.reshape(n, blocks, bins))["normalized_entropy"] > 0.99
