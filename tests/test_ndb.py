"""NDB (Richardson & Weiss 2018) on Gaussian blobs whose right answers are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from carsynth.metrics import NDBBins, ndb
from carsynth.metrics.ndb import js_divergence, two_proportion_z_test

MODES, DIM = 20, 8
CENTRES = np.random.default_rng(0).normal(size=(MODES, DIM)) * 20  # far apart: std 1 per blob


def stratified(counts: list[int], seed: int) -> np.ndarray:
    """Exactly counts[m] points from blob m: bin proportions are then known exactly."""
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [CENTRES[m] + rng.normal(size=(c, DIM)) for m, c in enumerate(counts)]
    ).astype(np.float32)


def mixture(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    modes = rng.integers(MODES, size=n)
    return (CENTRES[modes] + rng.normal(size=(n, DIM))).astype(np.float32)


def test_z_test_and_js_match_hand_computed_values() -> None:
    # Pooled p = 0.4, se = sqrt(0.4 * 0.6 * (1/100 + 1/100)), z = (0.3 - 0.5) / se.
    z, p = two_proportion_z_test(np.array([0.5, 0.0]), 100, np.array([0.3, 0.0]), 100)
    expected_z = -0.2 / math.sqrt(0.4 * 0.6 * 0.02)
    assert z[0] == pytest.approx(expected_z)
    assert p[0] == pytest.approx(math.erfc(abs(expected_z) / math.sqrt(2)))
    assert (z[1], p[1]) == (0.0, 1.0)  # empty in both samples: no difference
    assert js_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(math.log(2))
    assert js_divergence(np.array([0.25, 0.75]), np.array([0.25, 0.75])) == 0.0


def test_same_mixture_scores_near_alpha() -> None:
    # Under the null hypothesis each bin is flagged with probability alpha, so NDB/K averages
    # alpha. Bins (k=40) split the 20 modes, so this also covers bins that cut a mode in two.
    scores = [ndb(mixture(2000, s), mixture(2000, 100 + s), k=40, seed=s).score for s in range(4)]
    assert 0.0 < np.mean(scores) <= 0.1
    assert max(scores) <= 0.2


def test_dropped_modes_flag_exactly_those_bins() -> None:
    real = stratified([150] * MODES, seed=1)
    dropped = [3, 11]
    counts = [0 if m in dropped else 150 for m in range(MODES)]
    bins = NDBBins.fit(real, k=MODES, seed=0)
    mode_bin = bins.assign(CENTRES.astype(np.float32))
    assert sorted(mode_bin) == list(range(MODES))  # one bin per mode
    result = bins.compare(stratified(counts, seed=2))
    assert sorted(np.flatnonzero(result.different)) == sorted(mode_bin[dropped])
    assert result.num_different_bins == 2 and result.score == pytest.approx(2 / MODES)
    # Kept bins: 0.05 real against 1/18 generated, z by hand with the pooled proportion.
    n_real, n_fake = 3000, 2700
    pooled = (0.05 * n_real + 150) / (n_real + n_fake)
    z_kept = (1 / 18 - 0.05) / math.sqrt(pooled * (1 - pooled) * (1 / n_real + 1 / n_fake))
    kept = np.setdiff1d(np.arange(MODES), mode_bin[dropped])
    np.testing.assert_allclose(result.z[kept], z_kept)
    np.testing.assert_allclose(result.fake_proportions[mode_bin[dropped]], 0.0)
    np.testing.assert_allclose(result.real_proportions, 0.05)


def test_doubled_modes_are_flagged_with_positive_z() -> None:
    real = stratified([150] * MODES, seed=1)
    doubled = [0, 7, 19]
    fake = stratified([300 if m in doubled else 150 for m in range(MODES)], seed=3)
    bins = NDBBins.fit(real, k=MODES, seed=0)
    mode_bin = bins.assign(CENTRES.astype(np.float32))
    result = bins.compare(fake)
    assert sorted(np.flatnonzero(result.different)) == sorted(mode_bin[doubled])
    assert np.all(result.z[mode_bin[doubled]] > 0)  # the generated share is the larger one
    assert result.js_divergence > 0


def test_frames_are_binned_and_seeded(fixture_file) -> None:
    from carsynth.storage import open_frame_file

    with open_frame_file(fixture_file) as f:
        train, holdout = f.read("train"), f.read("holdout")
    first = ndb(train, holdout, k=10, seed=5, iters=10)
    again = ndb(train, holdout, k=10, seed=5, iters=10)
    assert first.to_dict() == again.to_dict()
    assert first.real_proportions.sum() == pytest.approx(1.0)
    assert first.fake_proportions.sum() == pytest.approx(1.0)
    assert np.all(np.diff(first.real_proportions) <= 0)  # bins sorted by training share
    assert first.num_real == len(train) and first.num_fake == len(holdout)
    assert first.k == 10 and first.different.dtype == bool


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="at least k real samples"):
        ndb(mixture(10, 0), mixture(10, 1), k=20)
    with pytest.raises(ValueError, match="expected uint8 frames"):
        ndb(np.zeros((50, 8, 8), np.uint8), mixture(10, 1), k=5)
