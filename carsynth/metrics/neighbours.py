"""Nearest-neighbour statistics: do generated frames collapse onto each other, or copy training
frames? Distances are Euclidean in a neighbour space (below).

The gate's tests (:func:`collapse_test`, :func:`copy_test`) are calibrated against real
episodes: collapse is an exact permutation test between G generated frames and one frame of
each of the G real episodes (both independent draws from the data under the null); copying
compares generated frames' distances to the training set with new real frames' (held-out
frames, and training frames with their own episode left out), against an episode-resampled
null (:mod:`carsynth.metrics.null`).

The trainer's collapse monitor uses :func:`collapse_check`: each generated frame's distance to
its nearest *other* generated frame against the same for an equal number of held-out frames;
it fails when the median ratio falls below ``min_ratio`` or more than ``max_duplicate_share``
of the generated frames are nearer than the held-out ``duplicate_quantile``.

Space. Distances are Euclidean between frames scaled to [0, 1]. ``"pixels"`` uses every pixel
(exact, memory N x H*W*3 x 4 bytes); ``"pca"`` (the default for large sets) area-averages frames
to ``resolution`` and keeps the top ``dims`` principal components of the training frames, which
preserves the large distances the tests compare at a fraction of the cost. Both spaces reach
the same decisions on the known-answer tests in ``tests/test_neighbours.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from carsynth.metrics.features import Space, check_samples, nearest, squared_distances
from carsynth.metrics.null import NullTest, frame_null, frame_statistic

SPACES = ("pixels", "pca")


def neighbour_space(
    train: np.ndarray,
    space: str = "pca",
    *,
    resolution: int = 32,
    dims: int = 64,
    fit_samples: int = 5000,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> Space:
    """The space the checks measure in, fitted on (a seeded subsample of) the training frames.

    ``"pixels"``: full-size pixels, centred on the training mean (centring keeps the float32
    distance formula exact for near-duplicates). ``"pca"``: ``resolution`` x ``resolution``
    area-averaged pixels projected on their top ``dims`` principal components.
    """
    train = check_samples(train, "train")
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    rng = np.random.default_rng(seed)
    sample = train[np.sort(rng.choice(len(train), min(len(train), fit_samples), replace=False))]
    if space == "pixels":
        base = Space(None, device)
        return Space(None, device, mean=base.transform(sample).mean(0))
    return Space(resolution, device).fit_pca(sample, dims, seed=seed)


def _ratio(a: float, b: float) -> float:
    """a / b, where 0 / 0 is 1 (equal) and x / 0 is infinite."""
    if b > 0:
        return a / b
    return 1.0 if a == 0 else float("inf")


@dataclass
class CollapseResult:
    """The collapse check. Distances are per frame, for ``num`` generated and ``num`` real."""

    num: int
    median_fake: float
    median_real: float
    ratio: float  # median_fake / median_real
    min_ratio: float
    duplicate_threshold: float
    duplicate_share: float  # share of generated frames nearer than the threshold
    real_duplicate_share: float  # the same for the held-out frames (about duplicate_quantile)
    max_duplicate_share: float
    fake_distances: np.ndarray = field(repr=False)
    real_distances: np.ndarray = field(repr=False)

    @property
    def failures(self) -> list[str]:
        out = []
        if self.ratio < self.min_ratio:
            out.append(
                f"collapse: generated frames are {self.ratio:.2f}x as far from their nearest "
                f"other generated frame as held-out real frames are (minimum {self.min_ratio:.2f})"
            )
        if self.duplicate_share > self.max_duplicate_share:
            out.append(
                f"collapse: {self.duplicate_share:.1%} of generated frames are near-duplicates "
                f"(nearer than {self.duplicate_threshold:.3g}; held-out real "
                f"{self.real_duplicate_share:.1%}, maximum {self.max_duplicate_share:.1%})"
            )
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "num": self.num,
            "median_fake": self.median_fake,
            "median_real": self.median_real,
            "ratio": self.ratio,
            "min_ratio": self.min_ratio,
            "duplicate_threshold": self.duplicate_threshold,
            "duplicate_share": self.duplicate_share,
            "real_duplicate_share": self.real_duplicate_share,
            "max_duplicate_share": self.max_duplicate_share,
            "failures": self.failures,
        }


def collapse_check(
    fake: np.ndarray,
    holdout: np.ndarray,
    space: Space,
    *,
    min_ratio: float = 0.5,
    duplicate_quantile: float = 0.01,
    max_duplicate_share: float = 0.05,
    seed: int = 0,
) -> CollapseResult:
    """Generated frames against an equal number of held-out real frames (seeded subsample of
    the larger set), each set's nearest-other-member distances. See the module docstring."""
    fake, holdout = check_samples(fake, "fake"), check_samples(holdout, "holdout")
    num = min(len(fake), len(holdout))
    if num < 2:
        raise ValueError("the collapse check needs at least 2 generated and 2 held-out frames")
    rng = np.random.default_rng(seed)
    pick = [np.sort(rng.choice(len(x), num, replace=False)) for x in (fake, holdout)]
    fake_v, real_v = space.transform(fake[pick[0]]), space.transform(holdout[pick[1]])
    d_fake, _ = nearest(fake_v, fake_v, exclude_self=True)
    d_real, _ = nearest(real_v, real_v, exclude_self=True)
    threshold = float(np.quantile(d_real, duplicate_quantile))
    median_fake, median_real = float(np.median(d_fake)), float(np.median(d_real))
    return CollapseResult(
        num=num,
        median_fake=median_fake,
        median_real=median_real,
        ratio=_ratio(median_fake, median_real),
        min_ratio=min_ratio,
        duplicate_threshold=threshold,
        duplicate_share=float(np.mean(d_fake < threshold)),
        real_duplicate_share=float(np.mean(d_real < threshold)),
        max_duplicate_share=max_duplicate_share,
        fake_distances=d_fake,
        real_distances=d_real,
    )


