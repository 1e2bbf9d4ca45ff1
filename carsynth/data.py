"""Frames for users' training pipelines: a PyTorch Dataset, a NumPy loader, real/synthetic mixing.

Three entry points, all reading carsynth frame files (schema v1, real or synthetic; one file, a list
of shards, or a file written by ``carsynth merge``, copied or virtual, all read the same):

- :class:`FrameDataset`: a ``torch.utils.data.Dataset`` of float32 CHW tensors in [0, 1].
- :func:`load_frames`: the frames as one uint8 NumPy array (N, H, W, 3), for the simple case.
- :class:`MixedFrames`: real and synthetic frames in one Dataset, with a sampler that draws them at
  a set ratio.

Splits. ``split`` is ``None`` or ``"all"`` (every frame), ``"train"`` or ``"holdout"`` (the real
files' per-episode ``holdout`` flags, so a split holds whole episodes). Synthetic files have no
episodes and only the ``"all"`` split; asking one for another split is a :class:`UsageError`.

Worker safety. HDF5 handles must not cross a fork (the child would share the parent's HDF5 state
and file position). A dataset opens its files only when it first reads a frame, once per process:
handles are keyed by process id, so a DataLoader worker opens its own even when the parent read
frames before forking, and pickling a dataset (spawn/forkserver workers) carries its paths only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from carsynth.errors import UsageError
from carsynth.files import to_float
from carsynth.storage import FrameFile, Split, open_frame_file

# Chunk cache per open file. A reader of single frames in file order (a DataLoader without
# shuffle) reads each chunk FRAME_CHUNK times; the cache keeps it decompressed in between. 8 MiB
# holds 85 chunks of 8 frames of 64x64 (HDF5 2.0's default; HDF5 1.x defaults to 1 MiB, which
# holds none of the 128-frame chunks measured by scripts/bench_storage.py).
CACHE_BYTES = 8 * 2**20

SPLITS = ("all", "train", "holdout")

PathLike = str | os.PathLike
Paths = PathLike | Sequence[PathLike]
Transform = Callable[[torch.Tensor], torch.Tensor]


def _as_paths(paths: Paths) -> list[Path]:
    """One path or a sequence of them, as a non-empty list."""
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    out = [Path(p) for p in paths]
    if not out:
        raise UsageError("give at least one frame file")
    return out


def _as_split(split: str | None) -> Split:
    split = "all" if split is None else split
    if split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)} (or None), got {split!r}")
    return split


def _check_size(frame_file: FrameFile, expected: tuple[int, int] | None) -> tuple[int, int]:
    """Frames from several files are stacked into one batch, so they must share one size."""
    if expected is not None and frame_file.frame_size != expected:
        raise UsageError(
            f"{frame_file.path}: frames are {frame_file.frame_size}, the files before it {expected}"
        )
    return frame_file.frame_size


def load_frames(paths: Paths, split: str | None = None, limit: int | None = None) -> np.ndarray:
    """The frames of one or more files as a uint8 array (N, H, W, 3), in file order.

    ``split`` as in the module docstring; ``limit`` caps the number of frames (the first ones).
    Everything is read into memory: use :class:`FrameDataset` for data larger than RAM.
    """
    split = _as_split(split)
    if limit is not None and limit < 0:
        raise UsageError(f"limit must be >= 0, got {limit}")
    parts: list[np.ndarray] = []
    total, size = 0, None
    for path in _as_paths(paths):
        with open_frame_file(path) as frame_file:
            size = _check_size(frame_file, size)
            part = frame_file.read(split, None if limit is None else limit - total)
        parts.append(part)
        total += len(part)
    return np.concatenate(parts)


class FrameDataset(Dataset):
    """Frames of one or more files (shards) as float32 tensors (3, H, W) with values in [0, 1].

    Item ``i`` is frame ``i`` of the split, counting through the files in the order given; pixel
    value ``v`` (uint8) becomes ``v / 255``. ``transform``, if given, is applied to that tensor
    (e.g. ``lambda x: 2 * x - 1`` for a tanh generator's [-1, 1]). Safe with DataLoader workers of
    any start method (see the module docstring).

    The files are checked when the dataset is built (a bad file raises :class:`UsageError` naming
    it); the index holds one row per episode, not per frame, so it stays small for large files.
    """

    def __init__(
        self, paths: Paths, split: str | None = None, transform: Transform | None = None
    ) -> None:
        self.paths = _as_paths(paths)
        self.split = _as_split(split)
        self.transform = transform
        # One segment per contiguous run of frames (an episode, or a whole synthetic file).
        seg_file, seg_start, seg_length = [], [], []
        size = None
        for k, path in enumerate(self.paths):
            with open_frame_file(path) as frame_file:
                size = _check_size(frame_file, size)
                for a, b in frame_file.frame_ranges(self.split):
                    seg_file.append(k)
                    seg_start.append(a)
                    seg_length.append(b - a)
        self.frame_size: tuple[int, int] = size
        self._seg_file = np.asarray(seg_file, dtype=np.int64)
        self._seg_start = np.asarray(seg_start, dtype=np.int64)
        self._seg_offset = np.concatenate([[0], np.cumsum(seg_length, dtype=np.int64)])
        self._files: dict[int, FrameFile] = {}
        self._pid: int | None = None

    def __len__(self) -> int:
        return int(self._seg_offset[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        """Which file (its position in ``paths``) holds item ``index``, and at which row."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} frames")
        index %= len(self)
        seg = int(np.searchsorted(self._seg_offset, index, side="right")) - 1
        row = int(self._seg_start[seg] + index - self._seg_offset[seg])
        return int(self._seg_file[seg]), row

    def _file(self, k: int) -> FrameFile:
        """This process's handle on file ``k``, opened on first use."""
        if self._pid != os.getpid():
            # Handles in the dict were opened by the parent before a fork: leave them alone.
            self._files, self._pid = {}, os.getpid()
        if k not in self._files:
            self._files[k] = open_frame_file(self.paths[k], cache_bytes=CACHE_BYTES)
        return self._files[k]

    def __getitem__(self, index: int) -> torch.Tensor:
        k, row = self._locate(index)
        try:
            pixels = self._file(k).frames[row]
        except OSError as error:
            raise UsageError(f"{self.paths[k]}: cannot read frame {row} ({error})") from None
        image = to_float(torch.from_numpy(pixels), signed=False).contiguous()
        return image if self.transform is None else self.transform(image)

    def __getstate__(self) -> dict:
        # Pickled for spawn/forkserver workers: carry the paths and index, never an h5py handle.
        return {**self.__dict__, "_files": {}, "_pid": None}


