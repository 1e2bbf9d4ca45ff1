"""The calibrated gate: four tests of generated frames against real episodes, one verdict.

Each test compares a statistic of the generated frames with the same statistic of real frames
and judges the difference against a null distribution estimated by resampling whole real
episodes at the generated set's own size (:mod:`carsynth.metrics.null`):

1. ``ndb``: K-means bins on the training frames (Richardson & Weiss 2018); per bin
   z_b = (q_b - p_b) / sqrt(V_b + p_b (1 - p_b) / n) with V_b the episode-cluster-robust
   variance of the training share p_b (the generated side's variance is cluster-robust too when
   it is a real file with an episode table). Statistic: mean over bins of z_b^2 (about 1 when
   the histograms agree); fails when large.
2. ``sharpness``: log ratio of the median per-frame sharpness (mean absolute neighbour-pixel
   difference), generated over real; fails in either direction (noise, blur, dimming).
3. ``collapse``: log ratio of the median nearest-other-frame distance, generated over real frames
   drawn across episodes; fails in either direction (repeats, or frames spread wider than real).
4. ``copying``: share of generated frames nearer to a training frame than the 5% quantile of new
   real frames' distances; fails when large.

The gate's level is split evenly (Bonferroni): each test runs at ``level / 4``, so a perfect
generator is refused with probability at most ``level``. Below the size at which the NDB test
tells a perfect generator from one that drops a third of the bins (power 0.9), the gate refuses
to decide. Density and coverage (Naeem et al. 2020) are reported beside the tests, with the
held-out real frames' values, but do not decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from carsynth.errors import UsageError
from carsynth.metrics.features import Space
from carsynth.metrics.ndb import NDBBins
from carsynth.metrics.neighbours import CollapseTest, CopyTest, collapse_test, copy_test
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
)
from carsynth.metrics.prdc import DensityCoverage, density_coverage
from carsynth.metrics.sharpness import sharpness

TESTS = ("ndb", "sharpness", "collapse", "copying")


@dataclass
class GateSettings:
    """The gate's statistical settings (``validate`` exposes each as a flag)."""

    level: float = 0.05  # the gate's false-reject rate for a perfect generator
    reps: int = 500  # null replicates per test
    bin_alpha: float = 0.05  # NDB/K: a bin counts as different below this two-sided p-value
    power: float = 0.9  # refuse sizes with less power than this against dropping a third of bins
    reference_frames: int = 5000  # real frames (across episodes) the neighbour tests sample
    collapse_frames: int = 1000  # frames per side in the collapse test
    copy_quantile: float = 0.05  # copying: nearer than this quantile of new real frames
    density_k: int = 5  # density and coverage: k-th neighbour radius


@dataclass
class NDBTest:
    """The bin test and its diagnostics: per-bin shares and z, NDB/K and JS with null quantiles."""

    test: NullTest  # mean z^2
    stats: BinStats
    null: BinStats = field(repr=False)
    train_shares: np.ndarray = field(repr=False)
    fake_shares: np.ndarray = field(repr=False)
    holdout: BinStats  # real-vs-real: held-out episodes against training
    design_effect: float  # pooled over bins (the one the test uses)
    design_effect_median: float  # per-bin ratios' median (reported)
    min_frames: int | None

    def to_dict(self) -> dict[str, Any]:
        def summary(name: str, observed: float, null: np.ndarray, real: float) -> dict[str, Any]:
            q = {f"q{p:g}": float(np.quantile(null, p)) for p in (0.05, 0.5, 0.95)}
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


def _episode_ids(episodes: np.ndarray | None, n: int, offset: int) -> np.ndarray:
    """Episode ids shifted by ``offset`` (so two sets never share one); i.i.d. rows get one each."""
    return offset + (np.arange(n) if episodes is None else np.asarray(episodes))


