"""What a training run directory holds, and how to read it.

``carsynth train`` writes it; ``export``, ``pipeline`` and the scripts read it through this module
and never through the trainer::

    config.json                  every setting, the data file's path and fingerprint, holdout seeds
    metrics.jsonl                one JSON object per logging step
    samples/step_XXXXXXX.png     the EMA generator on the fixed noise batch
    loss.png                     losses, D outputs, diversity, the collapse monitor
    report.html                  one self-contained page (carsynth.report_html)
    tensorboard/                 the same numbers and sample grids, when tensorboard is installed
    checkpoints/ckpt_XXXXXXX.pt  networks, EMA generator, optimizers, RNG states, step
                                 (read with read_checkpoint: torch.load(weights_only=True))

A run whose data file moved is read with ``data=PATH``: the file there must have the recorded
fingerprint (same contents), so the run's split is still the one it trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from carsynth import files, storage
from carsynth.errors import UsageError
from carsynth.progress import log

if TYPE_CHECKING:
    import torch

    from carsynth.models import Generator

FINGERPRINT_BYTES = 4 * 2**20  # the data fingerprint hashes this many leading and trailing bytes
CONFIG = "config.json"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
SAMPLES = "samples"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
REPORT = "report.html"
# What a run directory may hold before its config.json exists (a run killed while starting).
PARTIAL = {CHECKPOINTS, SAMPLES, METRICS, TENSORBOARD, LOSS_PLOT, REPORT}
# The keys of a training checkpoint (carsynth.training.networks.Networks.state)
CHECKPOINT_KEYS = (
    "step",
    "generator",
    "discriminator",
    "ema",
    "opt_g",
    "opt_d",
    "scaler",
    "rng_cpu",
)
T = TypeVar("T")


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


def read_checkpoint(
    path: str | os.PathLike, keys: tuple[str, ...] = CHECKPOINT_KEYS
) -> dict[str, Any]:
    """A checkpoint's contents, loaded with ``torch.load(weights_only=True)``.

    The weights-only unpickler accepts tensors and plain containers only: a pickle that would
    run code (a replaced or malicious file) is refused before anything in it runs. An empty,
    truncated or foreign file, or one without ``keys``, is a :class:`UsageError` saying which.
    """
    import torch

    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then refuses
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(
            f"{path}: refused by torch.load(weights_only=True): it holds objects other than "
            f"tensors and plain data (not a carsynth checkpoint; never load it otherwise)"
        ) from None
    except (EOFError, RuntimeError, ValueError, zipfile.BadZipFile, OSError) as error:
        what = (
            "empty file" if path.is_file() and path.stat().st_size == 0 else "truncated or damaged"
        )
        raise UsageError(
            f"{path}: not a loadable checkpoint ({what}: {type(error).__name__})"
        ) from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise UsageError(f"{path}: not a carsynth checkpoint (no {', '.join(missing)})")
    return state


def newest_loadable(
    run_dir: str | os.PathLike,
    use: Callable[[dict[str, Any]], T],
    keys: tuple[str, ...] = CHECKPOINT_KEYS,
) -> tuple[Path, T]:
    """The newest checkpoint that :func:`read_checkpoint` reads and ``use`` accepts, and what
    ``use`` returned. Newer ones that fail are skipped with a warning each (a kill or a full disk
    can leave the latest one bad); when none loads, one :class:`UsageError` lists why."""
    skipped = []
    for path in reversed(checkpoints(run_dir)):
        try:
            result = use(read_checkpoint(path, keys))
        except UsageError as error:
            reason = " ".join(str(error).split())  # one line, whatever torch put in it
            skipped.append(reason if reason.startswith(str(path)) else f"{path}: {reason}")
            continue
        for reason in skipped:
            log.warning(f"{reason}; using the previous good checkpoint {path.name}")
        return path, result
    if skipped:
        raise UsageError(f"{run_dir}: no checkpoint loads: {' | '.join(skipped)}")
    raise UsageError(f"{run_dir}: no checkpoints (not a carsynth run directory?)")


def is_partial(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` is a folder holding only what a run killed before it wrote
    ``config.json`` leaves (empty ``checkpoints``/``samples``, temporary files)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or (run_dir / CONFIG).exists() or checkpoints(run_dir):
        return False
    return all(p.name in PARTIAL or p.name.endswith(".tmp") for p in run_dir.iterdir())


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``config.json``: {"config": TrainConfig fields, "data": ..., "versions": ...}."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise UsageError(f"{run_dir}: no config.json (not a carsynth run directory?)")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: not JSON ({error}); the run's settings are unreadable") from None
    missing = [
        k for k in ("config", "data", "steps") if not isinstance(record, dict) or k not in record
    ]
    if missing:
        raise UsageError(f"{path}: not a carsynth run config (no {', '.join(missing)})")
    return record


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
    """The EMA generator of a checkpoint (default: the newest that loads), in eval mode."""
    from carsynth.devices import resolve_device
    from carsynth.models import Generator
    from carsynth.training.config import lowpass_setting

    config = read_run_config(run_dir)["config"]

    def build(state: dict[str, Any]) -> Generator:
        lowpass = lowpass_setting(config.get("lowpass", "off"))
        generator = Generator(config["nz"], config["ngf"], lowpass)
        try:
            generator.load_state_dict(state["ema"])
        except (RuntimeError, TypeError, AttributeError):
            raise UsageError(
                f"{run_dir}: a checkpoint's generator does not fit config.json"
            ) from None
        return generator

    if checkpoint is not None:
        generator = build(read_checkpoint(checkpoint, ("ema",)))
    else:
        generator = newest_loadable(run_dir, build, ("ema",))[1]
    return generator.to(resolve_device(device)).eval()


def generator_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The newest checkpoint whose EMA generator loads (what ``export`` samples)."""
    return newest_loadable(run_dir, lambda state: None, ("step", "ema"))[0]


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
