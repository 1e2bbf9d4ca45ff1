"""Why a training run stops before its budget, and how it stops cleanly.

- :class:`StopSignals`: Ctrl-C (SIGINT) or a cluster's SIGTERM before its time limit only set a
  flag; the loop finishes the step it is in, saves a checkpoint of it and raises
  :class:`TrainingInterrupted`. A signal never lands between two halves of an optimiser update,
  so the saved state is one the uninterrupted run also passed through (resume is bit-identical).
  A second Ctrl-C while the checkpoint is written is held back until it is complete.
- :func:`check_divergence`: losses that are NaN/Inf or larger than ``MAX_ABS_LOSS``, weights
  larger than ``MAX_ABS_WEIGHT``. A diverged run raises :class:`TrainingDiverged` and keeps its
  last good checkpoint.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Iterable
from pathlib import Path
from types import FrameType

import torch

# A DCGAN's losses stay within tens (BCE is bounded by log(2) at balance; feature matching by the
# feature scale; a WGAN-GP critic's values by about 1e2). Weights stay within a few units (DCGAN's
# init has std 0.02; batch norm keeps activations, not weights, at scale). Far beyond both is
# divergence: `--lr 1e6` reaches losses of 5e15 and weights of 9e28 within 100 steps.
MAX_ABS_LOSS = 1e6
MAX_ABS_WEIGHT = 1e4
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingDiverged(RuntimeError):
    """A loss or weight became NaN, Inf or exploded; the last good checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the run saved ``checkpoint`` (after ``step`` updates) and stopped."""

    def __init__(self, step: int, checkpoint: Path | None):
        self.step, self.checkpoint = step, checkpoint
        saved = f"checkpoint {checkpoint} saved" if checkpoint else "nothing trained yet"
        super().__init__(f"interrupted at step {step}; {saved}")


class StopSignals:
    """A context in which SIGINT and SIGTERM set :attr:`requested` instead of raising.

    Outside the main thread (where Python cannot install handlers) it does nothing. ``hold()``
    marks a section (writing a checkpoint) that even a second signal waits for; outside it a
    second signal raises ``KeyboardInterrupt`` at once, for a user who really means it.
    """

    def __init__(self) -> None:
        self.requested = False
        self.holding = False
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)  # type: ignore[arg-type]

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.requested and not self.holding:
            raise KeyboardInterrupt
        self.requested = True

    def hold(self) -> _Hold:
        return _Hold(self)


class _Hold:
    def __init__(self, signals: StopSignals) -> None:
        self.signals = signals

    def __enter__(self) -> None:
        self.signals.holding = True

    def __exit__(self, *exc: object) -> None:
        self.signals.holding = False


def check_divergence(step: int, losses: dict[str, float], parameters: Iterable[torch.Tensor],
                     checkpoints: Path) -> None:  # fmt: skip
    """Raise :class:`TrainingDiverged` when a loss is not finite or above ``MAX_ABS_LOSS``, or a
    weight is not finite or above ``MAX_ABS_WEIGHT`` in size (one host sync for all weights)."""
    advice = f"the last good checkpoint is in {checkpoints} (try a lower --lr)"
    for name, value in losses.items():
        if not math.isfinite(value):
            raise TrainingDiverged(f"{name} became NaN/Inf by step {step}; {advice}")
        if abs(value) > MAX_ABS_LOSS:
            raise TrainingDiverged(
                f"{name} = {value:.3g} by step {step}, beyond +-{MAX_ABS_LOSS:g}: the run "
                f"diverged; {advice}"
            )
    sizes = [p.detach().abs().max() for p in parameters if p.numel()]
    largest = torch.stack(sizes).max().item() if sizes else 0.0
    if not math.isfinite(largest):
        raise TrainingDiverged(f"a weight became NaN/Inf by step {step}; {advice}")
    if largest > MAX_ABS_WEIGHT:
        raise TrainingDiverged(
            f"a weight reached {largest:.3g} by step {step}, beyond {MAX_ABS_WEIGHT:g}: the run "
            f"diverged; {advice}"
        )
