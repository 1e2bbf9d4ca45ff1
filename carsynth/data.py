"""Real and synthetic frames for users' pipelines: frames, episodes, windows and transitions.

Every entry point reads carsynth frame files (schema version 1 or 2, real or synthetic; one file, a
list of shards, or a file written by ``carsynth merge``, copied or virtual, all read the same):

- frames, for a VAE or a GAN: :class:`FrameDataset` (a ``torch.utils.data.Dataset``),
  :func:`load_frames` (one uint8 NumPy array), :class:`MixedFrames` (real and synthetic frames at
  a set ratio, each item flagged), :class:`ChunkBatchSampler` (shuffled batches read a whole
  compressed chunk at a time);
- sequences, for a world model or offline RL: :func:`load_episodes` (whole episodes, NumPy or
  torch), :class:`WindowDataset` (fixed-length windows inside episodes: the MDN-RNN / Dreamer
  batch), :class:`TransitionDataset` (``(obs, action, reward, next_obs, terminated, truncated)``).

Pixels. Torch items are (3, H, W) tensors: float32 in [0, 1] (pixel value / 255) by default, or
the stored uint8 with ``dtype="uint8"``; :func:`to_float` converts a uint8 batch on the device it
is given, so a GPU pipeline copies a quarter of the bytes and converts on the GPU.

Frame cache. ``FrameDataset``, ``WindowDataset`` and ``TransitionDataset`` read frames from an
uncompressed, memory-mapped copy of each file's frames (:mod:`carsynth.frame_cache`), built the
first time a file is used (one sequential pass) and reused until the file changes: a shuffled
read then costs what it costs from memory, where a read from the gzip-compressed file
decompresses its whole chunk. ``cache=True`` (the default) keeps the copies in
``$CARSYNTH_CACHE``, else ``$XDG_CACHE_HOME/carsynth``, else ``~/.cache/carsynth``; a path
names another folder; ``cache=False`` reads the compressed file directly. Disk: 12,288 bytes per
64x64 frame (about 8x the file). A folder that cannot be written costs one warning, and the file
is read directly. Numbers: README.md, "Loader speed".

Splits. ``split`` is ``None`` or ``"all"``, ``"train"`` or ``"holdout"``: the real files'
per-episode ``holdout`` flags (the one split of :mod:`carsynth.storage`), so a split holds whole
episodes. Synthetic files have no episodes and only the ``"all"`` split.

Schema version 1. Files written before version 2 lack each episode's final observation (the one
after its last action). They load everywhere; the sequence loaders warn once per file that each
episode gives one transition (and one window position) fewer.

Worker safety. HDF5 handles must not cross a fork (the child would share the parent's HDF5 state
and file position). A dataset opens its files only when it first reads, once per process: handles
are keyed by process id, so a DataLoader worker opens its own even when the parent read before
forking, and pickling a dataset (spawn/forkserver workers) carries its paths and index only.
Map-style datasets work with any sampler: ``DataLoader(..., shuffle=True, generator=g)`` for a
seeded order, ``DistributedSampler(dataset, seed=s)`` for one shard per rank.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from carsynth import files
from carsynth.errors import UsageError
from carsynth.frame_cache import CacheSetting, cache_folder, cached_frames
from carsynth.storage import Episode, FrameFile, Split, open_frame_file

# Chunk cache per open file. A reader of single frames in file order (a DataLoader without
# shuffle) reads each chunk FRAME_CHUNK times; the cache keeps it decompressed in between. 8 MiB
# holds 85 chunks of 8 frames of 64x64 (HDF5 2.0's default; HDF5 1.x defaults to 1 MiB, which
# holds none of the 128-frame chunks measured by scripts/bench_storage.py).
CACHE_BYTES = 8 * 2**20

SPLITS = ("all", "train", "holdout")
DTYPES = ("float32", "uint8")

PathLike = str | os.PathLike
Paths = PathLike | Sequence[PathLike]
Transform = Callable[[torch.Tensor], torch.Tensor]
PixelType = Literal["float32", "uint8"]

_warned: set[tuple[str, str]] = set()


def _warn_once(path: Path, message: str) -> None:
    """Warn about a file once per process (a DataLoader rebuilds datasets; say it once)."""
    key = (str(Path(path).resolve()), message)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"{path}: {message}", UserWarning, stacklevel=2)


def _check_forced(frame_file: FrameFile) -> None:
    """A synthetic file exported with ``--force`` holds frames that failed validation."""
    if frame_file.attrs.get("forced") or frame_file.attrs.get("validation_passed") is False:
        _warn_once(
            frame_file.path,
            "its frames failed validation and were written with --force "
            "(validation_passed=False); see the export report before training on them",
        )


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


def _as_dtype(dtype: str) -> PixelType:
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def _check_size(frame_file: FrameFile, expected: tuple[int, int] | None) -> tuple[int, int]:
    """Frames from several files are stacked into one batch, so they must share one size."""
    if expected is not None and frame_file.frame_size != expected:
        raise UsageError(
            f"{frame_file.path}: frames are {frame_file.frame_size}, the files before it {expected}"
        )
    return frame_file.frame_size


def to_float(frames: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 items of these datasets (..., 3, H, W) as float32 in [0, 1] (value / 255), on
    ``device``: :func:`carsynth.files.to_float`, the one pixel conversion.

    Move a uint8 batch to the GPU first (this does it, ``non_blocking`` from pinned memory) and
    convert there: a quarter of the bytes cross the bus, and the division runs on the GPU.
    """
    # files.to_float takes the stored (..., H, W, 3) layout: hand it that view (no copy).
    return files.to_float(frames.movedim(-3, -1), signed=False, device=device)


