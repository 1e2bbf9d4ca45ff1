"""The one device resolver: every command's ``--device`` goes through :func:`resolve_device`."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from carsynth.errors import UsageError

DEVICES = ("auto", "cuda", "mps", "cpu")  # the names ``--device`` takes (plus "cuda:N")


def _available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return kind == "cpu"


def resolve_device(
    name: str | torch.device | None = "auto", *, allow_mps: bool = True
) -> torch.device:
    """The torch device for ``name``: "auto" (or ``None``) picks CUDA, then MPS, then the CPU.

    "cuda", "cuda:N", "mps" and "cpu" are taken as given; an unknown or unavailable device is a
    :class:`UsageError` naming ``--device``. ``allow_mps=False`` keeps "auto" off MPS (for code
    that needs float64, which MPS lacks). Under ``torch.distributed`` a bare "cuda" is this
    process's GPU (``LOCAL_RANK``).
    """
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        kinds = ("cuda", "mps") if allow_mps else ("cuda",)
        name = next((kind for kind in kinds if _available(kind)), "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device must be auto, cuda, mps or cpu, got {name!r}") from None
    if device.type not in DEVICES:
        raise UsageError(f"--device must be auto, cuda, mps or cpu, got {name!r}")
    if not _available(device.type):
        raise UsageError(f"--device {name}: not available on this machine")
    if device.type == "cuda" and device.index is None and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device
