"""Nearest-neighbour checks: do generated frames collapse onto each other, or copy training frames?

Both checks judge generated frames against held-out real frames, which are what a perfect
generator's samples look like: new draws from the data distribution that training never saw.

Collapse. Each generated frame's distance to its nearest *other* generated frame is compared with
the same statistic for an equal number of held-out real frames (nearest-neighbour distances
shrink as a set grows, so the sizes must match). A collapsed generator repeats itself, so its
frames sit much closer together: the check fails when the median distance ratio (generated /
held-out) falls below ``min_ratio``, or when more than ``max_duplicate_share`` of the generated
frames are near-duplicates, i.e. strictly closer to another generated frame than all but
``duplicate_quantile`` of the held-out frames are to theirs.

Copying. Each generated frame's distance to its nearest training frame is compared with held-out
frames' distance to the training set. The check fails when more than ``max_copy_share`` of the
generated frames are closer to a training frame than all but ``copy_quantile`` of the held-out
frames ever are (the quantile makes "ever" robust to one unlucky held-out frame).

Space. Distances are Euclidean between frames scaled to [0, 1]. ``"pixels"`` uses every pixel
(exact, memory N x H*W*3 x 4 bytes); ``"pca"`` (the default for large sets) area-averages frames
to ``resolution`` and keeps the top ``dims`` principal components of the training frames, which
preserves the large distances the thresholds compare at a fraction of the cost. Both spaces
reach the same decisions on the known-answer tests in ``tests/test_neighbours.py``.
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


@dataclass
class CopyResult:
    """The copying check: distances to the nearest training frame, per generated/held-out frame."""

    median_fake: float
    median_real: float
    ratio: float  # median_fake / median_real
    copy_threshold: float
    copy_share: float  # share of generated frames nearer to a training frame than the threshold
    real_copy_share: float  # the same for the held-out frames (about copy_quantile)
    max_copy_share: float
    fake_distances: np.ndarray = field(repr=False)
    real_distances: np.ndarray = field(repr=False)
    nearest_train: np.ndarray = field(repr=False)  # index of each generated frame's neighbour

    @property
    def failures(self) -> list[str]:
        if self.copy_share <= self.max_copy_share:
            return []
        return [
            f"copying: {self.copy_share:.1%} of generated frames are nearer to a training frame "
            f"than {self.copy_threshold:.3g} (held-out real {self.real_copy_share:.1%}, "
            f"maximum {self.max_copy_share:.1%}; median distance {self.ratio:.2f}x held-out)"
        ]

    @property
    def passed(self) -> bool:
        return not self.failures

    def closest_pairs(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices (generated, training) of the ``count`` generated frames nearest to training."""
        fake_index = np.argsort(self.fake_distances, kind="stable")[:count]
        return fake_index, self.nearest_train[fake_index]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "median_fake": self.median_fake,
            "median_real": self.median_real,
            "ratio": self.ratio,
            "copy_threshold": self.copy_threshold,
            "copy_share": self.copy_share,
            "real_copy_share": self.real_copy_share,
            "max_copy_share": self.max_copy_share,
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


def copy_check(
    fake: np.ndarray,
    holdout: np.ndarray,
    train: np.ndarray,
    space: Space,
    *,
    copy_quantile: float = 0.01,
    max_copy_share: float = 0.05,
) -> CopyResult:
    """Generated and held-out frames' distances to their nearest training frame. See the module
    docstring."""
    fake, holdout = check_samples(fake, "fake"), check_samples(holdout, "holdout")
    train = space.transform(check_samples(train, "train"))
    d_fake, nearest_train = nearest(space.transform(fake), train)
    d_real, _ = nearest(space.transform(holdout), train)
    threshold = float(np.quantile(d_real, copy_quantile))
    median_fake, median_real = float(np.median(d_fake)), float(np.median(d_real))
    return CopyResult(
        median_fake=median_fake,
        median_real=median_real,
        ratio=_ratio(median_fake, median_real),
        copy_threshold=threshold,
        copy_share=float(np.mean(d_fake < threshold)),
        real_copy_share=float(np.mean(d_real < threshold)),
        max_copy_share=max_copy_share,
        fake_distances=d_fake,
        real_distances=d_real,
        nearest_train=nearest_train,
    )


# --- calibrated tests: episode-respecting references and resampled nulls ---------------------


def _median(x: np.ndarray) -> float:
    return float(np.quantile(x, 0.5, method="inverted_cdf"))