def _channels_first(frames: np.ndarray) -> np.ndarray:
    """Stored frames (..., H, W, 3) as a channels-first view (..., 3, H, W), without a copy."""
    return np.moveaxis(frames, -1, -3)


def _pixels(frames: np.ndarray, dtype: PixelType) -> torch.Tensor:
    """Channels-first uint8 frames (..., 3, H, W) as a tensor of ``dtype``.

    ``frames`` may be a view of stored frames (:func:`_channels_first`): the copy that reorders
    their bytes then happens once, in the DataLoader's collate (torch.stack) or where the caller
    makes the tensor contiguous. Frames from a cache are contiguous already.
    """
    tensor = torch.from_numpy(frames)
    return tensor if dtype == "uint8" else to_float(tensor)


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
            _check_forced(frame_file)
            part = frame_file.read(split, None if limit is None else limit - total)
        parts.append(part)
        total += len(part)
    return np.concatenate(parts)


class _FileReader(Dataset):
    """What every dataset here shares: its files, their frame caches (:mod:`carsynth.frame_cache`),
    both opened lazily once per process, and reads of frame rows.

    With a cache, rows are read from the memory-mapped copy (any order costs the same); without
    one, from the HDF5 file in as few slices as possible."""

    paths: list[Path]
    _caches: list[Path | None]
    _files: dict[int, FrameFile]
    _maps: dict[int, np.ndarray]
    _pid: int | None

    def _add_cache(self, frame_file: FrameFile, cache: CacheSetting) -> None:
        """Find or build the cache of the next file in ``paths`` (None: read the file itself)."""
        try:
            self._caches.append(cached_frames(frame_file, cache))
        except OSError as error:
            self._caches.append(None)
            _warn_once(
                frame_file.path,
                f"cannot write its frame cache in {cache_folder(cache)} ({error}); "
                "reading the compressed file instead (slower)",
            )

    def _open(self) -> None:
        """Forget handles opened by another process (the parent before a fork) or none yet."""
        if self._pid != os.getpid():
            self._files, self._maps, self._pid = {}, {}, os.getpid()

    def _file(self, k: int) -> FrameFile:
        """This process's handle on file ``k``, opened on first use."""
        self._open()
        if k not in self._files:
            self._files[k] = open_frame_file(self.paths[k], cache_bytes=CACHE_BYTES)
        return self._files[k]

    def _map(self, k: int) -> np.ndarray | None:
        """This process's memory map of file ``k``'s cache, opened on first use (None: no cache,
        or it was deleted since the dataset was built: then the file is read, with a warning)."""
        self._open()
        if k not in self._maps and self._caches[k] is not None:
            try:
                self._maps[k] = np.load(self._caches[k], mmap_mode="r")
            except (OSError, ValueError) as error:
                message = f"cannot open its frame cache ({error}); reading the file"
                _warn_once(self.paths[k], message)
                self._caches[k] = None
        return self._maps.get(k)

    def _rows(self, k: int, rows: np.ndarray) -> np.ndarray:
        """Frames at ``rows`` of file ``k`` (any order, repeats allowed), channels-first uint8
        (n, 3, H, W): contiguous from a cache, a view of the stored layout from the file.

        Without a cache, the distinct rows are read in sorted order, one slice per contiguous
        run, so a batch that holds whole chunks decompresses each chunk once.
        """
        cached = self._map(k)
        if cached is not None:
            return cached[rows]
        unique, inverse = np.unique(rows, return_inverse=True)
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        frames = self._file(k).frames
        try:
            parts = [frames[int(run[0]) : int(run[-1]) + 1] for run in np.split(unique, breaks)]
        except (OSError, RuntimeError) as error:
            raise UsageError(f"{self.paths[k]}: cannot read frames (damaged? {error})") from None
        return _channels_first(np.concatenate(parts)[inverse.reshape(-1)])

    def __getstate__(self) -> dict:
        # Pickled for spawn/forkserver workers: carry the paths, caches' paths and index, never an
        # h5py handle or a memory map.
        return {**self.__dict__, "_files": {}, "_maps": {}, "_pid": None}


