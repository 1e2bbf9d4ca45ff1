"""Density and coverage (Naeem, Oh, Uh, Choi & Yoo 2020, "Reliable fidelity and diversity metrics
for generative models", ICML).

Each real sample X_i gets a ball of radius r_i = the distance to its k-th nearest other real
sample. With N real samples X_i and M generated samples Y_j:

    density  = 1 / (k M) * sum_j #{i : |Y_j - X_i| < r_i}       (fidelity; about 1 for real data)
    coverage = 1 / N * #{i : some Y_j has |Y_j - X_i| < r_i}     (diversity; at most 1)

Low coverage means modes are missing; low density means generated samples lie off the real data
(unrealistic); density well above 1 means they crowd the densest real regions. Both are
computed in the neighbour space and reported with the same numbers for held-out real frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from carsynth.metrics.features import CHUNK, squared_distances


@dataclass
class DensityCoverage:
    k: int
    num_real: int
    num_fake: int
    density: float
    coverage: float

    def to_dict(self) -> dict[str, float | int]:
        return {
            "k": self.k,
            "num_real": self.num_real,
            "num_fake": self.num_fake,
            "density": self.density,
            "coverage": self.coverage,
        }


def knn_radii(real: torch.Tensor, k: int, chunk: int = CHUNK) -> torch.Tensor:
    """Distance from each real row to its k-th nearest other real row."""
    real_sq = real.square().sum(1)
    radii = []
    for start in range(0, len(real), chunk):
        d = squared_distances(real[start : start + chunk], real, real_sq)
        # The row itself is at distance 0: the (k+1)-th smallest is the k-th nearest other.
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k].sqrt())
    return torch.cat(radii)


def density_coverage(
    real: torch.Tensor, fake: torch.Tensor, k: int = 5, chunk: int = CHUNK
) -> DensityCoverage:
    """Density and coverage of ``fake`` (N, d) against ``real`` (M, d), both in one space."""
    if len(real) <= k or len(fake) == 0:
        raise ValueError(f"density/coverage with k={k} needs more than k real and some fake rows")
    radii_sq = knn_radii(real, k, chunk).square()
    real_sq = real.square().sum(1)
    inside_count = torch.zeros((), dtype=torch.float64, device=real.device)
    covered = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    for start in range(0, len(fake), chunk):
        inside = squared_distances(fake[start : start + chunk], real, real_sq) < radii_sq
        inside_count += inside.sum()
        covered |= inside.any(0)
    return DensityCoverage(
        k=k,
        num_real=len(real),
        num_fake=len(fake),
        density=float(inside_count) / (k * len(fake)),
        coverage=int(covered.sum()) / len(real),
    )
