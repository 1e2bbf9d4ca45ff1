"""Training the DCGAN-64, cut along its seams (read in this order):

``config``    :class:`TrainConfig`, every setting with its help text (also the CLI's flags)
``data``      the run's split of the frame file, in memory or streamed; each epoch's order
``networks``  generator, discriminator, EMA generator, optimisers: what a checkpoint holds
``steps``     the loss, chosen once (:func:`make_objective`), and the D and G updates
``loop``      :func:`train`: the loop, top to bottom
``plots``     the loss curves

The names below are imported on first use, so ``from carsynth.training.config import
TrainConfig`` (the CLI's flags) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "TrainConfig": "config",
    "check_config": "config",
    "epoch_order": "data",
    "MemoryFrames": "data",
    "StreamingFrames": "data",
    "Networks": "networks",
    "Objective": "steps",
    "make_objective": "steps",
    "discriminator_step": "steps",
    "generator_step": "steps",
    "train": "loop",
    "TrainingDiverged": "loop",
    "TrainingCollapsed": "loop",
    "plot_losses": "plots",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'carsynth.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f"carsynth.training.{_HOMES[name]}"), name)