class FrameDataset(_FileReader):
    """Frames of one or more files (shards) as tensors (3, H, W).

    Item ``i`` is frame ``i`` of the split, counting through the files in the order given (in a
    version-2 real file an episode's frames include its final observation). ``dtype="float32"``
    (default) gives values in [0, 1], ``"uint8"`` the stored pixels (convert with
    :func:`to_float` on the GPU). ``transform``, if given, is applied to each item. ``cache``:
    where the frames are read from (see the module docstring; default: the frame cache). Batched
    reads: a DataLoader with a batch size calls ``__getitems__``, which reads the batch's rows at
    once (without a cache, each file's rows in sorted runs, which :class:`ChunkBatchSampler`
    makes whole compressed chunks).

    The files are checked when the dataset is built (a bad file raises :class:`UsageError` naming
    it); the index holds one row per episode, not per frame, so it stays small for large files.
    """

    def __init__(
        self,
        paths: Paths,
        split: str | None = None,
        transform: Transform | None = None,
        dtype: PixelType = "float32",
        cache: CacheSetting = True,
    ) -> None:
        self.paths = _as_paths(paths)
        self.split = _as_split(split)
        self.transform = transform
        self.dtype = _as_dtype(dtype)
        self._files, self._maps, self._pid, self._caches = {}, {}, None, []
        # One segment per contiguous run of frames (an episode, or a whole synthetic file).
        seg_file, seg_start, seg_length, seg_chunk = [], [], [], []
        size = None
        for k, path in enumerate(self.paths):
            with open_frame_file(path) as frame_file:
                size = _check_size(frame_file, size)
                _check_forced(frame_file)
                self._add_cache(frame_file, cache)
                chunk = (frame_file.frames.chunks or (1,))[0]
                for a, b in frame_file.frame_ranges(self.split):
                    seg_file.append(k)
                    seg_start.append(a)
                    seg_length.append(b - a)
                    seg_chunk.append(chunk)
        self.frame_size: tuple[int, int] = size
        self._seg_file = np.asarray(seg_file, dtype=np.int64)
        self._seg_start = np.asarray(seg_start, dtype=np.int64)
        self._seg_chunk = np.asarray(seg_chunk, dtype=np.int64)
        self._seg_offset = np.concatenate([[0], np.cumsum(seg_length, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self._seg_offset[-1])

    def _locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which file (its position in ``paths``) holds each item, and at which row."""
        n = len(self)
        if indices.size and not (indices.min() >= -n and indices.max() < n):
            bad = indices[(indices < -n) | (indices >= n)][0]
            raise IndexError(f"index {bad} out of range for {n} frames")
        indices = indices % max(n, 1)
        seg = np.searchsorted(self._seg_offset, indices, side="right") - 1
        return self._seg_file[seg], self._seg_start[seg] + indices - self._seg_offset[seg]

    def _read(self, indices: Sequence[int]) -> torch.Tensor:
        """Items ``indices`` as one tensor (n, 3, H, W), read file by file."""
        files, rows = self._locate(np.asarray(indices, dtype=np.int64).reshape(-1))
        present = np.unique(files)
        if len(present) == 1:  # the usual case: no copy into a joint buffer
            return _pixels(self._rows(int(present[0]), rows), self.dtype)
        frames = np.empty((len(rows), 3, *self.frame_size), dtype=np.uint8)
        for k in present:
            mine = files == k
            frames[mine] = self._rows(int(k), rows[mine])
        return _pixels(frames, self.dtype)

    def __getitem__(self, index: int | Sequence[int]) -> torch.Tensor:
        """Item ``index`` (3, H, W); for a sequence of indices, those items as one tensor
        (n, 3, H, W): a training loop that draws its own indices reads a batch in one call, at
        the in-memory rate from the frame cache (README.md, "Loader speed"). It also serves
        ``DataLoader(dataset, sampler=a batch sampler, batch_size=None)``."""
        if np.ndim(index) == 0:  # an int, a NumPy integer, a 0-d tensor
            image = self._read([index])[0]
            return image if self.transform is None else self.transform(image)
        if self.transform is None:
            return self._read(index).contiguous()
        return torch.stack(self.__getitems__(index))

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        images = list(self._read(indices))
        return images if self.transform is None else [self.transform(x) for x in images]

    def chunks(self) -> np.ndarray:
        """The dataset cut where the files' compressed chunks are, as rows (first item, count):
        reading one whole row decompresses each chunk it touches once."""
        out = []
        for seg, (row, chunk) in enumerate(zip(self._seg_start, self._seg_chunk, strict=True)):
            first, end = self._seg_offset[seg], self._seg_offset[seg + 1]
            # Chunk boundaries inside the segment, in rows, then shifted to item numbers.
            inner = np.arange((row // chunk + 1) * chunk, row + end - first, chunk)
            cuts = np.concatenate([[row], inner, [row + end - first]]) - row + first
            out.extend(zip(cuts[:-1], np.diff(cuts), strict=True))
        return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def _distributed(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """``(num_replicas, rank)``: the given ones, else torch.distributed's, else one process."""
    if num_replicas is None or rank is None:
        ready = torch.distributed.is_available() and torch.distributed.is_initialized()
        num_replicas = torch.distributed.get_world_size() if ready else 1
        rank = torch.distributed.get_rank() if ready else 0
    if not 0 <= rank < num_replicas:
        raise UsageError(f"rank must be in [0, {num_replicas}), got {rank}")
    return num_replicas, rank


class ChunkBatchSampler(Sampler[list[int]]):
    """Shuffled batches of a :class:`FrameDataset` that decompress each chunk about once.

    For a dataset without a frame cache (``cache=False``): reads from the cache cost the same in
    any order, so there a per-frame shuffle (``shuffle=True``) is as fast. A frame read alone
    from the file costs the decompression of its whole chunk (``storage.FRAME_CHUNK`` = 8
    frames), so a per-frame shuffle decompresses 8 frames per frame used. This sampler shuffles
    chunks instead, then frames within a small group of them: each epoch it permutes the
    dataset's :meth:`~FrameDataset.chunks` (seeded by ``seed`` and the epoch), deals them
    round-robin to ``num_replicas`` ranks (default: torch.distributed's, like
    ``DistributedSampler``), cuts every rank to the same number of frames (so every rank runs
    the same number of steps), and then shuffles the frames of each group of ``mix`` batches
    (``mix * batch_size`` frames: about ``mix * batch_size / 8`` whole chunks) across those
    batches. Every frame comes once per epoch. A batch holds frames of ``mix * batch_size / 8``
    random chunks, a few per chunk; ``mix=1`` gives batches of whole chunks (fastest, neighbour
    frames together). A group of chunks stays in the reader's chunk cache (``CACHE_BYTES`` per
    open file and worker, 85 chunks of 8 frames of 64x64: the default ``mix=8`` with batches of 64
    needs 64), so each worker decompresses a chunk once per group. Use it as
    ``DataLoader(dataset, batch_sampler=sampler)``; call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        dataset: FrameDataset,
        batch_size: int,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        mix: int = 8,
    ) -> None:
        if batch_size < 1 or mix < 1:
            raise UsageError(f"batch_size and mix must be at least 1, got {batch_size}, {mix}")
        self.chunk_rows = dataset.chunks()
        self.batch_size, self.seed, self.drop_last, self.mix = batch_size, seed, drop_last, mix
        self.num_replicas, self.rank = _distributed(num_replicas, rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _items(self) -> np.ndarray:
        """This rank's items for the current epoch, in order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.chunk_rows))
        dealt = [self.chunk_rows[order[r :: self.num_replicas]] for r in range(self.num_replicas)]
        keep = min(int(rows[:, 1].sum()) for rows in dealt)
        items = _concat([np.arange(first, first + count) for first, count in dealt[self.rank]])
        items = items[:keep]
        group = self.mix * self.batch_size
        for at in range(0, len(items) if self.mix > 1 else 0, group):
            rng.shuffle(items[at : at + group])  # in place: frames move within their group
        return items

    def __iter__(self) -> Iterator[list[int]]:
        items = self._items()
        for at in range(0, len(items), self.batch_size):
            batch = items[at : at + self.batch_size]
            if self.drop_last and len(batch) < self.batch_size:
                return
            yield batch.tolist()

    def __len__(self) -> int:
        n = len(self._items())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


class MixedFrames(Dataset):
    """Real and synthetic frames in one Dataset, each item flagged, mixed at a set ratio.

    Item ``i`` is ``(frame, is_synthetic)``: items ``0 .. num_real - 1`` are the real frames,
    ``num_real .. len - 1`` the synthetic ones (each a :class:`FrameDataset` item), so a DataLoader
    batch is ``(frames, is_synthetic)`` with a bool tensor of shape (B,). ``real`` and
    ``synthetic`` are FrameDatasets or paths (paths give ``split=None``: pass
    ``FrameDataset(paths, split="train")`` to hold frames out).

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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, bool]]:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and not (indices.min() >= -len(self) and indices.max() < len(self)):
            raise IndexError(f"index out of range for {len(self)} frames")
        indices = indices % max(len(self), 1)
        synthetic = indices >= self.num_real
        frames: list[torch.Tensor | None] = [None] * len(indices)
        for flag, source, offset in ((False, self.real, 0), (True, self.synthetic, self.num_real)):
            where = np.flatnonzero(synthetic == flag)
            if len(where):
                for i, frame in zip(
                    where, source.__getitems__(indices[where] - offset), strict=True
                ):
                    frames[i] = frame
        return [(frame, bool(flag)) for frame, flag in zip(frames, synthetic, strict=True)]

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


# ------------------------------------------------------------------------------- sequences
# What a version-1 file (no final observations) costs each sequence loader.
V1_LOSS = {
    "episodes": "episodes have T observations for T actions",
    "windows": "each episode gives one window position fewer",
    "transitions": "each episode gives one transition fewer (no next observation at its end)",
}


def _real_file(frame_file: FrameFile, what: str) -> FrameFile:
    """Sequences need a real file (episodes); a version-1 file lacks each final observation."""
    if frame_file.kind != "real":
        raise UsageError(f"{frame_file.path}: a {frame_file.kind} file has no episodes ({what})")
    if not frame_file.final_observations:
        _warn_once(
            frame_file.path,
            "schema version 1 stores no final observation (the one after an episode's last "
            f"action), so {V1_LOSS[what]}; collect again for schema version 2",
        )
    return frame_file


def _episode_as_torch(episode: Episode, dtype: PixelType) -> Episode:
    """An episode with tensors: observations (T + 1, 3, H, W) of ``dtype``, the rest as stored."""
    return Episode(
        seed=episode.seed,
        observations=_pixels(_channels_first(episode.observations), dtype),
        actions=torch.from_numpy(episode.actions),
        rewards=torch.from_numpy(episode.rewards),
        terminations=torch.from_numpy(episode.terminations),
        truncations=torch.from_numpy(episode.truncations),
        holdout=episode.holdout,
    )


def load_episodes(
    paths: Paths,
    split: str | None = None,
    as_torch: bool = False,
    dtype: PixelType = "float32",
) -> Iterator[Episode]:
    """The episodes of real files, one at a time, in file order (memory holds one episode).

    Each is a :class:`carsynth.storage.Episode`: ``observations`` (T + 1; T for a version-1
    file), ``actions``, ``rewards``, ``terminations``, ``truncations``, ``seed``, ``holdout``.
    NumPy arrays as stored (observations uint8 (T + 1, H, W, 3)), or with ``as_torch`` tensors
    (observations (T + 1, 3, H, W) of ``dtype``, as every torch item here).
    """
    split, dtype = _as_split(split), _as_dtype(dtype)
    for path in _as_paths(paths):
        with open_frame_file(path) as frame_file:
            _real_file(frame_file, "episodes")
            for index in np.flatnonzero(frame_file.episode_mask(split)):
                episode = frame_file.episode(int(index))
                yield _episode_as_torch(episode, dtype) if as_torch else episode


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """Index arrays joined into one int64 array (empty when there are none)."""
    return np.concatenate([np.zeros(0, np.int64), *parts]).astype(np.int64)


class _StepReader(_FileReader):
    """A dataset of positions inside episodes: ``(file, first observation row, first step row)``
    per item, and every file's step data held in memory (a few bytes per step)."""

    def _index(
        self, paths: Paths, split: str | None, what: str, positions: Callable, cache: CacheSetting
    ) -> None:
        """Build the index; ``positions(n_obs, n_steps)`` gives the offsets used per episode."""
        self.paths = _as_paths(paths)
        split = _as_split(split)
        self._files, self._maps, self._pid, self._caches = {}, {}, None, []
        files, obs, steps = [], [], []
        self.steps: list[dict[str, np.ndarray]] = []
        size = None
        for k, path in enumerate(self.paths):
            with open_frame_file(path) as frame_file:
                size = _check_size(_real_file(frame_file, what), size)
                self._add_cache(frame_file, cache)
                self.steps.append(
                    {n: d[: frame_file.num_steps] for n, d in frame_file.steps.items()}
                )
                final = int(frame_file.final_observations)
                for row in frame_file.episodes[frame_file.episode_mask(split)]:
                    j = positions(int(row["length"]) + final, int(row["length"]))
                    files.append(np.full(len(j), k))
                    obs.append(row["start"] + j)
                    steps.append(row["step_start"] + j)
        self.frame_size: tuple[int, int] | None = size
        self._file_of, self._obs_row, self._step_row = map(_concat, (files, obs, steps))

    def __len__(self) -> int:
        return len(self._file_of)

    def _where(self, index: int) -> tuple[int, int, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        return int(self._file_of[index]), int(self._obs_row[index]), int(self._step_row[index])


class WindowDataset(_StepReader):
    """Fixed-length windows of real episodes: the MDN-RNN / Dreamer training batch.

    Item ``i`` is a dict: ``observations`` (L + 1, 3, H, W), ``actions`` (L, A), ``rewards`` (L,),
    ``terminations`` (L,) and ``truncations`` (L,) bool, where ``L = steps``: observation ``t + 1``
    followed action ``t`` from observation ``t``. A window lies inside one episode (it never
    crosses a boundary); windows start every ``stride`` steps (1: every position; ``steps``:
    disjoint). A DataLoader stacks them to (B, L + 1, ...). Episodes shorter than the window give
    none. A version-1 file gives one window position fewer per episode (no final observation).
    """

    def __init__(
        self,
        paths: Paths,
        steps: int,
        split: str | None = None,
        stride: int = 1,
        dtype: PixelType = "float32",
        cache: CacheSetting = True,
    ) -> None:
        if steps < 1 or stride < 1:
            raise UsageError(f"steps and stride must be at least 1, got {steps} and {stride}")
        self.length, self.stride, self.dtype = steps, stride, _as_dtype(dtype)
        # A window needs steps + 1 observations: it may start at 0 .. n_obs - steps - 1.
        self._index(
            paths,
            split,
            "windows",
            lambda n_obs, n: np.arange(0, max(n_obs - steps, 0), stride),
            cache,
        )

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        k, o, s = self._where(index)
        item = {
            "observations": _pixels(self._rows(k, np.arange(o, o + self.length + 1)), self.dtype)
        }
        for name, values in self.steps[k].items():
            item[name] = torch.from_numpy(values[s : s + self.length])
        return item


class TransitionDataset(_StepReader):
    """Every step of real episodes as an offline-RL transition.

    Item ``i`` is a dict: ``observation`` and ``next_observation`` (3, H, W), ``action`` (A,),
    ``reward`` (), ``terminated`` and ``truncated`` (bool): action ``t`` taken from observation
    ``t``, its reward and the env's flags, and observation ``t + 1``. A version-2 file gives
    sum(T) transitions (every step); a version-1 file sum(T - 1), with a warning (the last step
    of each episode has no next observation there). Batched reads: see :class:`FrameDataset`.
    """

    def __init__(
        self,
        paths: Paths,
        split: str | None = None,
        dtype: PixelType = "float32",
        cache: CacheSetting = True,
    ):
        self.dtype = _as_dtype(dtype)
        # Step t needs observation t + 1: every step in version 2, all but the last in version 1.
        self._index(
            paths, split, "transitions", lambda n_obs, n: np.arange(min(n, n_obs - 1)), cache
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        where = [self._where(int(i)) for i in indices]
        files = np.array([w[0] for w in where])
        observations = np.empty((len(where), 2, 3, *self.frame_size), dtype=np.uint8)
        for k in np.unique(files):
            mine = np.flatnonzero(files == k)
            rows = np.array([where[i][1] for i in mine])
            pairs = self._rows(int(k), np.stack([rows, rows + 1], axis=1).reshape(-1))
            observations[mine] = pairs.reshape(len(mine), 2, 3, *self.frame_size)
        pixels = _pixels(observations, self.dtype)
        items = []
        for i, (k, _, s) in enumerate(where):
            steps = self.steps[k]
            items.append({
                "observation": pixels[i, 0],
                "action": torch.from_numpy(steps["actions"][s]),
                "reward": torch.tensor(steps["rewards"][s]),
                "next_observation": pixels[i, 1],
                "terminated": torch.tensor(steps["terminations"][s]),
                "truncated": torch.tensor(steps["truncations"][s]),
            })  # fmt: skip
        return items
