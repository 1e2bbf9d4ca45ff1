"""General file and pixel helpers: atomic writes, writable checks, pixel conversion, image grids.

``storage`` (the HDF5 schema), the trainer, the run directory and the validation report all write
through :func:`atomic_write`. torch is imported only by the functions that need it, so the
collection workers (which write HDF5 through ``storage``) never load it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from carsynth.errors import UsageError

if TYPE_CHECKING:
    import torch


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write ``path`` by calling ``write(tmp)`` on a temporary name beside it, then renaming.

    A reader (or a run killed meanwhile) sees the old file or the complete new one, never a part;
    the temporary file is removed on any error. Every file carsynth writes goes through here.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output that exists (unless ``overwrite``) or whose folder is not writable."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite to replace it")
    if path.is_dir():
        raise UsageError(f"{path} is a directory, expected a file path")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{path}: folder {folder} is not writable")
    return path


def to_float(pixels: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """uint8 pixels (..., H, W, 3) -> float images (..., 3, H, W) in [-1, 1] (``signed``), else
    in [0, 1]. The one conversion from stored frames to network inputs."""
    x = pixels.movedim(-1, -3).float()
    return x.div_(127.5).sub_(1.0) if signed else x.div_(255.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images (N, 3, H, W) in [-1, 1] -> uint8 pixels (N, H, W, 3), rounded and clipped."""
    import torch

    pixels = images.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1)


def write_grid(
    images: torch.Tensor | np.ndarray, path: str | os.PathLike, columns: int, padding: int = 2
) -> Path:
    """A PNG grid of ``images``, ``columns`` per row, written atomically.

    ``images``: uint8 frames (N, H, W, 3) or float images (N, 3, H, W) in [-1, 1].
    """
    import torch
    from torchvision.utils import save_image

    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        x = to_float(x)
    return atomic_write(
        path,
        lambda tmp: save_image(
            x,
            tmp,
            format="png",
            nrow=columns,
            padding=padding,
            normalize=True,
            value_range=(-1, 1),
        ),  # fmt: skip
    )
