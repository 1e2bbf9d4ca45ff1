"""The collapse monitor: NDB and the nearest-neighbour collapse check while a GAN trains.

A collapsing generator does not announce itself in the losses: the discriminator keeps winning or
losing as before while the samples shrink onto a few frames. The monitor measures it directly,
with the same statistics ``carsynth validate`` judges the final generator by (Richardson & Weiss
2018 for NDB; the neighbour collapse check of :mod:`carsynth.metrics.neighbours`):

- once per run it fits the NDB bins on (a seeded, capped subsample of) the training frames and the
  neighbour space on the same frames, and reads a seeded subsample of the held-out frames;
- every ``monitor_interval`` steps it samples ``monitor_samples`` frames from the EMA generator
  with *fixed* latents (their own seed stream, distinct from the fixed-noise sample grid, so the
  curve shows the generator changing and not the noise) and returns NDB/K, the JS divergence, the
  collapse ratio and the near-duplicate share, which the trainer adds to its ``metrics.jsonl`` row.

The thresholds are :class:`~carsynth.validate.ValidationConfig`'s defaults, so "collapsed" here
means exactly what a failed collapse check in ``validate`` and ``export`` means. A freshly
initialised DCGAN fails that check too (its outputs are nearly constant), so :attr:`has_collapsed`
-- what ``--stop-on-collapse`` acts on -- asks for a *loss* of diversity: the check fails now and
passed at an earlier measurement of the run.

The monitor draws no random numbers from torch's global generators (latents come from seeded
``torch.Generator`` objects, subsamples from NumPy ``default_rng``), so switching it on does not
change the training run: a monitored run ends with the same weights as an unmonitored one.

Cost, per measurement: generating ``monitor_samples`` frames (one EMA forward pass each), one
nearest-centroid assignment and two ``monitor_samples``-sized nearest-neighbour searches; once per
run, K-means on up to ``ValidationConfig.ndb_fit_samples`` training frames and a PCA. See the
README for measured times.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from carsynth import storage
from carsynth.errors import UsageError
from carsynth.metrics.ndb import NDBBins
from carsynth.metrics.neighbours import CollapseResult, collapse_check, neighbour_space
from carsynth.sampling import generate_frames, mix_seed
from carsynth.validate import ValidationConfig

MONITOR_STREAM = 0x6D6F6E  # mixed into the run seed: the monitor's latents, distinct from the grid
KEYS = (
    "monitor_ndb",
    "monitor_ndb_baseline",
    "monitor_js",
    "monitor_collapse_ratio",
    "monitor_duplicate_share",
    "monitor_collapsed",
    "monitor_seconds",
)


def latent_seed(run_seed: int) -> int:
    """The seed of the monitor's fixed latents for a run seeded with ``run_seed``."""
    return mix_seed(run_seed, MONITOR_STREAM)


def check_settings(interval: int, samples: int, log_interval: int, stop: bool) -> None:
    """``UsageError`` for monitor settings the trainer cannot honour."""
    if interval < 0:
        raise UsageError(f"--monitor-interval must be >= 0 (0 = off), got {interval}")
    if interval and interval % log_interval:
        raise UsageError(
            f"--monitor-interval {interval} must be a multiple of --log-interval {log_interval} "
            "(the monitor's values go into the metrics rows)"
        )
    if samples < 2:
        raise UsageError(f"--monitor-samples must be >= 2, got {samples}")
    if stop and not interval:
        raise UsageError("--stop-on-collapse needs --monitor-interval > 0")


def read_subsample(
    f: storage.FrameFile, ranges: list[tuple[int, int]], count: int, seed: int
) -> np.ndarray:
    """At most ``count`` frames drawn without replacement (seeded) from the frame ``ranges`` of
    ``f``, in file order. Read range by range (contiguous reads), never the whole split at once."""
    rows = np.concatenate([np.arange(a, b) for a, b in ranges] or [np.zeros(0, np.int64)])
    chosen = np.sort(np.random.default_rng(seed).choice(len(rows), min(count, len(rows)), False))
    picked = rows[chosen]
    parts = []
    for a, b in ranges:
        inside = picked[(picked >= a) & (picked < b)]
        if len(inside):
            parts.append(f.frames[int(inside[0]) : int(inside[-1]) + 1][inside - inside[0]])
    if not parts:
        return np.zeros((0, *f.frame_size, 3), np.uint8)
    return np.concatenate(parts)


