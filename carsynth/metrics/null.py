"""Tests whose null distribution respects episodes: the calibrated core of ``validate``.

Consecutive frames of an episode are near duplicates, so a real file of G episodes carries far
less evidence than its frame count suggests. Every statistic here treats the EPISODE as the unit
of evidence, in two ways:

1. Variances are cluster-robust (sandwich) variances over episodes (Liang & Zeger 1986,
   "Longitudinal data analysis using generalized linear models"; Cameron & Miller 2015, "A
   practitioner's guide to cluster-robust inference", with their G/(G-1) small-sample factor).
   For the share p_b of frames in bin b, with c_gb frames of episode g (length n_g) in the bin and
   N = sum_g n_g:

       p_b = sum_g c_gb / N,   V_b = G/(G-1) * sum_g (c_gb - n_g p_b)^2 / N^2.

   For i.i.d. frames this is the binomial p_b (1 - p_b) / N; for correlated frames it is that
   times the design effect (Kish 1965, "Survey sampling"), 1 + (m - 1) rho for episodes of m
   frames with intra-episode correlation rho.

2. Null distributions come from resampling whole episodes (the cluster bootstrap; Cameron &
   Miller 2015, section VI; Davison & Hinkley 1997, section 3.8). The reference (training) side
   is a bootstrap resample of its G episodes; the generated side is drawn from the reference
   pool the way the generated set was made: ``n`` i.i.d. frames (a generator's samples) or as
   many whole episodes as it has (a real file with an episode table). The null is therefore
   estimated at the generated set's own size, so a test keeps its level at every size and only
   its power grows with n.

Each test reports its statistic, the null's quantiles and the bootstrap p-value
(1 + #{null >= statistic}) / (R + 1) (Davison & Hinkley 1997, eq. 4.11).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import norm

ALTERNATIVES = ("greater", "less", "two-sided")
QUANTILES = (0.01, 0.05, 0.5, 0.95, 0.99)


@dataclass
class NullTest:
    """One statistic against its resampled null distribution at ``level``."""

    name: str
    statistic: float
    null: np.ndarray = field(repr=False)
    level: float
    alternative: str  # "greater": large values fail; "less": small ones; "two-sided": both

    @property
    def p_value(self) -> float:
        """Bootstrap p-value; two-sided is twice the smaller one-sided value (at most 1)."""
        reps = len(self.null)
        upper = (1 + np.sum(self.null >= self.statistic)) / (reps + 1)
        lower = (1 + np.sum(self.null <= self.statistic)) / (reps + 1)
        if self.alternative == "greater":
            return float(upper)
        if self.alternative == "less":
            return float(lower)
        return float(min(1.0, 2 * min(upper, lower)))

    @property
    def passed(self) -> bool:
        return self.p_value >= self.level

    @property
    def band(self) -> tuple[float, float]:
        """The acceptance region's bounds in the statistic's units (null quantiles)."""
        lo, hi = -np.inf, np.inf
        if self.alternative == "greater":
            hi = null_quantile(self.null, 1 - self.level)
        elif self.alternative == "less":
            lo = null_quantile(self.null, self.level)
        else:
            lo, hi = (null_quantile(self.null, q) for q in (self.level / 2, 1 - self.level / 2))
        return float(lo), float(hi)

    def quantiles(self) -> dict[str, float]:
        return {f"q{q:g}": null_quantile(self.null, q) for q in QUANTILES}

    def to_dict(self) -> dict[str, Any]:
        return {
            "statistic": self.statistic,
            "alternative": self.alternative,
            "level": self.level,
            "p_value": self.p_value,
            "passed": self.passed,
            "band": list(self.band),
            "null_replicates": len(self.null),
            "null_quantiles": self.quantiles(),
        }


def null_quantile(null: np.ndarray, q: float) -> float:
    """``np.quantile`` of null replicates, which may be infinite (a log distance ratio against a
    duplicate frame): between two equal infinities linear interpolation computes inf - inf, so
    there the nearest replicate is the quantile instead of NaN."""
    with np.errstate(invalid="ignore"):
        value = float(np.quantile(null, q))
    return float(np.quantile(null, q, method="nearest")) if math.isnan(value) else value


# --- cluster-robust bin shares -------------------------------------------------------------


def episode_counts(labels: np.ndarray, episodes: np.ndarray | None, k: int) -> np.ndarray:
    """Frames per (episode, bin): int (G, k). ``episodes`` gives each frame's episode id;
    ``None`` means i.i.d. frames, returned as one row."""
    labels = np.asarray(labels)
    if episodes is None:
        return np.bincount(labels, minlength=k)[None]
    _, group = np.unique(np.asarray(episodes), return_inverse=True)
    counts = np.zeros((group.max() + 1, k), np.int64)
    np.add.at(counts, (group, labels), 1)
    return counts


@dataclass
class BinSample:
    """Bin shares of one set of frames (K,), or of R resamples (R, K), with the set's size and
    design effect (one per set)."""

    shares: np.ndarray
    size: np.ndarray | float
    deff: np.ndarray | float

    @property
    def effective_size(self) -> np.ndarray | float:
        return self.size / self.deff


def _weighted_sample(counts: np.ndarray, weights: np.ndarray) -> tuple[BinSample, np.ndarray]:
    """Shares, pooled design effects and per-bin cluster-robust variances of the sets that draw
    episode g ``weights[r, g]`` times (R, G). Expands sum_g w_g (c_gb - n_g p_b)^2 without an
    (R, G, K) array."""
    counts = counts.astype(np.float64)
    sizes = counts.sum(1)
    total = weights @ sizes  # (R,)
    shares = (weights @ counts) / total[:, None]
    square = (
        weights @ counts**2
        - 2 * shares * (weights @ (counts * sizes[:, None]))
        + shares**2 * (weights @ sizes**2)[:, None]
    )
    clusters = weights.sum(1)
    correction = clusters / np.maximum(clusters - 1, 1)
    variance = np.clip(square, 0, None) * (correction / total**2)[:, None]
    binomial = np.sum(shares * (1 - shares), axis=1) / total
    deff = np.divide(variance.sum(1), binomial, out=np.ones_like(total), where=binomial > 0)
    return BinSample(shares, total, deff), variance


def cluster_shares(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bin shares p_b and their cluster-robust variances V_b from per-episode counts (G, K);
    see the module docstring. Needs at least 2 episodes."""
    if len(counts) < 2:
        raise ValueError("a cluster-robust variance needs at least 2 episodes")
    sample, variance = _weighted_sample(counts, np.ones((1, len(counts))))
    return sample.shares[0], variance[0]