@dataclass
class CollapseTest:
    """Nearest-other-frame distances of ``num`` generated frames against ``num`` real frames
    drawn across episodes, with a two-sided band from the episode-resampled null."""

    num: int
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


def cross_episode_matrix(ref: torch.Tensor, episodes: np.ndarray) -> np.ndarray:
    """Pairwise distances (P, P) of reference rows, infinite within an episode (and on the
    diagonal): a real frame's neighbours must come from other episodes, as a generator's
    independent samples would."""
    d = squared_distances(ref, ref, ref.square().sum(1)).sqrt_().cpu().numpy()
    d[episodes[:, None] == episodes[None, :]] = np.inf
    return d


def collapse_test(
    fake: torch.Tensor,
    ref: torch.Tensor,
    ref_episodes: np.ndarray,
    *,
    num: int = 1000,
    level: float = 0.05,
    reps: int = 200,
    seed: int = 0,
) -> CollapseTest:
    """Collapse as a calibrated two-sided test (neighbour-space rows in, result out).

    ``num`` generated rows (a seeded subsample; fewer when there are fewer) and ``num`` reference
    rows drawn i.i.d. across all reference episodes each get their nearest other row's distance,
    the real ones only to rows of other episodes (consecutive frames of an episode are near
    duplicates; a perfect generator's samples are independent). Statistic: log(median generated
    / median real). Null: the same statistic between ``num`` rows drawn from the reference and
    ``num`` rows drawn from a cluster bootstrap of its episodes (whole episodes with
    replacement). Small ratios mean repeated frames (collapse), large ones frames spread wider
    than real data (noise)."""
    rng = np.random.default_rng(seed)
    ref_episodes = np.asarray(ref_episodes)
    num = min(num, len(fake))
    if num < 2:
        raise ValueError("the collapse test needs at least 2 generated frames")
    pick = np.sort(rng.choice(len(fake), num, replace=False))
    fake_v = fake[torch.as_tensor(pick, device=fake.device)]
    d_fake, _ = nearest(fake_v, fake_v, exclude_self=True)
    matrix = cross_episode_matrix(ref, ref_episodes)
    _, group = np.unique(ref_episodes, return_inverse=True)
    members = [np.flatnonzero(group == g) for g in range(group.max() + 1)]

    def medians(rows: np.ndarray) -> tuple[float, np.ndarray]:
        d = matrix[rows][:, rows].min(1)  # two gathers: 3x faster than np.ix_
        return _median(d), d

    def bootstrap_rows() -> np.ndarray:
        pool = np.concatenate([members[g] for g in rng.integers(len(members), size=len(members))])
        return pool[rng.integers(len(pool), size=num)]

    median_real, d_real = medians(rng.integers(len(ref), size=num))
    null = np.empty(reps)
    for r in range(reps):
        a, _ = medians(rng.integers(len(ref), size=num))
        b, _ = medians(bootstrap_rows())
        null[r] = np.log(a / b)
    median_fake = _median(d_fake)
    with np.errstate(divide="ignore"):
        statistic = float(np.log(median_fake / median_real))
    return CollapseTest(
        num=num,
        median_fake=median_fake,
        median_real=median_real,
        test=NullTest("collapse", statistic, null, level, "two-sided"),
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


def copy_test(
    fake: torch.Tensor,
    ref: torch.Tensor,
    ref_episodes: np.ndarray,
    train: torch.Tensor,
    train_episodes: np.ndarray,
    *,
    quantile: float = 0.05,
    level: float = 0.05,
    reps: int = 200,
    seed: int = 0,
    gen_episodes: int | None = None,
) -> CopyTest:
    """Copying as a calibrated one-sided test (neighbour-space rows in, result out).

    Every reference row's distance to the nearest training row of another episode is what a new
    frame's distance looks like (a training frame with its own episode left out is a frame
    from a new episode). Statistic: the share of generated rows nearer to a training row than
    the reference distances' ``quantile``; null: :func:`carsynth.metrics.null.frame_null`
    (episodes of the reference resampled, ``len(fake)`` i.i.d. draws or ``gen_episodes``)."""
    device = train.device
    d_fake, nearest_train = nearest(fake, train)
    groups = (
        torch.as_tensor(np.asarray(ref_episodes), device=device),
        torch.as_tensor(np.asarray(train_episodes), device=device),
    )
    d_real, _ = nearest(ref, train, groups=groups)
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
