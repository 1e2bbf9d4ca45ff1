"""Where the training frames come from: the run's split of the file, in memory or streamed.

Each epoch visits the training frames in the order :func:`epoch_order` gives, seeded by
(seed, epoch), so a resumed run repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from carsynth import storage
from carsynth.errors import UsageError
from carsynth.models import IMAGE_SIZE
from carsynth.training.config import TrainConfig


def epoch_order(n: int, epoch: int, seed: int, block: int | None) -> np.ndarray:
    """The order in which epoch ``epoch`` visits positions 0..n-1, seeded by (seed, epoch).

    ``block=None``: a plain permutation. Otherwise the positions are cut into contiguous blocks
    of ``block``; the blocks are visited in a random order and shuffled within, so a streaming
    reader needs only the current and the next block in memory.
    """
    rng = np.random.default_rng([seed, epoch, 0x7A1])
    if block is None or block >= n:
        return rng.permutation(n)
    starts = rng.permutation(np.arange(0, n, block))
    return np.concatenate([s + rng.permutation(min(block, n - s)) for s in starts])


class MemoryFrames:
    """All training frames as one uint8 tensor, on the device when it fits there.

    The epoch's order is copied to the frames' device once per epoch (``start_epoch``): a copy
    from host memory every step would wait for the GPU each time.
    """

    def __init__(self, frames: np.ndarray, device: torch.device) -> None:
        host = torch.from_numpy(frames)
        try:
            self.frames = host.to(device)
        except torch.OutOfMemoryError:
            self.frames = host.pin_memory() if device.type == "cuda" else host
        self.device = device
        self.order = torch.zeros(0, dtype=torch.long)

    def start_epoch(self, order: np.ndarray) -> None:
        self.order = torch.from_numpy(order).to(self.frames.device)

    def batch(self, at: int, size: int) -> torch.Tensor:
        """Frames at positions ``order[at : at + size]``: uint8 (size, H, W, 3) on the device."""
        index = self.order[at : at + size]
        return self.frames.index_select(0, index).to(self.device, non_blocking=True)


class StreamingFrames:
    """Training frames read from the file one block of positions at a time (two blocks cached).

    Used with ``epoch_order(..., block=self.block)``, each batch touches at most two blocks.
    """

    def __init__(self, f: storage.FrameFile, rows: np.ndarray, block: int, device: torch.device):
        self.f, self.rows, self.block, self.device = f, rows, block, device
        self.cache: dict[int, torch.Tensor] = {}
        self.order = np.zeros(0, dtype=np.int64)

    def start_epoch(self, order: np.ndarray) -> None:
        self.order = order

    def _load(self, b: int) -> torch.Tensor:
        if b not in self.cache:
            rows = self.rows[b * self.block : (b + 1) * self.block]
            # One contiguous read (the block may span a skipped holdout episode), then select.
            span = self.f.frames[int(rows[0]) : int(rows[-1]) + 1]
            if len(self.cache) >= 2:
                self.cache.pop(next(iter(self.cache)))
            self.cache[b] = torch.from_numpy(span[rows - rows[0]]).to(self.device)
        return self.cache[b]

    def batch(self, at: int, size: int) -> torch.Tensor:
        """Frames at positions ``order[at : at + size]``, grouped by block (order within kept)."""
        positions = self.order[at : at + size]
        parts = []
        for b in np.unique(positions // self.block):
            chosen = positions[positions // self.block == b] - b * self.block
            parts.append(self._load(int(b))[torch.from_numpy(chosen).to(self.device)])
        return torch.cat(parts)


def _rows(ranges: storage.Ranges) -> np.ndarray:
    return np.concatenate([np.arange(a, b) for a, b in ranges] or [np.zeros(0, int)])


@dataclass
class RunData:
    """The run's split of the data file, checked against the settings before anything is written."""

    holdout_seeds: list[int]  # what config.json records: THE split of this run
    ranges: dict[str, storage.Ranges]  # frame ranges of "train" and "holdout"
    rows: np.ndarray  # frame indices of the training split, file order
    holdout_rows: np.ndarray  # frame indices of the held-out split

    @property
    def n(self) -> int:
        return len(self.rows)

    @classmethod
    def split(cls, f: storage.FrameFile, c: TrainConfig, world: int) -> RunData:
        """The file's holdout episodes, or (``c.holdout``) those ``is_holdout`` picks."""
        if f.frame_size != (IMAGE_SIZE, IMAGE_SIZE):
            raise UsageError(
                f"{f.path}: frames are {f.frame_size[0]}x{f.frame_size[1]}, "
                f"the DCGAN-64 model needs {IMAGE_SIZE}x{IMAGE_SIZE}"
            )
        if c.holdout and f.episodes is None:
            raise UsageError(f"{f.path}: --holdout needs a real file with episodes")
        seeds = f.holdout_seeds(c.holdout)
        ranges = f.split_ranges(seeds)
        data = cls(seeds, ranges, _rows(ranges["train"]), _rows(ranges["holdout"]))
        n = data.n
        if n == 0:
            raise UsageError(
                f"{f.path}: no training frames (empty file, or every episode held out)"
            )
        if c.monitor_interval and not len(data.holdout_rows):
            raise UsageError(
                f"{f.path}: --monitor-interval needs held-out episodes (see --holdout)"
            )
        if c.monitor_interval and n < c.monitor_k:
            raise UsageError(f"--monitor-k {c.monitor_k} is more than the {n} training frames")
        if c.batch_size * world > n:
            raise UsageError(
                f"--batch-size {c.batch_size} x {world} processes is larger than the "
                f"{n} training frames of {f.path}"
            )
        return data

    def source(
        self, f: storage.FrameFile, c: TrainConfig, global_batch: int, device: torch.device
    ) -> tuple[MemoryFrames | StreamingFrames, int | None]:
        """The training frames in memory, or streamed above ``max_memory_frames``; and the block
        size :func:`epoch_order` must use (``None`` in memory)."""
        if self.n <= c.max_memory_frames:
            return MemoryFrames(f.read_ranges(self.ranges["train"]), device), None
        block = max(c.max_memory_frames // 2, global_batch)
        return StreamingFrames(f, self.rows, block, device), block
