"""NDB: the Number of statistically Different Bins (Richardson & Weiss 2018, "On GANs and GMMs").

K-means cuts the real training samples into K bins. Every real and generated sample falls in the
bin of its nearest centroid, and each bin's two proportions are compared with a two-proportion
z-test. A generator that covers the data distribution has few different bins (about ``alpha * K``
by chance); one that drops modes has empty bins, one that collapses onto a few modes has
over-full ones. The Jensen-Shannon divergence between the two bin histograms summarises both.

Usage::

    from carsynth.metrics import ndb
    result = ndb(real_frames, fake_frames, k=100, alpha=0.05, seed=0)
    result.score, result.num_different_bins, result.js_divergence

Fit the bins once and compare many samples against them (what ``validate`` and the trainer's
collapse monitor do)::

    bins = NDBBins.fit(real_frames, k=100, seed=0)
    bins.compare(fake_frames).score
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import norm

from carsynth.metrics.features import Space, check_samples, squared_distances


@dataclass
class NDBResult:
    """NDB of one sample against the real bins. Arrays are per bin, bins sorted by real share."""

    k: int
    alpha: float
    num_real: int
    num_fake: int
    num_different_bins: int
    score: float  # num_different_bins / k
    js_divergence: float  # nats, in [0, ln 2]
    different: np.ndarray  # bool (k,)
    real_proportions: np.ndarray  # float (k,)
    fake_proportions: np.ndarray  # float (k,)
    z: np.ndarray  # float (k,), positive where the fake sample has the larger share
    p_values: np.ndarray  # float (k,), two-sided

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the scores and the per-bin table."""
        return {
            "k": self.k,
            "alpha": self.alpha,
            "num_real": self.num_real,
            "num_fake": self.num_fake,
            "num_different_bins": self.num_different_bins,
            "score": self.score,
            "js_divergence": self.js_divergence,
            "bins": {
                "different": self.different.tolist(),
                "real_proportion": self.real_proportions.tolist(),
                "fake_proportion": self.fake_proportions.tolist(),
                "z": self.z.tolist(),
                "p_value": self.p_values.tolist(),
            },
        }


