"""Collapse and copying checks on real fixture frames with known answers, in both spaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carsynth.metrics import collapse_check, copy_check, neighbour_space
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


# (fake set, collapse passes, copying passes): the same decisions in both spaces.
CASES = [("heldout_real", True, True), ("repeats", False, True), ("copies", True, False)]


@pytest.mark.parametrize(("name", "collapse_ok", "copying_ok"), CASES)
def test_known_decisions(frames, space, name, collapse_ok, copying_ok) -> None:
    fake = frames[name]
    collapse = collapse_check(fake, frames["holdout"], space)
    copying = copy_check(fake, frames["holdout"], frames["train"], space)
    assert collapse.passed is collapse_ok, collapse.failures
    assert copying.passed is copying_ok, copying.failures
    assert collapse.num == min(len(fake), len(frames["holdout"]))
    if not collapse_ok:
        assert collapse.ratio < 0.5 and collapse.failures[0].startswith("collapse: ")
    if not copying_ok:
        assert copying.copy_share == 1.0 and copying.median_fake == pytest.approx(0.0, abs=0.05)
        assert "100.0% of generated frames" in copying.failures[0]
        fake_index, train_index = copying.closest_pairs(4)
        np.testing.assert_array_equal(fake[fake_index], frames["train"][train_index])


def test_held_out_threshold_shares_are_near_the_quantile(frames, space) -> None:
    copying = copy_check(frames["heldout_real"], frames["holdout"], frames["train"], space)
    # The reference set's own share below its 1% quantile is 1% (4 of 400 frames, ties aside).
    assert copying.real_copy_share == pytest.approx(0.01, abs=0.005)
    assert copying.ratio == pytest.approx(1.0, abs=0.1)


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
    full = torch.cdist(down.transform(x), down.transform(x), compute_mode=exact).numpy()
    proj = torch.cdist(pca.transform(x), pca.transform(x), compute_mode=exact).numpy()
    assert np.all(proj <= full + 1e-3)
    far = full > np.median(full)
    assert np.median(proj[far] / full[far]) > 0.8
