"""The spaces the metrics measure in, and chunked nearest-centroid / nearest-neighbour search.

Frames arrive as uint8 arrays (N, H, W, 3); the metrics turn them into float vectors on the
compute device one chunk at a time, so a 50,000-frame file never exists as float32 all at once.
Plain float feature arrays (N, D) pass through unchanged (the Gaussian-blob tests use them).

Distances are squared Euclidean distances computed as ``|a|^2 - 2 a.b + |b|^2`` with one matrix
product per chunk: on a CPU this is a BLAS GEMM, on a GPU a cuBLAS one, and both are an order of
magnitude faster than looping over pairs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from carsynth.devices import resolve_device
from carsynth.files import to_float

# Rows per chunk: a 1024 x 50,000 float32 distance block is 200 MB, small enough for any device.
CHUNK = 1024


def check_samples(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as uint8 frames (N, H, W, 3) or float features (N, D); ValueError naming ``name``."""
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[3] == 3 and x.dtype == np.uint8:
        return x
    if x.ndim == 2 and np.issubdtype(x.dtype, np.floating):
        return x
    raise ValueError(
        f"{name}: expected uint8 frames (N, H, W, 3) or float features (N, D), "
        f"got {x.dtype} {x.shape}"
    )


class Space:
    """A map from samples to float32 vectors: downsampled pixels, optionally PCA-projected.

    ``resolution``: frames are area-averaged to ``resolution`` x ``resolution`` (``None`` keeps
    the full size), scaled to [0, 1] and flattened; feature arrays (N, D) are used as they are.
    ``mean`` and ``components`` (D, q), when set, centre and project the vectors (PCA).
    """

    def __init__(
        self,
        resolution: int | None = None,
        device: str | torch.device | None = None,
        mean: torch.Tensor | None = None,
        components: torch.Tensor | None = None,
    ):
        self.resolution = resolution
        # Not MPS by default: NDB's K-means++ weights are float64, which MPS lacks.
        self.device = resolve_device(device, allow_mps=False)
        self.mean = mean
        self.components = components

    def _vectors(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        if t.ndim == 2:
            return t.float()
        images = to_float(t, signed=False)
        if self.resolution is not None and self.resolution < images.shape[-1]:
            # Area averaging (not strided picking) keeps every pixel's contribution.
            images = F.adaptive_avg_pool2d(images, self.resolution)
        return images.flatten(1)

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        """One chunk of samples as float32 vectors (n, d) on the device."""
        v = self._vectors(x)
        if self.mean is not None:
            v = v - self.mean
        if self.components is not None:
            v = v @ self.components
        return v

    def chunks(self, x: np.ndarray, chunk: int = CHUNK) -> Iterator[torch.Tensor]:
        for start in range(0, len(x), chunk):
            yield self(x[start : start + chunk])

    def transform(self, x: np.ndarray, chunk: int = CHUNK) -> torch.Tensor:
        """All of ``x`` as one (N, d) float32 tensor on the device."""
        return torch.cat(list(self.chunks(x, chunk)))

    def fit_pca(self, x: np.ndarray, dims: int, seed: int = 0, power_iters: int = 4) -> Space:
        """A copy of this space followed by the top ``dims`` principal components of ``x``.

        Randomized SVD (Halko, Martinsson & Tropp 2011, "Finding structure with randomness",
        Alg. 4.4): project the centred data on ``dims + 10`` seeded Gaussian directions, sharpen
        the range with ``power_iters`` orthonormalised power iterations, then take the exact SVD
        of the small projected matrix. Seeded on the CPU, so every device gets the same basis.
        """
        v = self.transform(x)
        mean = v.mean(0)
        v = v - mean
        q = min(dims + 10, *v.shape)
        gen = torch.Generator().manual_seed(seed)
        omega = torch.randn(v.shape[1], q, generator=gen).to(v.device)
        basis = torch.linalg.qr(v @ omega).Q
        for _ in range(power_iters):
            basis = torch.linalg.qr(v @ (v.T @ basis)).Q
        _, _, vh = torch.linalg.svd(basis.T @ v, full_matrices=False)
        components = vh[: min(dims, q)].T.contiguous()
        return Space(self.resolution, self.device, mean=mean, components=components)


def squared_distances(
    a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor, a_sq: torch.Tensor | None = None
) -> torch.Tensor:
    """``|a_i - b_j|^2`` for all pairs (clamped at 0); ``b_sq`` = ``|b_j|^2`` precomputed, and
    ``a_sq`` = ``|a_i|^2`` too when the caller has it."""
    d = torch.addmm(b_sq.unsqueeze(0), a, b.T, alpha=-2.0)
    a_sq = a.square().sum(1) if a_sq is None else a_sq
    return d.add_(a_sq.unsqueeze(1)).clamp_(min=0.0)


def nearest(
    query: torch.Tensor,
    ref: torch.Tensor,
    exclude_self: bool = False,
    chunk: int = CHUNK,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query row to its nearest ``ref`` row, and that row's index.

    ``exclude_self``: query and ref are the same set and a row may not be its own neighbour
    (the nearest *other* sample). ``groups``: (query groups, ref groups), integer ids per row
    (e.g. episodes); a row's neighbour must come from another group.
    """
    if exclude_self and len(ref) < 2:
        raise ValueError("the nearest other sample needs at least 2 samples")
    ref_sq = ref.square().sum(1)
    dists, index = [], []
    for start in range(0, len(query), chunk):
        d = squared_distances(query[start : start + chunk], ref, ref_sq)
        if exclude_self:
            rows = torch.arange(len(d), device=d.device)
            d[rows, rows + start] = math.inf
        if groups is not None:
            same = groups[0][start : start + chunk, None] == groups[1][None, :]
            d.masked_fill_(same, math.inf)
        best, where = d.min(1)
        dists.append(best.sqrt())
        index.append(where)
    return torch.cat(dists).cpu().numpy(), torch.cat(index).cpu().numpy()
