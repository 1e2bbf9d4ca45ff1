"""Episode-aware statistics (carsynth.metrics.null) against hand-worked values, and calibration:
on data where the null holds they reject at their stated rate, where the i.i.d. test does not."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import binom, chi2

from carsynth.metrics.ndb import NDBBins, two_proportion_z_test
from carsynth.metrics.null import (
    BinSample,
    NullTest,
    bin_null,
    bin_sample,
    bin_stats,
    cluster_shares,
    drop_a_third,
    episode_counts,
    frame_null,
    frame_statistic,
    min_frames,
    null_quantile,
)

LEVEL, REPLICATES = 0.05, 200
# 99.9% two-sided binomial interval for the number of rejections out of REPLICATES at LEVEL.
LOW, HIGH = binom.ppf(0.0005, REPLICATES, LEVEL), binom.isf(0.0005, REPLICATES, LEVEL)


def sticky_stream(rng: np.random.Generator, episodes: int, length: int, k: int, stay: float):
    """Bin labels of episodes that stay in a bin with probability ``stay`` per frame, else jump
    to a uniform bin (stationary distribution uniform): a Markov (AR(1)-like) stream whose
    consecutive frames are correlated, as a car driving a track is. Labels and episode ids."""
    labels = np.empty((episodes, length), np.int64)
    labels[:, 0] = rng.integers(k, size=episodes)
    for t in range(1, length):
        jump = rng.random(episodes) > stay
        labels[:, t] = np.where(jump, rng.integers(k, size=episodes), labels[:, t - 1])
    return labels.ravel(), np.repeat(np.arange(episodes), length)


def test_cluster_robust_variance_by_hand() -> None:
    # Three episodes, two bins: counts (2, 0), (1, 1), (0, 3); N = 7, p = (3/7, 4/7).
    counts = np.array([[2, 0], [1, 1], [0, 3]])
    p, v = cluster_shares(counts)
    np.testing.assert_allclose(p, [3 / 7, 4 / 7])
    # Residuals c_g0 - n_g p_0: 2 - 6/7, 1 - 6/7, 0 - 9/7 -> squares sum to 146/49;
    # V = G/(G-1) * 146/49 / N^2 = 3/2 * 146/49 / 49 = 219/2401 (bin 1 mirrors bin 0).
    np.testing.assert_allclose(v, [219 / 2401] * 2)
    sample = bin_sample(counts)
    deff = Fraction(2 * 219, 2401) / (2 * Fraction(3, 7) * Fraction(4, 7) / 7)
    assert sample.deff == pytest.approx(float(deff)) and sample.size == 7
    # Single frames as episodes: V = p (1 - p) / (N - 1), the design effect N / (N - 1).
    labels = np.random.default_rng(0).integers(4, size=500)
    assert bin_sample(episode_counts(labels, np.arange(500), 4)).deff == pytest.approx(500 / 499)
    assert bin_sample(episode_counts(labels, None, 4)).deff == 1.0  # i.i.d. frames, one row


def test_z_is_the_pooled_z_test_with_effective_sizes() -> None:
    # Training: 100 frames with design effect 2 (effective size 50); generated 100 i.i.d.
    train = BinSample(np.array([0.5, 0.5]), 100.0, 2.0)
    gen = BinSample(np.array([0.3, 0.7]), 100.0, 1.0)
    pooled = (50 * 0.5 + 100 * 0.3) / 150
    z = -0.2 / math.sqrt(pooled * (1 - pooled) * (1 / 50 + 1 / 100))
    stats = bin_stats(train, gen)
    np.testing.assert_allclose(stats.z, [z, -z])
    assert stats.mean_z2 == pytest.approx(z**2) and stats.ndb_k == 1.0
    # Design effect 1: Richardson & Weiss's test exactly.
    plain = bin_stats(BinSample(train.shares, 100.0, 1.0), gen)
    np.testing.assert_allclose(
        plain.z, two_proportion_z_test(train.shares, 100, gen.shares, 100)[0]
    )


def test_null_test_p_values_by_hand() -> None:
    null = np.array([1.0, 2.0, 3.0, 4.0])
    assert NullTest("t", 3.5, null, 0.05, "greater").p_value == pytest.approx(2 / 5)
    assert NullTest("t", 3.5, null, 0.05, "less").p_value == pytest.approx(4 / 5)
    assert NullTest("t", 3.5, null, 0.05, "two-sided").p_value == pytest.approx(4 / 5)
    assert NullTest("t", 9.0, null, 0.25, "greater").passed is False  # p = 1/5 < 0.25
    np.testing.assert_allclose(drop_a_third(np.array([0.4, 0.3, 0.2, 0.1])), [0.5, 0.375, 0, 0.125])


def test_infinite_replicates_give_bands_not_nan() -> None:
    # log distance ratios against duplicate frames are infinite; linear interpolation between
    # two of them computed inf - inf: a NaN band in report.json and a RuntimeWarning
    null = np.array([1.0, 2.0, 3.0, np.inf, np.inf, np.inf])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        test = NullTest("t", 2.5, null, 0.1, "two-sided")
        assert test.band == (1.25, np.inf) and test.quantiles()["q0.99"] == np.inf
    assert null_quantile(np.array([1.0, 2.0, 3.0, 4.0]), 0.5) == 2.5  # finite: linear, as before
    assert null_quantile(-null[::-1], 0.1) == -np.inf


@pytest.mark.parametrize("generated", ["iid", "episodes"])
def test_calibrated_bin_test_rejects_at_its_level_and_iid_test_does_not(generated) -> None:
    rng = np.random.default_rng(1 if generated == "iid" else 2)
    k, calibrated, naive = 10, 0, 0
    for _ in range(REPLICATES):
        labels, episodes = sticky_stream(rng, 30, 50, k, stay=0.95)
        train_counts = episode_counts(labels, episodes, k)
        if generated == "iid":  # a perfect generator: independent frames, stationary law
            gen_counts, gen_episodes = episode_counts(rng.integers(k, size=1000), None, k), None
        else:  # new real episodes: a real file with its episode table
            gen_labels, gen_ep = sticky_stream(rng, 20, 50, k, stay=0.95)
            gen_counts, gen_episodes = episode_counts(gen_labels, gen_ep, k), 20
        n = int(gen_counts.sum())
        observed = bin_stats(bin_sample(train_counts), bin_sample(gen_counts)).mean_z2
        null = bin_null(train_counts, n, 200, rng, gen_episodes=gen_episodes).mean_z2
        calibrated += not NullTest("ndb", float(observed), null, LEVEL, "greater").passed
        # The i.i.d. test: Pearson's chi-square on the raw counts (every frame independent).
        p, q = train_counts.sum(0) / train_counts.sum(), gen_counts.sum(0) / n
        z, _ = two_proportion_z_test(p, int(train_counts.sum()), q, n)
        naive += np.sum(z**2) > chi2.isf(LEVEL, k - 1)
    assert LOW <= calibrated <= HIGH, calibrated
    assert naive > 0.5 * REPLICATES  # the design effect (~25 here) is ignored


def test_altered_modes_are_exactly_the_flagged_bins() -> None:
    rng = np.random.default_rng(3)
    modes, dim = 20, 8
    centres = rng.normal(size=(modes, dim)) * 20
    labels, episodes = sticky_stream(rng, 200, 30, modes, stay=0.9)
    train = (centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32)
    bins = NDBBins.fit(train, k=modes, seed=0)
    mode_bin = bins.assign(centres.astype(np.float32))
    assert sorted(mode_bin) == list(range(modes))  # one bin per mode
    weights = np.ones(modes)
    weights[[3, 11]] = 0.0  # dropped
    weights[7] = 2.0  # doubled
    gen_modes = rng.choice(modes, size=5000, p=weights / weights.sum())
    fake = (centres[gen_modes] + rng.normal(size=(5000, dim))).astype(np.float32)
    train_counts = episode_counts(bins.assign(train), episodes, modes)
    stats = bin_stats(bin_sample(train_counts), bin_sample(episode_counts(bins.assign(fake), None,
                      modes)), bin_alpha=0.05 / modes)  # fmt: skip
    flagged = np.flatnonzero(np.abs(stats.z) > 3.02)  # Bonferroni over 20 bins: 0.0025 two-sided
    assert sorted(flagged) == sorted(mode_bin[[3, 7, 11]])
    assert stats.z[mode_bin[7]] > 0 and np.all(stats.z[mode_bin[[3, 11]]] < 0)
    null = bin_null(train_counts, 5000, 200, rng).mean_z2
    assert NullTest("ndb", float(stats.mean_z2), null, LEVEL, "greater").p_value < 0.01


def test_minimum_size_grows_with_within_episode_correlation() -> None:
    rng = np.random.default_rng(4)
    sizes = []
    for stay in (0.5, 0.98):
        labels, episodes = sticky_stream(rng, 40, 100, 30, stay)
        sizes.append(min_frames(episode_counts(labels, episodes, 30), level=0.0125, reps=100))
    assert sizes[0] is not None and sizes[1] is not None and sizes[0] < sizes[1]


@pytest.mark.parametrize(
    ("kind", "quantile", "alternative"),
    [("log_median_ratio", 0.5, "two-sided"), ("share_below", 0.05, "greater")],
)
def test_frame_statistic_null_is_calibrated(kind, quantile, alternative) -> None:
    rng = np.random.default_rng(5)
    rejections = 0
    for _ in range(REPLICATES):
        # Log-normal values, AR(1) with coefficient 0.95 within each of 40 episodes of 50.
        x = np.empty((40, 50))
        x[:, 0] = rng.normal(size=40)
        for t in range(1, 50):
            x[:, t] = 0.95 * x[:, t - 1] + math.sqrt(1 - 0.95**2) * rng.normal(size=40)
        reference, episodes = np.exp(x.ravel()), np.repeat(np.arange(40), 50)
        generated = np.exp(rng.normal(size=300))  # independent draws of the same law
        observed = frame_statistic(reference, generated, kind, quantile)
        null = frame_null(reference, episodes, 300, kind, 60, rng, quantile)
        rejections += not NullTest(kind, observed, null, LEVEL, alternative).passed
    assert LOW <= rejections <= HIGH, rejections