def design_effects(counts: np.ndarray) -> np.ndarray:
    """Per bin: cluster-robust variance over the binomial one (Kish's design effect)."""
    p, v = cluster_shares(counts)
    binomial = p * (1 - p) / counts.sum()
    return np.divide(v, binomial, out=np.ones_like(v), where=binomial > 0)


def bin_sample(counts: np.ndarray) -> BinSample:
    """One set's :class:`BinSample` from its per-episode counts (G, K); a single row means
    i.i.d. frames (design effect 1).

    The design effect is pooled over bins, sum_b V_b / sum_b p_b (1 - p_b) / N: per-bin ratios
    (:func:`design_effects`) rest on 1-3 residuals where a bin's frames come from a handful of
    episodes, and a studentized statistic built on them explodes under resampling."""
    if len(counts) == 1:
        size = float(counts.sum())
        return BinSample(counts[0] / size, size, 1.0)
    sample, _ = _weighted_sample(counts, np.ones((1, len(counts))))
    return BinSample(sample.shares[0], float(sample.size[0]), float(sample.deff[0]))


@dataclass
class BinStats:
    """The bin-histogram statistics of one comparison (or a stack of R replicates)."""

    z: np.ndarray  # (K,) or (R, K)
    mean_z2: np.ndarray  # mean of z^2 over bins: about 1 when the shares agree
    ndb_k: np.ndarray  # share of bins with |z| above the bin-level critical value
    js: np.ndarray  # Jensen-Shannon divergence of the two histograms, nats


def _js_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> np.ndarray:
        ratio = np.divide(a, m, out=np.ones_like(a), where=a > 0)
        return np.sum(a * np.log(ratio), axis=-1)

    return 0.5 * (kl(p) + kl(q))


def bin_stats(train: BinSample, gen: BinSample, bin_alpha: float = 0.05) -> BinStats:
    """Richardson & Weiss's pooled two-proportion z-test per bin with each sample size replaced by
    its effective size n / D (Kish): with p, q the two shares and N', n' the effective sizes,

        pooled = (N' p + n' q) / (N' + n'),  z = (q - p) / sqrt(pooled (1 - pooled) (1/N' + 1/n')).

    Returns z, mean z^2 (the test statistic), NDB/K (bins with two-sided p below ``bin_alpha``)
    and JS, for one comparison (K,) or a stack of replicates (R, K)."""
    n1, n2 = np.reshape(train.effective_size, (-1, 1)), np.reshape(gen.effective_size, (-1, 1))
    if np.ndim(train.shares) == 1 and np.ndim(gen.shares) == 1:
        n1, n2 = n1[0], n2[0]
    p, q = train.shares, gen.shares
    pooled = (n1 * p + n2 * q) / (n1 + n2)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    z = np.divide(q - p, se, out=np.zeros(np.broadcast(p, q).shape), where=se > 0)
    return BinStats(
        z=z,
        mean_z2=np.mean(z**2, axis=-1),
        ndb_k=np.mean(np.abs(z) > norm.isf(bin_alpha / 2), axis=-1),
        js=_js_rows(np.asarray(p, float), np.asarray(q, float)),
    )


def _bootstrap_weights(groups: int, draws: int, reps: int, rng: np.random.Generator) -> np.ndarray:
    """(reps, groups) counts: ``draws`` episodes drawn with replacement, per replicate."""
    return rng.multinomial(draws, np.full(groups, 1.0 / groups), size=reps).astype(np.float64)


