"""Sharpness: how much a frame changes from one pixel to the next (high-frequency energy).

Pixel noise raises it, blur and dimming lower it, and a generator's checkerboard artefacts raise
it; none of these moves K-means bins on 32x32 averages much, so NDB cannot see them. Per frame:

    s(x) = mean over channels and adjacent pixel pairs of |x[i] - x[i']|   (pixels in [0, 255]),

the mean absolute first difference along rows and columns (the anisotropic total variation per
pixel, Rudin, Osher & Fatemi 1992). ``validate`` compares the generated frames' median with the
real frames' median on a log scale, against an episode-resampled null
(:func:`carsynth.metrics.null.frame_null`).
"""

from __future__ import annotations

import numpy as np

from carsynth.metrics.features import CHUNK


def sharpness(frames: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """Mean absolute difference between horizontally and vertically adjacent pixels, per frame:
    float64 (N,). ``frames``: uint8 (N, H, W, 3) with H, W >= 2."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or min(frames.shape[1:3]) < 2:
        raise ValueError(f"expected uint8 frames (N, H, W, 3), H, W >= 2, got {frames.shape}")
    out = np.empty(len(frames))
    for start in range(0, len(frames), chunk):
        x = frames[start : start + chunk].astype(np.int16)
        rows = np.abs(np.diff(x, axis=1)).sum(axis=(1, 2, 3))
        cols = np.abs(np.diff(x, axis=2)).sum(axis=(1, 2, 3))
        h, w, c = x.shape[1:]
        pairs = ((h - 1) * w + h * (w - 1)) * c
        out[start : start + len(x)] = (rows + cols) / pairs
    return out
