"""The trainer's collapse monitor: NDB and the collapse check on EMA samples, during training.

Every ``monitor_interval`` steps the EMA generator draws the same ``samples`` frames (fixed latents,
so successive rows compare like with like). They are binned against K-means bins fitted once on
the training frames (NDB, Richardson & Weiss 2018) and their nearest-other-frame distances are
compared with held-out real frames' (``carsynth.metrics.collapse_check``): the same functions
``carsynth validate`` uses, so the monitor and the final verdict agree on what collapse means.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from carsynth.metrics import NDBBins, collapse_check, neighbour_space
from carsynth.sampling import generate_frames, mix_seed

FIT_SAMPLES = 10_000  # training frames the bins and the neighbour space are fitted on
MONITOR_STREAM = 1  # mixed into the run's seed for the monitor's latents


class CollapseMonitor:
    """Fitted once on the training and held-out frames; called with the EMA generator."""

    def __init__(
        self,
        train: np.ndarray,
        holdout: np.ndarray,
        samples: int,
        k: int,
        seed: int,
        device: torch.device,
    ) -> None:
        self.samples, self.seed, self.device = samples, seed, device
        self.latent_seed = mix_seed(seed, MONITOR_STREAM)
        self.bins = NDBBins.fit(train, k=k, seed=seed, device=device)
        self.space = neighbour_space(train, seed=seed, device=device)
        self.holdout = holdout
        # A fresh generator draws near-identical frames for its first hundreds of steps; that is
        # not collapse. A run has collapsed when the check fails after it has passed once.
        self.passed_before = False

    def __call__(self, generator: nn.Module) -> dict[str, Any]:
        """Metrics-row entries: ndb (NDB/K), ndb_js, collapse_ratio, duplicate_share,
        collapse_passed (this check) and collapsed (it failed after an earlier check passed)."""
        # Latents of their own stream: not the fixed-noise sample grid's (latents(seed, 0, 64)).
        fake = generate_frames(generator, self.latent_seed, 0, self.samples, device=self.device)
        ndb = self.bins.compare(fake)
        collapse = collapse_check(fake, self.holdout, self.space, seed=self.seed)
        collapsed_now = self.passed_before and not collapse.passed
        self.passed_before = self.passed_before or collapse.passed
        return {
            "ndb": ndb.score,
            "ndb_js": ndb.js_divergence,
            "collapse_ratio": collapse.ratio,
            "duplicate_share": collapse.duplicate_share,
            "collapse_passed": collapse.passed,
            "collapsed": collapsed_now,
            "collapse_failures": collapse.failures,
        }
