"""What a training run directory holds, and how to read it.

``carsynth train`` writes it; ``export``, ``pipeline`` and the scripts read it through this module
and never through the trainer::

    config.json                  every setting, the data file's path and fingerprint, holdout seeds
    metrics.jsonl                one JSON object per logging step
    samples/step_XXXXXXX.png     the EMA generator on the fixed noise batch
    loss.png                     the loss curves
    checkpoints/ckpt_XXXXXXX.pt  networks, EMA generator, optimizers, RNG states, step

A run whose data file moved is read with ``data=PATH``: the file there must have the recorded
fingerprint (same contents), so the run's split is still the one it trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from carsynth import files, storage
from carsynth.errors import UsageError

if TYPE_CHECKING:
    import torch

    from carsynth.models import Generator

FINGERPRINT_BYTES = 4 * 2**20  # the data fingerprint hashes this many leading and trailing bytes
CONFIG = "config.json"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
SAMPLES = "samples"
CHECKPOINTS = "checkpoints"


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """The checkpoint written after ``step`` generator updates."""
    return Path(run_dir) / CHECKPOINTS / f"ckpt_{step:07d}.pt"


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoints, oldest first."""
    return sorted((Path(run_dir) / CHECKPOINTS).glob("ckpt_*.pt"))


def sample_path(run_dir: str | os.PathLike, step: int) -> Path:
    """The sample grid drawn after ``step`` generator updates."""
    return Path(run_dir) / SAMPLES / f"step_{step:07d}.png"


def metrics_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / METRICS


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The newest checkpoint of a run; ``UsageError`` if there is none."""
    found = checkpoints(run_dir)
    if not found:
        raise UsageError(f"{run_dir}: no checkpoints (not a carsynth run directory?)")
    return found[-1]


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``config.json``: {"config": TrainConfig fields, "data": ..., "versions": ...}."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise UsageError(f"{run_dir}: no config.json (not a carsynth run directory?)")
    return json.loads(path.read_text())


def write_run_config(run_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write ``config.json`` atomically."""
    text = json.dumps(record, indent=2) + "\n"
    files.atomic_write(Path(run_dir) / CONFIG, lambda tmp: tmp.write_text(text))


def training_finished(run_dir: str | os.PathLike) -> bool:
    """Whether the run in ``run_dir`` wrote its final checkpoint (its full step budget)."""
    try:
        steps = read_run_config(run_dir)["steps"]
    except UsageError:
        return False
    return checkpoint_path(run_dir, steps).is_file()


def load_generator(
    run_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    checkpoint: str | os.PathLike | None = None,
) -> Generator:
    """The EMA generator of a checkpoint (default: the run's latest), in eval mode on ``device``."""
    import torch

    from carsynth.devices import resolve_device
    from carsynth.models import Generator

    config = read_run_config(run_dir)["config"]
    generator = Generator(config["nz"], config["ngf"])
    checkpoint = checkpoint or latest_checkpoint(run_dir)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    generator.load_state_dict(state["ema"])
    return generator.to(resolve_device(device)).eval()


def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Size and the SHA-256 of the first and the last ``FINGERPRINT_BYTES`` of a file.

    Cheap for files of any size. It changes when episodes are appended (size, tail) or the file
    is rewritten (HDF5 keeps its superblock and root metadata at the head), but not when the file
    is only copied or touched: a run can be resumed on a copy of its data (rsync, a fresh clone).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(FINGERPRINT_BYTES)).hexdigest()
        f.seek(max(0, size - FINGERPRINT_BYTES))
        tail = hashlib.sha256(f.read(FINGERPRINT_BYTES)).hexdigest()
    return {"size": size, "sha256_head": head, "sha256_tail": tail}


def same_data(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether two fingerprints describe the same file contents, compared on the keys both have
    (runs started before the tail hash recorded the file's mtime instead, which is ignored)."""
    return all(saved[key] == current[key] for key in saved.keys() & current.keys())


def data_path(run_dir: str | os.PathLike, data: str | os.PathLike | None = None) -> Path:
    """The run's data file: ``data`` (checked against the recorded fingerprint) or the recorded
    path. A moved file is a UsageError that names ``--data``."""
    recorded = read_run_config(run_dir)["data"]
    path = Path(data if data is not None else recorded["path"])
    if not path.is_file():
        raise UsageError(
            f"{path}: the data file of run {run_dir} is not there (moved? pass --data PATH)"
        )
    if data is not None and not same_data(recorded["fingerprint"], fingerprint(path)):
        raise UsageError(f"--data {data}: not the file run {run_dir} trained on (fingerprint)")
    return path


def run_frames(
    run_dir: str | os.PathLike,
    split: Literal["train", "holdout"],
    data: str | os.PathLike | None = None,
) -> np.ndarray:
    """The exact training or held-out frames of a run: uint8 (N, H, W, 3), file order.

    ``data``: where the run's data file is now, when it moved (see :func:`data_path`).
    """
    if split not in ("train", "holdout"):
        raise UsageError(f"split must be 'train' or 'holdout', got {split!r}")
    seeds = read_run_config(run_dir)["data"]["holdout_seeds"]
    with storage.open_frame_file(data_path(run_dir, data)) as f:
        return f.read_ranges(f.split_ranges(seeds)[split])


def run_episode_ids(
    run_dir: str | os.PathLike,
    split: Literal["train", "holdout"],
    data: str | os.PathLike | None = None,
) -> np.ndarray:
    """Each frame's episode number in :func:`run_frames`' order: int64 (N,)."""
    seeds = read_run_config(run_dir)["data"]["holdout_seeds"]
    with storage.open_frame_file(data_path(run_dir, data)) as f:
        return storage.episode_ids(f.split_ranges(seeds)[split])