class MixedFrames(Dataset):
    """Real and synthetic frames in one Dataset, and a sampler that mixes them at a set ratio.

    Items ``0 .. num_real - 1`` are the real frames, ``num_real .. len - 1`` the synthetic ones
    (each a :class:`FrameDataset` item). ``real`` and ``synthetic`` are FrameDatasets or paths
    (paths give ``split=None``: pass ``FrameDataset(paths, split="train")`` to hold frames out).

    Mixing semantics (:meth:`sampler`): every draw is independent and with replacement. A draw is
    synthetic with probability ``synthetic_fraction`` and then uniform over the synthetic frames,
    otherwise uniform over the real frames. A batch of B frames thus holds Binomial(B, p)
    synthetic frames (mean B p); over n draws the synthetic share is p with standard deviation
    sqrt(p (1 - p) / n). The ratio is set by the sampler, whatever the sizes of the two sets.
    """

    def __init__(
        self,
        real: FrameDataset | Paths,
        synthetic: FrameDataset | Paths,
        synthetic_fraction: float = 0.5,
    ) -> None:
        self.real = real if isinstance(real, FrameDataset) else FrameDataset(real)
        self.synthetic = (
            synthetic if isinstance(synthetic, FrameDataset) else FrameDataset(synthetic)
        )
        if not 0.0 <= synthetic_fraction <= 1.0:
            raise UsageError(f"synthetic_fraction must be in [0, 1], got {synthetic_fraction}")
        if synthetic_fraction > 0 and not len(self.synthetic):
            raise UsageError(f"{self.synthetic.paths[0]}: no synthetic frames to mix in")
        if synthetic_fraction < 1 and not len(self.real):
            raise UsageError(f"{self.real.paths[0]}: no real frames to mix in")
        if self.real.frame_size != self.synthetic.frame_size:
            raise UsageError(
                f"{self.synthetic.paths[0]}: synthetic frames are {self.synthetic.frame_size}, "
                f"real frames {self.real.frame_size}"
            )
        self.synthetic_fraction = float(synthetic_fraction)
        self.num_real = len(self.real)

    def __len__(self) -> int:
        return self.num_real + len(self.synthetic)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} frames")
        index %= len(self)
        if index < self.num_real:
            return self.real[index]
        return self.synthetic[index - self.num_real]

    def sampler(self, num_samples: int | None = None, seed: int = 0) -> MixedSampler:
        """A sampler drawing ``num_samples`` items per pass (default ``len(self)``) at the ratio.

        Pass it to ``DataLoader(mixed, sampler=mixed.sampler(...))``. Each pass draws fresh
        indices; the sequence of passes is fixed by ``seed``.
        """
        return MixedSampler(
            self.num_real,
            len(self.synthetic),
            self.synthetic_fraction,
            len(self) if num_samples is None else num_samples,
            seed,
        )


class MixedSampler(Sampler[int]):
    """Indices into a :class:`MixedFrames`, synthetic with probability ``synthetic_fraction``."""

    def __init__(
        self,
        num_real: int,
        num_synthetic: int,
        synthetic_fraction: float,
        num_samples: int,
        seed: int,
    ) -> None:
        if num_samples < 0:
            raise UsageError(f"num_samples must be >= 0, got {num_samples}")
        self.num_real = num_real
        self.num_synthetic = num_synthetic
        self.synthetic_fraction = synthetic_fraction
        self.num_samples = num_samples
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        n = self.num_samples
        synthetic = self.rng.random(n) < self.synthetic_fraction
        # Draw both candidates for every slot (max(.., 1): a set that is empty is never chosen).
        real = self.rng.integers(0, max(self.num_real, 1), n)
        fake = self.num_real + self.rng.integers(0, max(self.num_synthetic, 1), n)
        yield from np.where(synthetic, fake, real).tolist()