class CollapseMonitor:
    """NDB and the collapse check of a generator's fixed-latent samples, against held-out frames.

    ``train``/``holdout``: uint8 frames (N, H, W, 3). The bins and the neighbour space are fitted
    here, once; :meth:`measure` is then cheap enough to call every few hundred steps.
    """

    def __init__(
        self,
        train: np.ndarray,
        holdout: np.ndarray,
        samples: int = 500,
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        if len(holdout) < 2:
            raise UsageError(
                f"the collapse monitor needs held-out frames, got {len(holdout)} "
                "(a real file with holdout episodes, or --holdout F)"
            )
        self.config = ValidationConfig(seed=seed, device=None if device is None else str(device))
        c = self.config
        if len(train) < c.k:
            raise UsageError(f"the collapse monitor needs at least {c.k} training frames")
        self.samples, self.seed, self.holdout = samples, seed, holdout
        self.bins = NDBBins.fit(
            train, c.k, c.seed, max_fit_samples=c.ndb_fit_samples, iters=c.kmeans_iters,
            resolution=c.ndb_resolution, device=c.device,
        )  # fmt: skip
        self.baseline = self.bins.compare(holdout, c.alpha).score
        self.space = neighbour_space(
            train, c.space, resolution=c.nn_resolution, dims=c.pca_dims,
            fit_samples=c.pca_fit_samples, seed=c.seed, device=c.device,
        )  # fmt: skip
        self.last: CollapseResult | None = None
        self.passed_before = False  # whether an earlier measurement passed the collapse check

    @classmethod
    def for_run(
        cls,
        f: storage.FrameFile,
        ranges: dict[str, list[tuple[int, int]]],
        samples: int,
        seed: int,
        device: str | torch.device | None = None,
    ) -> CollapseMonitor:
        """The monitor of a training run on ``f`` with these train/holdout frame ``ranges``.

        Training frames are capped at ``ValidationConfig.ndb_fit_samples`` (what K-means would
        use anyway) and held-out frames at ``samples`` (the collapse check compares equal
        numbers), so a 500,000-frame file costs the same as a 10,000-frame one.
        """
        cap = ValidationConfig.ndb_fit_samples
        train = read_subsample(f, ranges["train"], cap, seed)
        holdout = read_subsample(f, ranges["holdout"], samples, seed)
        return cls(train, holdout, samples, seed, device)

    @property
    def has_collapsed(self) -> bool:
        """The last measurement failed the collapse check after an earlier one had passed."""
        return self.last is not None and not self.last.passed and self.passed_before

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Take up a resumed run's history from its kept metrics rows."""
        self.passed_before = any(r.get("monitor_collapsed") is False for r in rows)

    @torch.no_grad()
    def frames(self, generator: nn.Module, device: str | torch.device = "cpu") -> np.ndarray:
        """The generator's frames for the monitor's fixed latents: uint8 (samples, H, W, 3)."""
        return generate_frames(generator, latent_seed(self.seed), 0, self.samples, device=device)

    def measure(self, generator: nn.Module, device: str | torch.device = "cpu") -> dict[str, Any]:
        """The ``monitor_*`` values of ``generator`` (in eval mode) for a metrics row."""
        tick = time.perf_counter()
        fake = self.frames(generator, device)
        c = self.config
        ndb = self.bins.compare(fake, c.alpha)
        if self.last is not None:
            self.passed_before |= self.last.passed
        self.last = collapse_check(
            fake, self.holdout, self.space, min_ratio=c.min_collapse_ratio,
            duplicate_quantile=c.duplicate_quantile, max_duplicate_share=c.max_duplicate_share,
            seed=c.seed,
        )  # fmt: skip
        return {
            "monitor_ndb": ndb.score,
            "monitor_ndb_baseline": self.baseline,
            "monitor_js": ndb.js_divergence,
            "monitor_collapse_ratio": self.last.ratio,
            "monitor_duplicate_share": self.last.duplicate_share,
            "monitor_collapsed": not self.last.passed,
            "monitor_seconds": round(time.perf_counter() - tick, 3),
        }

    def plot(self, metrics_path: Path, out: Path) -> None:
        """Draw the ``monitor_*`` columns of a run's ``metrics.jsonl`` into ``out`` (PNG)."""
        from carsynth.metrics.report import plot_monitor

        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
        c = self.config
        plot_monitor(rows, c.min_collapse_ratio, c.max_duplicate_share, out)