def two_proportion_z_test(
    p1: np.ndarray, n1: int, p2: np.ndarray, n2: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled two-proportion z-test: ``(z, two-sided p-value)`` per entry.

    z = (p2 - p1) / sqrt(p (1 - p) (1/n1 + 1/n2)) with the pooled p = (n1 p1 + n2 p2) / (n1 + n2),
    as in Richardson & Weiss 2018, section 4. A bin empty in both samples has z = 0, p = 1.
    """
    p1, p2 = np.asarray(p1, dtype=np.float64), np.asarray(p2, dtype=np.float64)
    pooled = (n1 * p1 + n2 * p2) / (n1 + n2)
    se = np.sqrt(pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, (p2 - p1) / se, 0.0)
    return z, 2.0 * norm.sf(np.abs(z))


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (natural log) between two histograms that each sum to 1."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        used = a > 0
        return float(np.sum(a[used] * np.log(a[used] / m[used])))

    return 0.5 * (kl(p) + kl(q))


def _kmeans_plus_plus(x: torch.Tensor, k: int, rng: np.random.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre is the best of
    ``2 + ln k`` candidates drawn with probability proportional to the squared distance to the
    nearest centre so far (the variant scikit-learn uses; it rarely puts two seeds in one mode).
    """
    n = len(x)
    trials = 2 + int(math.log(k))
    x_sq = x.square().sum(1)
    centres = [int(rng.integers(n))]
    closest = squared_distances(x, x[centres], x_sq[centres], x_sq).squeeze(1)
    for _ in range(1, k):
        weights = closest.double().cpu().numpy()
        total = weights.sum()
        if total <= 0:  # fewer distinct points than k: any point will do
            candidates = rng.integers(n, size=trials)
        else:
            candidates = rng.choice(n, size=trials, p=weights / total)
        cand = torch.as_tensor(candidates, device=x.device)
        d = squared_distances(x, x[cand], x_sq[cand], x_sq)  # (n, trials)
        potentials = torch.minimum(d, closest.unsqueeze(1)).sum(0)
        best = int(potentials.argmin())
        centres.append(int(candidates[best]))
        closest = torch.minimum(closest, d[:, best])
    return x[centres].clone()


def kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Lloyd's K-means on the rows of ``x`` (n, d) from greedy k-means++ seeds; centroids (k, d).

    Stops when no assignment changes or after ``iters`` iterations. A bin left empty is reseeded
    at the sample farthest from its centroid, so all k bins stay in use.
    """
    centroids = _kmeans_plus_plus(x, k, np.random.default_rng(seed))
    x_sq = x.square().sum(1)
    labels = None
    for _ in range(iters):
        d = squared_distances(x, centroids, centroids.square().sum(1), x_sq)
        best, new_labels = d.min(1)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        # Per-bin sums as one matrix product with the one-hot assignment (a GEMM on any device;
        # index_add_ is serial on the CPU and 10x slower here).
        one_hot = F.one_hot(labels, k).to(x.dtype)
        counts = one_hot.sum(0)
        centroids = (one_hot.T @ x) / counts.clamp(min=1).unsqueeze(1)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            centroids[empty] = x[best.argsort(descending=True)[: len(empty)]]
    return centroids


class NDBBins:
    """K-means bins fitted on real samples, and the real samples' share of each bin.

    Bins are numbered by decreasing real share. ``space`` maps samples to the vectors K-means
    runs on (downsampled pixels; see :class:`~carsynth.metrics.features.Space`).
    """

    def __init__(self, centroids: torch.Tensor, real_counts: np.ndarray, space: Space):
        self.centroids = centroids
        self.real_counts = real_counts
        self.space = space

    @property
    def k(self) -> int:
        return len(self.centroids)

    @property
    def num_real(self) -> int:
        return int(self.real_counts.sum())

    @property
    def real_proportions(self) -> np.ndarray:
        return self.real_counts / self.num_real

    @classmethod
    def fit(
        cls,
        real: np.ndarray,
        k: int = 100,
        seed: int = 0,
        *,
        max_fit_samples: int = 10_000,
        iters: int = 30,
        resolution: int | None = 32,
        device: str | torch.device | None = None,
    ) -> NDBBins:
        """Fit K-means on at most ``max_fit_samples`` real samples (a seeded subsample), then
        count every real sample into the bins.

        ``resolution``: frames are area-averaged to this size first (32 keeps a 64x64 frame's road
        layout and colours at a quarter of the cost; the NDB authors likewise cluster on a
        subset of the pixel dimensions). ``None`` clusters the full-size pixels.
        """
        real = check_samples(real, "real")
        if k < 2 or len(real) < k:
            raise ValueError(f"NDB with k={k} bins needs at least k real samples, got {len(real)}")
        space = Space(resolution, device)
        rng = np.random.default_rng(seed)
        fit_index = np.sort(rng.choice(len(real), min(len(real), max_fit_samples), replace=False))
        centroids = kmeans(space.transform(real[fit_index]), k, iters=iters, seed=seed)
        counts = np.bincount(cls(centroids, np.ones(k), space).assign(real), minlength=k)
        order = np.argsort(-counts, kind="stable")
        return cls(centroids[torch.as_tensor(order, device=centroids.device)], counts[order], space)

    def assign(self, x: np.ndarray) -> np.ndarray:
        """The bin of each sample (int64, (N,))."""
        x = check_samples(x, "samples")
        c_sq = self.centroids.square().sum(1)
        labels = [
            squared_distances(v, self.centroids, c_sq).argmin(1).cpu() for v in self.space.chunks(x)
        ]
        return torch.cat(labels).numpy() if labels else np.zeros(0, np.int64)

    def compare(self, fake: np.ndarray, alpha: float = 0.05) -> NDBResult:
        """NDB of ``fake`` against the real bins at significance ``alpha``."""
        fake = check_samples(fake, "fake")
        if len(fake) == 0:
            raise ValueError("fake: no samples")
        fake_counts = np.bincount(self.assign(fake), minlength=self.k)
        p_real, p_fake = self.real_proportions, fake_counts / len(fake)
        z, p_values = two_proportion_z_test(p_real, self.num_real, p_fake, len(fake))
        different = p_values < alpha
        return NDBResult(
            k=self.k,
            alpha=alpha,
            num_real=self.num_real,
            num_fake=len(fake),
            num_different_bins=int(different.sum()),
            score=float(different.sum() / self.k),
            js_divergence=js_divergence(p_real, p_fake),
            different=different,
            real_proportions=p_real,
            fake_proportions=p_fake,
            z=z,
            p_values=p_values,
        )


def ndb(
    real: np.ndarray,
    fake: np.ndarray,
    k: int = 100,
    alpha: float = 0.05,
    seed: int = 0,
    *,
    max_fit_samples: int = 10_000,
    iters: int = 30,
    resolution: int | None = 32,
    device: str | torch.device | None = None,
) -> NDBResult:
    """NDB and JS divergence of ``fake`` against ``real`` (Richardson & Weiss 2018).

    ``real`` and ``fake`` are uint8 frames (N, H, W, 3) or float features (N, D). K-means with
    ``k`` bins is fitted on ``real`` (see :meth:`NDBBins.fit` for the other arguments); a bin is
    different when its pooled two-proportion z-test gives a two-sided p-value below ``alpha``.
    """
    bins = NDBBins.fit(
        real, k, seed, max_fit_samples=max_fit_samples, iters=iters, resolution=resolution,
        device=device,
    )  # fmt: skip
    return bins.compare(fake, alpha)
