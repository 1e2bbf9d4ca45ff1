"""carsynth.devices.resolve_device: the one device resolver every --device goes through."""

from __future__ import annotations

import pytest
import torch

from carsynth import devices
from carsynth.errors import UsageError


def test_a_bare_cuda_is_an_indexed_device(monkeypatch) -> None:
    # torch.cuda.set_device refuses torch.device("cuda") (torch 2.11): `carsynth train --device
    # cuda` crashed on the first GPU it met. Pretend there is a GPU whose current index is 3.
    monkeypatch.setattr(devices, "_available", lambda kind: kind in ("cuda", "cpu"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert devices.resolve_device("cuda") == torch.device("cuda", 3)
    assert devices.resolve_device("auto") == torch.device("cuda", 3)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)


def test_unknown_or_missing_devices_name_the_flag(monkeypatch) -> None:
    monkeypatch.setattr(devices, "_available", lambda kind: kind == "cpu")
    assert devices.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UsageError, match="--device must be auto, cuda, mps or cpu, got 'tpu'"):
        devices.resolve_device("tpu")
    with pytest.raises(UsageError, match="--device cuda: not available on this machine"):
        devices.resolve_device("cuda")
