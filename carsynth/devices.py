"""The one device resolver: every command's ``--device`` goes through :func:`resolve_device`,
and every ``--amp`` through :func:`autocast_dtype`."""

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
    that needs float64, which MPS lacks). A CUDA device always has its index: a bare "cuda" is
    the current GPU, or under ``torch.distributed`` this process's (``LOCAL_RANK``).
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
    if device.type == "cuda" and device.index is None:
        # an indexed device: torch.cuda.set_device refuses a bare "cuda" (torch 2.11)
        index = int(os.environ.get("LOCAL_RANK", 0)) if dist.is_initialized() else None
        return torch.device("cuda", torch.cuda.current_device() if index is None else index)
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 in hardware: CUDA, or a CPU with AVX512-BF16 or
    AMX (oneDNN then runs bf16 convolutions about 1.7x faster than float32, scripts/bench_train.py
    --cpu-levers); elsewhere bf16 on the CPU is emulated and slower than float32."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype of ``--amp`` ("auto", "bf16", "fp16" or "off", checked by the
    command's config) on ``device``; ``None``: full precision.

    "auto" is bf16 where the hardware has it (:func:`native_bf16`), else off; fp16 needs a
    gradient scaler, which the caller makes when this returns float16.
    """
    if amp == "auto":
        amp = "bf16" if native_bf16(device) else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