def _ndb_test(
    bins: NDBBins,
    train_labels: np.ndarray,
    train_episodes: np.ndarray,
    holdout: tuple[np.ndarray, np.ndarray],
    fake: tuple[np.ndarray, np.ndarray | None],
    settings: GateSettings,
    level: float,
    rng: np.random.Generator,
    min_n: int | None,
) -> NDBTest:
    k = bins.k
    train_counts = episode_counts(train_labels, train_episodes, k)
    train = bin_sample(train_counts)
    fake_labels, fake_episodes = fake
    gen = bin_sample(episode_counts(fake_labels, fake_episodes, k))
    gen_episodes = None if fake_episodes is None else len(np.unique(fake_episodes))
    stats = bin_stats(train, gen, settings.bin_alpha)
    null = bin_null(train_counts, len(fake_labels), settings.reps, rng, settings.bin_alpha,
                    gen_episodes)  # fmt: skip
    hold = bin_stats(train, bin_sample(episode_counts(*holdout, k)), settings.bin_alpha)
    return NDBTest(
        test=NullTest("ndb", float(stats.mean_z2), null.mean_z2, level, "greater"),
        stats=stats,
        null=null,
        train_shares=train.shares,
        fake_shares=gen.shares,
        holdout=hold,
        design_effect=float(train.deff),
        design_effect_median=float(np.median(design_effects(train_counts))),
        min_frames=min_n,
    )


def judge(
    train: np.ndarray,
    train_episodes: np.ndarray,
    holdout: np.ndarray,
    holdout_episodes: np.ndarray,
    fake: np.ndarray,
    fake_episodes: np.ndarray | None,
    bins: NDBBins,
    space: Space,
    settings: GateSettings | None = None,
    seed: int = 0,
) -> GateResult:
    """Run the four tests and density/coverage on uint8 frames (N, H, W, 3).

    ``*_episodes`` give each frame's episode id (``fake_episodes=None``: independent generated
    frames); ``bins`` and ``space`` are fitted on ``train``. Raises :class:`UsageError` when
    ``fake`` is smaller than the NDB test's minimum size (see the module docstring).
    """
    settings = settings or GateSettings()
    level = settings.level / len(TESTS)
    rng = np.random.default_rng(seed)
    train_labels = bins.assign(train)
    train_counts = episode_counts(train_labels, train_episodes, bins.k)
    min_n = min_frames(train_counts, level, settings.power, seed=seed)
    if min_n is None or len(fake) < min_n:
        need = "more training episodes" if min_n is None else f"at least {min_n} generated frames"
        raise UsageError(
            f"the gate needs {need} to tell a perfect generator from one that drops a third of "
            f"the modes (power {settings.power:g} at level {level:.3g}); got {len(fake)}"
        )
    hold_ep = _episode_ids(holdout_episodes, len(holdout), offset=1 + int(train_episodes.max()))
    fake_ep = None if fake_episodes is None else np.asarray(fake_episodes)
    ndb = _ndb_test(
        bins, train_labels, train_episodes, (bins.assign(holdout), hold_ep),
        (bins.assign(fake), fake_ep), settings, level, rng, min_n,
    )  # fmt: skip

    real_ep = np.concatenate([train_episodes, hold_ep])
    gen_episodes = None if fake_ep is None else len(np.unique(fake_ep))
    real_sharp = np.concatenate([sharpness(train), sharpness(holdout)])
    kind = "log_median_ratio"
    sharp = NullTest(
        "sharpness",
        frame_statistic(real_sharp, sharpness(fake), kind, 0.5),
        frame_null(real_sharp, real_ep, len(fake), kind, settings.reps, rng, 0.5, gen_episodes),
        level,
        "two-sided",
    )

    pick = np.sort(rng.choice(len(real_ep), min(settings.reference_frames, len(real_ep)), False))
    in_train = pick < len(train)
    ref_v = torch.cat([space.transform(train[pick[in_train]]),
                       space.transform(holdout[pick[~in_train] - len(train)])])  # fmt: skip
    train_v, fake_v = space.transform(train), space.transform(fake)
    collapse = collapse_test(fake_v, ref_v, real_ep[pick], num=settings.collapse_frames,
                             level=level, reps=settings.reps, seed=seed)  # fmt: skip
    copying = copy_test(
        fake_v, ref_v, real_ep[pick], train_v, train_episodes, quantile=settings.copy_quantile,
        level=level, reps=settings.reps, seed=seed, gen_episodes=gen_episodes,
    )  # fmt: skip

    real_v = train_v[torch.as_tensor(rng.choice(len(train), min(len(train), 5000), False))]
    dc_size = min(len(fake), len(holdout), 5000)  # equal sizes: coverage grows with size
    hold_pick = np.sort(rng.choice(len(holdout), dc_size, replace=False))
    return GateResult(
        ndb=ndb,
        sharpness=sharp,
        collapse=collapse,
        copying=copying,
        density_coverage=density_coverage(real_v, fake_v[:dc_size], settings.density_k),
        density_coverage_real=density_coverage(
            real_v, space.transform(holdout[hold_pick]), settings.density_k
        ),
    )