# --- calibrated tests: episode-respecting references and resampled nulls ---------------------


def _median(x: np.ndarray) -> float:
    return float(np.quantile(x, 0.5, method="inverted_cdf"))


@dataclass
class CollapseTest:
    """Nearest-other-frame distances within ``num`` generated frames against ``num`` real
    frames, one per episode, with a two-sided band from a permutation null."""

    num: int  # frames per side: one per real episode
    median_fake: float
    median_real: float
    test: NullTest  # log(median_fake / median_real)
    fake_distances: np.ndarray = field(repr=False)
    real_distances: np.ndarray = field(repr=False)

    @property
    def ratio(self) -> float:
        return float(np.exp(self.test.statistic))

    def to_dict(self) -> dict[str, Any]:
        return {
            "num": self.num,
            "median_fake": self.median_fake,
            "median_real": self.median_real,
            "ratio": self.ratio,
            **self.test.to_dict(),
        }


def _log_median_nn(matrix: np.ndarray, rows: np.ndarray) -> tuple[float, np.ndarray]:
    """log of the median nearest-other distance within ``rows`` of a distance ``matrix`` whose
    diagonal is infinite, and the distances."""
    d = matrix[rows][:, rows].min(1)
    with np.errstate(divide="ignore"):
        return float(np.log(_median(d))), d


def collapse_test(
    fake: torch.Tensor,
    real: torch.Tensor,
    real_episodes: np.ndarray,
    *,
    level: float = 0.05,
    reps: int = 200,
    seed: int = 0,
    fake_episodes: np.ndarray | None = None,
) -> CollapseTest:
    """Collapse as an exact two-sided permutation test (neighbour-space rows in, result out).

    One frame drawn at random from each of the G real episodes is an independent draw from the
    data distribution, exactly what a perfect generator's frame is; so are G generated frames
    drawn at random (one per episode, when ``fake_episodes`` says they are real episodes).
    Under the null the 2G frames are exchangeable (Fisher's permutation test; Good 2005,
    "Permutation, parametric and bootstrap tests of hypotheses"). Statistic: log(median
    nearest-other distance within the generated set / the same within the real set); null:
    the statistic for random splits of the pooled 2G frames into two sets of G. Small values
    mean repeated frames (collapse), large ones frames spread wider than real data (noise).
    (Real frames drawn freely across episodes would not do: n frames from G episodes cover
    fewer places than n independent frames, so their distances come out larger.)
    """
    rng = np.random.default_rng(seed)

    def one_per_episode(episodes: np.ndarray, count: int | None) -> np.ndarray:
        _, group = np.unique(np.asarray(episodes), return_inverse=True)
        order = rng.permutation(len(group))  # a random frame of each episode: its first here
        first = order[np.unique(group[order], return_index=True)[1]]
        return first if count is None else rng.choice(first, min(count, len(first)), False)

    real_rows = one_per_episode(real_episodes, None)
    if fake_episodes is None:
        fake_rows = rng.choice(len(fake), min(len(real_rows), len(fake)), replace=False)
    else:
        fake_rows = one_per_episode(fake_episodes, len(real_rows))
    num = min(len(real_rows), len(fake_rows))
    if num < 3:
        raise ValueError("the collapse test needs at least 3 real episodes and generated frames")
    real_rows = real_rows[:num]
    device = fake.device
    fake_part = fake[torch.as_tensor(fake_rows[:num], device=device)]
    real_part = real[torch.as_tensor(real_rows, device=real.device)].to(device)
    pooled = torch.cat([fake_part, real_part])
    matrix = squared_distances(pooled, pooled, pooled.square().sum(1)).sqrt_().cpu().numpy()
    np.fill_diagonal(matrix, np.inf)
    sides = np.arange(2 * num)
    log_fake, d_fake = _log_median_nn(matrix, sides[:num])
    log_real, d_real = _log_median_nn(matrix, sides[num:])
    null = np.empty(reps)
    for r in range(reps):
        perm = rng.permutation(2 * num)
        null[r] = _log_median_nn(matrix, perm[:num])[0] - _log_median_nn(matrix, perm[num:])[0]
    return CollapseTest(
        num=num,
        median_fake=float(np.exp(log_fake)),
        median_real=float(np.exp(log_real)),
        test=NullTest("collapse", log_fake - log_real, null, level, "two-sided"),
        fake_distances=d_fake,
        real_distances=d_real,
    )