def bin_null(
    train_counts: np.ndarray,
    n: int,
    reps: int,
    rng: np.random.Generator,
    bin_alpha: float = 0.05,
    gen_episodes: int | None = None,
    gen_shares: np.ndarray | None = None,
) -> BinStats:
    """``reps`` replicates of :func:`bin_stats` under the null that generated frames come from
    the training distribution p, the whole statistic (shares and design effects) recomputed on
    each resample: the training side is a cluster bootstrap of its episodes, the generated side
    ``n`` i.i.d. frames from p (``gen_episodes=None``) or that many whole training episodes drawn
    with replacement. ``gen_shares`` replaces p as the generated side's distribution (power
    under an alternative)."""
    groups = len(train_counts)
    train, _ = _weighted_sample(train_counts, _bootstrap_weights(groups, groups, reps, rng))
    if gen_episodes is None:
        truth = bin_sample(train_counts).shares if gen_shares is None else gen_shares
        q = rng.multinomial(n, truth / truth.sum(), size=reps) / n
        gen = BinSample(q, np.full(reps, float(n)), np.ones(reps))
    else:
        weights = _bootstrap_weights(groups, gen_episodes, reps, rng)
        gen, _ = _weighted_sample(train_counts, weights)
    return bin_stats(train, gen, bin_alpha)


def drop_a_third(shares: np.ndarray) -> np.ndarray:
    """The reference alternative for the minimum size: a generator that never produces every
    third bin in order of share (bins 3, 6, 9, ... by share: a third of the modes, spread over
    common and rare ones) and is right about the rest."""
    dropped = np.zeros(len(shares), bool)
    order = np.argsort(-shares, kind="stable")
    dropped[order[2::3]] = True
    alt = np.where(dropped, 0.0, shares)
    return alt / alt.sum()


SIZE_GRID = (100, 150, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 7500, 10_000, 20_000)


def min_frames(
    train_counts: np.ndarray,
    level: float,
    power: float = 0.9,
    reps: int = 200,
    seed: int = 0,
    grid: tuple[int, ...] = SIZE_GRID,
) -> int | None:
    """The smallest size on ``grid`` at which the mean-z^2 test at ``level`` rejects the
    :func:`drop_a_third` generator with probability at least ``power``; ``None`` if no size on
    the grid does (too few training episodes for any sample to tell)."""
    rng = np.random.default_rng(seed)
    alt = drop_a_third(bin_sample(train_counts).shares)
    for n in grid:
        null = bin_null(train_counts, n, reps, rng).mean_z2
        critical = np.quantile(null, 1 - level)
        under_alt = bin_null(train_counts, n, reps, rng, gen_shares=alt).mean_z2
        if np.mean(under_alt > critical) >= power:
            return n
    return None


# --- per-frame statistics: medians and tail shares against a reference pool ------------------


def frame_statistic(
    reference: np.ndarray, generated: np.ndarray, kind: str, quantile: float
) -> float:
    """A per-frame value's summary, generated vs reference.

    ``kind="log_median_ratio"``: log(Q_generated / Q_reference) at ``quantile`` (0.5: the
    medians). ``kind="share_below"``: the share of generated values below the reference's
    ``quantile``. Quantiles are the inverted empirical CDF (an observed value)."""

    def at(x: np.ndarray) -> float:
        return float(np.quantile(x, quantile, method="inverted_cdf"))

    if kind == "log_median_ratio":
        with np.errstate(divide="ignore"):
            return float(np.log(at(generated) / at(reference)))
    if kind == "share_below":
        return float(np.mean(generated < at(reference)))
    raise ValueError(f"kind must be log_median_ratio or share_below, got {kind!r}")


def frame_null(
    reference: np.ndarray,
    episodes: np.ndarray,
    n: int,
    kind: str,
    reps: int,
    rng: np.random.Generator,
    quantile: float = 0.5,
    gen_episodes: int | None = None,
) -> np.ndarray:
    """``reps`` null replicates of :func:`frame_statistic` for a generated set of ``n`` frames.

    Each replicate: the reference is a cluster bootstrap of the reference frames (their G
    episodes drawn with replacement); the generated set is ``n`` reference frames drawn i.i.d.
    (a generator's samples) or ``gen_episodes`` whole episodes (a real file)."""
    reference = np.asarray(reference, np.float64)
    _, group = np.unique(np.asarray(episodes), return_inverse=True)
    order = np.argsort(group, kind="stable")
    per_episode = np.split(reference[order], np.cumsum(np.bincount(group))[:-1])

    def episodes_drawn(count: int) -> np.ndarray:
        return np.concatenate([per_episode[g] for g in rng.integers(len(per_episode), size=count)])

    out = np.empty(reps)
    for r in range(reps):
        ref = episodes_drawn(len(per_episode))
        if gen_episodes is None:
            gen = reference[rng.integers(len(reference), size=n)]
        else:
            gen = episodes_drawn(gen_episodes)
        out[r] = frame_statistic(ref, gen, kind, quantile)
    return out
