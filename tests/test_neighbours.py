"""Collapse and copying checks on real fixture frames with known answers, in both spaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carsynth.metrics import collapse_check, neighbour_space
from carsynth.metrics.features import Space, nearest
from carsynth.storage import open_frame_file


@pytest.fixture(scope="module")
def frames() -> dict[str, np.ndarray]:
    """Training frames (4 episodes) and two exchangeable held-out sets: the even and the odd
    frames of the other 4 episodes. The odd frames are new real frames from the same episodes
    as the held-out reference, so a check comparing them must pass."""
    from conftest import FIXTURE

    with open_frame_file(FIXTURE) as f:
        x = f.read("all")
    train, pool = x[:800], x[800:]
    rng = np.random.default_rng(0)
    repeats = np.repeat(pool[1::2][rng.choice(400, 20, replace=False)], 10, axis=0)
    noisy = repeats.astype(np.int16) + rng.integers(-1, 2, repeats.shape)
    return {
        "train": train,
        "holdout": pool[0::2],
        "heldout_real": pool[1::2],
        "repeats": np.clip(noisy, 0, 255).astype(np.uint8),  # 20 frames x 10, +-1 level noise
        "copies": train[np.sort(rng.choice(800, 400, replace=False))],
    }


@pytest.fixture(scope="module", params=["pixels", "pca"])
def space(request, frames) -> Space:
    return neighbour_space(frames["train"], request.param)


# (fake set, collapse passes, copying passes): the same decisions in both spaces. The trainer's
# monitor uses collapse_check; the gate's copy test runs on the same frames (None: no verdict
# asserted, 20 distinct frames make any share a multiple of 1/20).
CASES = [("heldout_real", True, True), ("repeats", False, None), ("copies", True, False)]


@pytest.mark.parametrize(("name", "collapse_ok", "copying_ok"), CASES)
def test_known_decisions(frames, space, name, collapse_ok, copying_ok) -> None:
    from carsynth.metrics.neighbours import copy_test, new_frame_distances

    fake = frames[name]
    collapse = collapse_check(fake, frames["holdout"], space)
    assert collapse.passed is collapse_ok, collapse.failures
    assert collapse.num == min(len(fake), len(frames["holdout"]))
    if not collapse_ok:
        assert collapse.ratio < 0.5 and collapse.failures[0].startswith("collapse: ")
    # Episodes: training frames 0-799 are episodes 0-3, held-out frames (every other one of
    # frames 800-1599) episodes 4-7.
    train_v, hold_v = space.transform(frames["train"]), space.transform(frames["holdout"])
    real = new_frame_distances(hold_v, 4 + np.arange(400) // 100, train_v, np.arange(800) // 200)
    copying = copy_test(space.transform(fake), train_v, real, 4 + np.arange(400) // 100, reps=200)
    assert copying.threshold == pytest.approx(np.quantile(real, 0.05, method="inverted_cdf"))
    if copying_ok is not None:
        assert copying.test.passed is copying_ok, copying.to_dict()
    if copying_ok is False:
        assert copying.test.statistic == 1.0
        assert copying.median_fake == pytest.approx(0.0, abs=0.05)
        fake_index, train_index = copying.closest_pairs(4)
        np.testing.assert_array_equal(fake[fake_index], frames["train"][train_index])


def test_nearest_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(37, 5)), rng.normal(size=(53, 5))
    brute = np.linalg.norm(a[:, None] - b[None], axis=2)
    space = Space()
    d, i = nearest(
        space.transform(a.astype(np.float32)), space.transform(b.astype(np.float32)), chunk=8
    )
    np.testing.assert_allclose(d, brute.min(1), rtol=1e-4)
    np.testing.assert_array_equal(i, brute.argmin(1))
    self_brute = np.linalg.norm(a[:, None] - a[None], axis=2) + np.diag(np.full(37, np.inf))
    d, i = nearest(*[space.transform(a.astype(np.float32))] * 2, exclude_self=True, chunk=8)
    np.testing.assert_allclose(d, self_brute.min(1), rtol=1e-4)
    np.testing.assert_array_equal(i, self_brute.argmin(1))


def test_pca_space_keeps_the_distances_the_checks_compare(frames) -> None:
    # Top components of the training frames: projected distances are at most the
    # downsampled-pixel distances and keep most of them.
    pca = neighbour_space(frames["train"], "pca", dims=64)
    down = Space(32)
    x = frames["heldout_real"][:100]
    exact = "donot_use_mm_for_euclid_dist"  # an independent, per-pair distance computation
    full = torch.cdist(down.transform(x), down.transform(x), compute_mode=exact).cpu().numpy()
    proj = torch.cdist(pca.transform(x), pca.transform(x), compute_mode=exact).cpu().numpy()
    assert np.all(proj <= full + 1e-3)
    far = full > np.median(full)
    assert np.median(proj[far] / full[far]) > 0.8


# --- calibrated collapse and copy tests, sharpness, density and coverage ----------------------


def ar1_episodes(rng: np.random.Generator, episodes: int, length: int, dim: int, phi: float):
    """Rows that drift through an 8-D standard normal law, AR(1) with coefficient ``phi``
    within each episode (consecutive rows near duplicates), and their episode ids."""
    x = np.empty((episodes, length, dim), np.float32)
    x[:, 0] = rng.normal(size=(episodes, dim))
    for t in range(1, length):
        x[:, t] = phi * x[:, t - 1] + np.sqrt(1 - phi**2) * rng.normal(size=(episodes, dim))
    return x.reshape(-1, dim), np.repeat(np.arange(episodes), length)


@pytest.fixture(scope="module")
def episodic_rows() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    train, train_ep = ar1_episodes(rng, 40, 50, 8, 0.9)
    ref, ref_ep = ar1_episodes(rng, 40, 50, 8, 0.9)
    ref_ep = ref_ep + 100  # other episodes than training's
    return {
        "train": train, "train_ep": train_ep,
        "ref": np.concatenate([train, ref]), "ref_ep": np.concatenate([train_ep, ref_ep]),
        "perfect": rng.normal(size=(1500, 8)).astype(np.float32),
        "repeats": np.repeat(rng.normal(size=(15, 8)).astype(np.float32), 100, axis=0),
        "copies": train[rng.choice(len(train), 1500)],
        "noise": rng.normal(size=(1500, 8)).astype(np.float32) * 1.5,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("name", "collapse_ok", "copying_ok"),
    [("perfect", True, True), ("repeats", False, None), ("copies", None, False),
     ("noise", False, True)],
)  # fmt: skip
def test_calibrated_collapse_and_copy_decisions(episodic_rows, name, collapse_ok, copying_ok):
    from carsynth.metrics.neighbours import (
        collapse_test,
        copy_test,
        new_frame_distances,
    )

    rows, space = episodic_rows, Space()
    ref, train, fake = (space.transform(rows[key]) for key in ("ref", "train", name))
    collapse = collapse_test(fake, ref, rows["ref_ep"], level=0.05, reps=200)
    assert collapse.num == 80  # one frame per real episode
    real = new_frame_distances(ref, rows["ref_ep"], train, rows["train_ep"])
    copying = copy_test(fake, train, real, rows["ref_ep"], level=0.05, reps=100)
    if collapse_ok is not None:  # copies of consecutive training rows: near each other too
        assert collapse.test.passed is collapse_ok, collapse.to_dict()
    if copying_ok is not None:  # 15 distinct rows: any share is a multiple of 1/15, no verdict
        assert copying.test.passed is copying_ok, copying.to_dict()
    if name == "repeats":
        assert collapse.median_fake == 0.0 and collapse.test.statistic == -np.inf
    if name == "copies":
        assert copying.test.statistic == 1.0  # every row is a training row


def test_new_frame_distances_leave_the_own_episode_out() -> None:
    from carsynth.metrics.neighbours import new_frame_distances

    space = Space()
    train = space.transform(np.array([[0.0], [1.0], [10.0]], np.float32))
    ref = space.transform(np.array([[0.0], [10.5]], np.float32))
    # Row 0 is training row 0 (episode 0): its nearest training row of another episode is 1.0
    # away (episode 1). Row 1 is a held-out row (episode 7): 0.5 from training row 2.
    d = new_frame_distances(ref, np.array([0, 7]), train, np.array([0, 1, 2]))
    np.testing.assert_allclose(d, [1.0, 0.5], atol=1e-6)


def test_sharpness_by_hand() -> None:
    from carsynth.metrics.sharpness import sharpness

    frame = np.zeros((1, 2, 2, 3), np.uint8)
    frame[0, 0, 0] = 30  # one pixel differs from its two neighbours by 30 in every channel
    # Pairs: 2 vertical + 2 horizontal per channel, 12 in all; |diff| sums to 2 * 30 * 3.
    np.testing.assert_allclose(sharpness(frame), [180 / 12])
    flat = np.full((3, 8, 8, 3), 77, np.uint8)
    np.testing.assert_array_equal(sharpness(flat), 0.0)


def test_density_and_coverage_match_brute_force() -> None:
    from carsynth.metrics.prdc import density_coverage

    rng = np.random.default_rng(0)
    real = rng.normal(size=(120, 5)).astype(np.float32)
    fake = (rng.normal(size=(90, 5)) + 0.5).astype(np.float32)
    k = 4
    # Brute force, as Naeem et al. define them (distances by an independent formula).
    d_rr = np.linalg.norm(real[:, None].astype(np.float64) - real[None], axis=2)
    radii = np.sort(d_rr, axis=1)[:, k]  # column 0 is the row itself
    d_rf = np.linalg.norm(real[:, None].astype(np.float64) - fake[None], axis=2)  # (real, fake)
    inside = d_rf < radii[:, None]
    density = inside.sum() / (k * len(fake))
    coverage = np.mean(d_rf.min(1) < radii)
    space = Space()
    result = density_coverage(space.transform(real), space.transform(fake), k=k, chunk=32)
    assert result.density == pytest.approx(density, abs=1e-9)
    assert result.coverage == pytest.approx(coverage, abs=1e-9)
    same = density_coverage(space.transform(real), space.transform(real[:60]), k=k)
    assert same.coverage > 0.3 and same.density > 0.5
