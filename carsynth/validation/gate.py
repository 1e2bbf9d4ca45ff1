"""The calibrated gate: four tests of generated frames against real episodes, one verdict.

Each test compares a statistic of the generated frames with the same statistic of real frames
and judges it against a null distribution from resampled real episodes at the generated set's
own size (:mod:`carsynth.metrics.null`; consecutive frames of an episode are near duplicates,
so the episode, not the frame, is the unit of evidence):

1. ``ndb``: K-means bins on the training frames (Richardson & Weiss 2018). Per bin, their
   pooled two-proportion z-test with each sample size N replaced by its effective size N / D,
   D the training set's design effect (Kish 1965) from episode-cluster-robust variances of the
   bin shares (Liang & Zeger 1986; Cameron & Miller 2015); D = 1 for independent generated
   frames, its own D for a real file judged as generated. Statistic: mean over bins of z^2
   (about 1 when the histograms agree); null: cluster bootstrap of the training episodes
   against n frames drawn from the training shares; fails when large.
2. ``sharpness``: log ratio of the median per-frame sharpness (mean absolute neighbour-pixel
   difference), generated over real; null from resampled real episodes; fails in either
   direction (noise, blur, dimming).
3. ``collapse``: log ratio of the median nearest-other-frame distance within G generated frames
   and within one frame of each of the G real episodes (both independent draws under the
   null); exact permutation null; fails in either direction (repeats, or spread like noise).
4. ``copying``: share of generated frames nearer to a training frame than the 5% quantile of
   new real frames' distances (held-out frames, and training frames with their own episode left
   out); null from resampled real episodes; fails when large.

The gate's level is split evenly (Bonferroni): each test runs at ``level / 4``, so a perfect
generator is refused with probability at most ``level``. Below the size at which the NDB test
rejects a generator that drops a third of the bins with probability ``power``, the gate
refuses to decide. Density and coverage (Naeem et al. 2020) are reported with the held-out
real frames' values, but do not decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from carsynth.errors import UsageError
from carsynth.metrics.features import Space
from carsynth.metrics.ndb import NDBBins
from carsynth.metrics.neighbours import (
    CollapseTest,
    CopyTest,
    collapse_test,
    copy_test,
    new_frame_distances,
)
from carsynth.metrics.null import (
    BinStats,
    NullTest,
    bin_null,
    bin_sample,
    bin_stats,
    design_effects,
    episode_counts,
    frame_null,
    frame_statistic,
    min_frames,
    null_quantile,
)
from carsynth.metrics.prdc import DensityCoverage, density_coverage

if TYPE_CHECKING:
    from carsynth.validation.checks import ValidationConfig
from carsynth.metrics.sharpness import sharpness

TESTS = ("ndb", "sharpness", "collapse", "copying")


@dataclass
class NDBTest:
    """The bin test and its diagnostics: per-bin shares and z, NDB/K and JS with null quantiles."""

    test: NullTest  # mean z^2
    stats: BinStats
    null: BinStats = field(repr=False)
    train_shares: np.ndarray = field(repr=False)
    fake_shares: np.ndarray = field(repr=False)
    holdout: BinStats  # real-vs-real: held-out episodes against training
    holdout_shares: np.ndarray = field(repr=False)
    design_effect: float  # pooled over bins (the one the test uses)
    design_effect_median: float  # per-bin ratios' median (reported)
    min_frames: int | None

    def to_dict(self) -> dict[str, Any]:
        def summary(name: str, observed: float, null: np.ndarray, real: float) -> dict[str, Any]:
            q = {f"q{p:g}": null_quantile(null, p) for p in (0.05, 0.5, 0.95)}
            return {"name": name, "generated": observed, "held_out_real": real, "null": q}

        return {
            **self.test.to_dict(),
            "min_frames": self.min_frames,
            "design_effect": self.design_effect,
            "design_effect_median": self.design_effect_median,
            "held_out_real_mean_z2": float(self.holdout.mean_z2),
            "ndb_k": summary("NDB/K", float(self.stats.ndb_k), self.null.ndb_k,
                             float(self.holdout.ndb_k)),
            "js": summary("JS", float(self.stats.js), self.null.js, float(self.holdout.js)),
            "bins": {
                "train_share": self.train_shares.tolist(),
                "fake_share": self.fake_shares.tolist(),
                "z": self.stats.z.tolist(),
            },
        }  # fmt: skip


@dataclass
class GateResult:
    ndb: NDBTest
    sharpness: NullTest
    collapse: CollapseTest
    copying: CopyTest
    density_coverage: DensityCoverage
    density_coverage_real: DensityCoverage  # held-out real frames against training

    @property
    def tests(self) -> dict[str, NullTest]:
        return {
            "ndb": self.ndb.test,
            "sharpness": self.sharpness,
            "collapse": self.collapse.test,
            "copying": self.copying.test,
        }

    @property
    def failures(self) -> list[str]:
        """One line per failed test: statistic, band and p-value."""
        out = []
        for name, test in self.tests.items():
            if not test.passed:
                lo, hi = test.band
                out.append(
                    f"{name}: statistic {test.statistic:.3g} outside the real-data band "
                    f"[{lo:.3g}, {hi:.3g}] (p = {test.p_value:.3g} < {test.level:.3g})"
                )
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "tests": {
                "ndb": self.ndb.to_dict(),
                "sharpness": self.sharpness.to_dict(),
                "collapse": self.collapse.to_dict(),
                "copying": self.copying.to_dict(),
            },
            "density_coverage": {
                "generated": self.density_coverage.to_dict(),
                "held_out_real": self.density_coverage_real.to_dict(),
            },
        }


def _ndb_test(
    train_counts: np.ndarray,
    holdout_counts: np.ndarray,
    fake: tuple[np.ndarray, np.ndarray | None],
    config: ValidationConfig,
    level: float,
    rng: np.random.Generator,
    min_n: int | None,
) -> NDBTest:
    k = train_counts.shape[1]
    train = bin_sample(train_counts)
    fake_labels, fake_episodes = fake
    gen = bin_sample(episode_counts(fake_labels, fake_episodes, k))
    gen_episodes = None if fake_episodes is None else len(np.unique(fake_episodes))
    stats = bin_stats(train, gen, config.alpha)
    null = bin_null(train_counts, len(fake_labels), config.reps, rng, config.alpha,
                    gen_episodes)  # fmt: skip
    hold = bin_stats(train, bin_sample(holdout_counts), config.alpha)
    return NDBTest(
        test=NullTest("ndb", float(stats.mean_z2), null.mean_z2, level, "greater"),
        stats=stats,
        null=null,
        train_shares=train.shares,
        fake_shares=gen.shares,
        holdout=hold,
        holdout_shares=bin_sample(holdout_counts).shares,
        design_effect=float(train.deff),
        design_effect_median=float(np.median(design_effects(train_counts))),
        min_frames=min_n,
    )


class RealReference:
    """Everything the gate derives from the real frames, computed once: bin counts per episode,
    the minimum generated size, per-frame sharpness, and the neighbour-space reference.

    ``*_episodes`` give each real frame's episode id; ``bins`` and ``space`` are fitted on
    ``train``. Then :meth:`judge` tests any number of generated sets against it.
    """

    def __init__(
        self,
        train: np.ndarray,
        train_episodes: np.ndarray,
        holdout: np.ndarray,
        holdout_episodes: np.ndarray,
        bins: NDBBins,
        space: Space,
        config: ValidationConfig,
    ) -> None:
        self.config = config
        self.train, self.holdout = train, holdout  # the judged frames' closest pairs come from them
        self.seconds: dict[str, float] = {}  # fit_reference's timings, reported with each verdict
        self.level = config.level / len(TESTS)
        self.bins, self.space, self.seed = bins, space, config.seed
        seed = config.seed
        rng = np.random.default_rng(seed)
        train_episodes = np.asarray(train_episodes)
        hold_ep = 1 + int(train_episodes.max()) + np.asarray(holdout_episodes)
        self.train_counts = episode_counts(bins.assign(train), train_episodes, bins.k)
        self.holdout_counts = episode_counts(bins.assign(holdout), hold_ep, bins.k)
        self.min_frames = min_frames(self.train_counts, self.level, config.power, seed=seed)
        real_ep = np.concatenate([train_episodes, hold_ep])
        self.real_episodes = real_ep
        self.sharpness = np.concatenate([sharpness(train), sharpness(holdout)])
        size = min(config.reference_frames, len(real_ep))
        pick = np.sort(rng.choice(len(real_ep), size, replace=False))
        in_train = pick < len(train)
        ref_v = torch.cat([space.transform(train[pick[in_train]]),
                           space.transform(holdout[pick[~in_train] - len(train)])])  # fmt: skip
        self.ref_episodes = real_ep[pick]
        self.train_v = space.transform(train)
        self.new_distances = new_frame_distances(ref_v, self.ref_episodes, self.train_v,
                                                 train_episodes)  # fmt: skip
        dc_rows = rng.choice(len(train), min(len(train), 5000), replace=False)
        self.real_v = self.train_v[torch.as_tensor(dc_rows, device=self.train_v.device)]
        self.holdout_v = space.transform(holdout)
        self.all_v = torch.cat([self.train_v, self.holdout_v])

    def check_size(self, n: int) -> None:
        """UsageError unless ``n`` generated frames reach the NDB test's minimum size."""
        if self.min_frames is None or n < self.min_frames:
            need = ("more training episodes" if self.min_frames is None
                    else f"at least {self.min_frames} generated frames")  # fmt: skip
            raise UsageError(
                f"the gate needs {need} to tell a perfect generator from one that drops a third "
                f"of the modes (power {self.config.power:g} at level {self.level:.3g}); "
                f"got {n}"
            )

    def judge(self, fake: np.ndarray, fake_episodes: np.ndarray | None = None) -> GateResult:
        """The four tests and density/coverage for uint8 frames ``fake`` (``fake_episodes``:
        their episode ids when they are real episodes, ``None`` for independent frames).
        Raises :class:`UsageError` below the minimum size (see the module docstring)."""
        self.check_size(len(fake))
        config, level, seed = self.config, self.level, self.seed
        rng = np.random.default_rng(seed + 1)
        gen_episodes = None if fake_episodes is None else len(np.unique(fake_episodes))
        ndb = _ndb_test(self.train_counts, self.holdout_counts,
                        (self.bins.assign(fake), fake_episodes), config, level, rng,
                        self.min_frames)  # fmt: skip
        kind, real = "log_median_ratio", self.sharpness
        null = frame_null(real, self.real_episodes, len(fake), kind, config.reps, rng, 0.5,
                          gen_episodes)  # fmt: skip
        observed = frame_statistic(real, sharpness(fake), kind, 0.5)
        sharp = NullTest("sharpness", observed, null, level, "two-sided")
        fake_v = self.space.transform(fake)
        collapse = collapse_test(fake_v, self.all_v, self.real_episodes, level=level,
                                 reps=config.reps, seed=seed,
                                 fake_episodes=fake_episodes)  # fmt: skip
        copying = copy_test(fake_v, self.train_v, self.new_distances, self.ref_episodes,
                            quantile=config.copy_quantile, level=level, reps=config.reps,
                            seed=seed, gen_episodes=gen_episodes)  # fmt: skip
        size = min(len(fake), len(self.holdout_v), 5000)  # equal sizes: coverage grows with size
        fake_pick = torch.as_tensor(np.sort(rng.choice(len(fake), size, replace=False)))
        hold_pick = torch.as_tensor(np.sort(rng.choice(len(self.holdout_v), size, replace=False)))
        k = config.density_k
        return GateResult(
            ndb=ndb,
            sharpness=sharp,
            collapse=collapse,
            copying=copying,
            density_coverage=density_coverage(self.real_v, fake_v[fake_pick.to(fake_v.device)], k),
            density_coverage_real=density_coverage(
                self.real_v, self.holdout_v[hold_pick.to(fake_v.device)], k
            ),
        )