@dataclass
class CopyTest:
    """Distances to the nearest training frame: generated frames against real frames of other
    episodes (held-out frames, and training frames with their own episode left out)."""

    quantile: float
    threshold: float  # the real distances' ``quantile``
    median_fake: float
    median_real: float
    test: NullTest  # share of generated frames nearer than the threshold
    fake_distances: np.ndarray = field(repr=False)
    real_distances: np.ndarray = field(repr=False)
    nearest_train: np.ndarray = field(repr=False)

    def closest_pairs(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices (generated, training) of the ``count`` generated frames nearest to training."""
        fake_index = np.argsort(self.fake_distances, kind="stable")[:count]
        return fake_index, self.nearest_train[fake_index]

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantile": self.quantile,
            "threshold": self.threshold,
            "median_fake": self.median_fake,
            "median_real": self.median_real,
            **self.test.to_dict(),
        }


def new_frame_distances(
    ref: torch.Tensor, ref_episodes: np.ndarray, train: torch.Tensor, train_episodes: np.ndarray
) -> np.ndarray:
    """Each reference row's distance to the nearest training row of another episode: what a new
    real frame's distance to the training set looks like (a training frame with its own episode
    left out is a frame from a new episode; a held-out frame's episode is never in training)."""
    device = train.device
    groups = (
        torch.as_tensor(np.asarray(ref_episodes), device=device),
        torch.as_tensor(np.asarray(train_episodes), device=device),
    )
    return nearest(ref, train, groups=groups)[0]


def copy_test(
    fake: torch.Tensor,
    train: torch.Tensor,
    real_distances: np.ndarray,
    ref_episodes: np.ndarray,
    *,
    quantile: float = 0.05,
    level: float = 0.05,
    reps: int = 200,
    seed: int = 0,
    gen_episodes: int | None = None,
) -> CopyTest:
    """Copying as a calibrated one-sided test (neighbour-space rows in, result out).

    ``real_distances``: :func:`new_frame_distances` of reference rows from ``ref_episodes``.
    Statistic: the share of generated rows nearer to a training row than the real distances'
    ``quantile``; null: :func:`carsynth.metrics.null.frame_null` (reference episodes resampled,
    ``len(fake)`` i.i.d. draws or ``gen_episodes`` whole episodes)."""
    d_fake, nearest_train = nearest(fake, train)
    d_real = real_distances
    rng = np.random.default_rng(seed)
    kind = "share_below"
    null = frame_null(d_real, ref_episodes, len(fake), kind, reps, rng, quantile, gen_episodes)
    return CopyTest(
        quantile=quantile,
        threshold=float(np.quantile(d_real, quantile, method="inverted_cdf")),
        median_fake=_median(d_fake),
        median_real=_median(d_real),
        test=NullTest(
            "copying", frame_statistic(d_real, d_fake, kind, quantile), null, level, "greater"
        ),
        fake_distances=d_fake,
        real_distances=d_real,
        nearest_train=nearest_train,
    )
