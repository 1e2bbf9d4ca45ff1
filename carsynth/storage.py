"""The carsynth frame file: HDF5 schema version 1.

Every file carsynth writes or reads goes through this module. The layout (documented in README.md):

``frames``       uint8   (N, H, W, 3)  chunked along N and compressed (``FRAME_CHUNK``)
``actions``      float32 (N, A)        real files: action i was taken on frame i
``rewards``      float32 (N,)          real files: reward i followed action i
``terminated``   bool    (N,)          real files: the env's ``terminated`` after action i
``truncated``    bool    (N,)          real files: the env's ``truncated`` after action i
``episodes``     compound (E,)         real files: start, length, seed, return, holdout

File attributes always include ``schema_version``, ``kind`` ("real" or "synthetic"),
``frame_size`` (H, W), ``carsynth_version`` and ``created``; the writer adds its own settings.

Crash safety. Episodes are appended by opening the file, writing one whole episode and closing it
again, with HDF5's single-writer/multiple-reader (SWMR) mode on while the file is open. SWMR orders
HDF5's writes so that the file on disk is consistent at every instant, so a SIGKILL at any moment
leaves a readable file. The episode table is extended last: frames written by an episode whose row
never landed are ignored by every reader here and cut away by :func:`repair`. A kill inside the
few milliseconds of an append also leaves HDF5's "open for writing" flag set: readers here then
open the file in SWMR read mode, and :func:`repair` (run by ``--resume``) rewrites it clean.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from carsynth import __version__
from carsynth.errors import UsageError
from carsynth.files import atomic_write, check_writable

SCHEMA_VERSION = 1
KINDS = ("real", "synthetic")

# Chosen with scripts/bench_storage.py (numbers in README.md, "HDF5 schema"): training reads
# frames in random order, so a chunk should hold few frames (8 frames of 64x64x3 = 96 KiB: a
# random read decompresses 8 frames, not 32) and gzip level 4 wins back the size that small
# chunks lose (measured: 8 / gzip 4 gave a smaller file and 2.6x the random reads/s of 32 / gzip 1).
FRAME_CHUNK = 8
COMPRESSION = "gzip"
COMPRESSION_OPTS = 4

EPISODE_DTYPE = np.dtype(
    [
        ("start", "<i8"),
        ("length", "<i8"),
        ("seed", "<i8"),
        ("return", "<f8"),
        ("holdout", "?"),
    ]
)
STEP_DATASETS = ("actions", "rewards", "terminated", "truncated")
Split = Literal["all", "train", "holdout"]
Ranges = list[tuple[int, int]]  # half-open frame index ranges


@dataclass
class Episode:
    """One whole episode as the collector hands it to the writer."""

    seed: int
    frames: np.ndarray  # uint8 (T, H, W, 3)
    actions: np.ndarray  # float32 (T, A)
    rewards: np.ndarray  # float32 (T,)
    terminated: np.ndarray  # bool (T,)
    truncated: np.ndarray  # bool (T,)
    holdout: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def is_holdout(seed: int, fraction: float) -> bool:
    """Whether the episode with this seed belongs to the holdout split.

    The decision depends on the seed alone (a hash of it), so it does not change when a run is
    resumed, sharded or merged, or when more episodes are collected.
    """
    if fraction <= 0.0:
        return False
    return bool(np.random.default_rng([int(seed), 0x401D]).random() < fraction)


def now_iso() -> str:
    """The current UTC time as an ISO 8601 string, for ``created`` attributes."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _attr_value(value: Any) -> Any:
    """HDF5 attributes hold numbers, strings and arrays; anything else is stored as JSON text."""
    if value is None:
        return "null"
    if isinstance(value, (bool, int, float, str, np.generic)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return np.asarray(value)
    return json.dumps(value, sort_keys=True)


def read_attrs(h5: h5py.File) -> dict[str, Any]:
    """The file attributes as plain Python values (arrays become lists, bytes become str)."""
    out: dict[str, Any] = {}
    for key, value in h5.attrs.items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, bytes):
            value = value.decode()
        out[key] = value
    return out


def create_frame_file(
    path: str | os.PathLike,
    *,
    kind: str,
    frame_size: tuple[int, int],
    action_dim: int | None,
    attrs: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Create an empty frame file with its datasets and attributes, atomically.

    The file is built under a temporary name and renamed into place, so ``path`` either does not
    exist or is a complete schema-v1 file. ``action_dim`` is required for real files, which carry
    actions, rewards, episode flags and the episode table.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = check_writable(path, overwrite)
    height, width = frame_size

    def build(tmp: Path) -> None:
        with h5py.File(tmp, "w", libver="latest") as h5:
            h5.create_dataset(
                "frames",
                shape=(0, height, width, 3),
                maxshape=(None, height, width, 3),
                dtype=np.uint8,
                chunks=(FRAME_CHUNK, height, width, 3),
                compression=COMPRESSION,
                compression_opts=COMPRESSION_OPTS,
                shuffle=False,
            )
            if kind == "real":
                if action_dim is None:
                    raise ValueError("real files need action_dim")
                step_chunk = FRAME_CHUNK * 32
                h5.create_dataset(
                    "actions",
                    shape=(0, action_dim),
                    maxshape=(None, action_dim),
                    dtype=np.float32,
                    chunks=(step_chunk, action_dim),
                )
                h5.create_dataset(
                    "rewards", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(step_chunk,)
                )
                for name in ("terminated", "truncated"):
                    h5.create_dataset(
                        name, shape=(0,), maxshape=(None,), dtype=bool, chunks=(step_chunk,)
                    )
                h5.create_dataset(
                    "episodes", shape=(0,), maxshape=(None,), dtype=EPISODE_DTYPE, chunks=(256,)
                )
            base = {
                "schema_version": SCHEMA_VERSION,
                "kind": kind,
                "frame_size": [height, width],
                "carsynth_version": __version__,
                "created": now_iso(),
            }
            for key, value in {**base, **attrs}.items():
                h5.attrs[key] = _attr_value(value)

    return atomic_write(path, build)


def _extend(dataset: h5py.Dataset, values: np.ndarray, at: int) -> None:
    dataset.resize(at + len(values), axis=0)
    dataset[at:] = values
    dataset.flush()


def append_episodes(path: str | os.PathLike, episodes: Iterable[Episode]) -> int:
    """Append whole episodes to a real frame file; returns the number of frames stored after.

    The step datasets are written and flushed first, the episode table last, so a row in the table
    always describes frames that are on disk (see the module docstring).
    """
    with h5py.File(path, "a", libver="latest") as h5:
        h5.swmr_mode = True
        table = h5["episodes"]
        count = len(table)
        end = int(table[-1]["start"] + table[-1]["length"]) if count else 0
        for episode in episodes:
            length = len(episode)
            _extend(h5["frames"], episode.frames, end)
            _extend(h5["actions"], episode.actions.astype(np.float32), end)
            _extend(h5["rewards"], episode.rewards.astype(np.float32), end)
            _extend(h5["terminated"], episode.terminated.astype(bool), end)
            _extend(h5["truncated"], episode.truncated.astype(bool), end)
            row = np.array(
                [(end, length, episode.seed, float(episode.rewards.sum()), episode.holdout)],
                dtype=EPISODE_DTYPE,
            )
            _extend(table, row, count)
            count += 1
            end += length
        return end


def append_frames(path: str | os.PathLike, frames: np.ndarray) -> int:
    """Append frames to a synthetic frame file; returns the number of frames stored after."""
    with h5py.File(path, "a", libver="latest") as h5:
        h5.swmr_mode = True
        dataset = h5["frames"]
        end = len(dataset)
        _extend(dataset, frames, end)
        return end + len(frames)


def _rewrite_interrupted(path: Path) -> None:
    """Copy a file whose writer was killed mid-append into a fresh file, renamed into place.

    HDF5 refuses to open such a file for writing (its "open for writing" flag is set and its
    end-of-allocation mark is stale), but SWMR read mode sees consistent contents. ``h5py``'s
    ``copy`` (HDF5's H5Ocopy) moves the compressed chunks as they are, so this is a fast copy.
    """

    def copy(tmp: Path) -> None:
        with h5py.File(path, "r", swmr=True) as src, h5py.File(tmp, "w", libver="latest") as dst:
            for key, value in src.attrs.items():
                dst.attrs[key] = value
            for name in src:
                src.copy(src[name], dst, name=name)

    atomic_write(path, copy)


def _open_h5(path: Path, cache_bytes: int | None = None) -> h5py.File:
    """Open read-only; a file whose writer was killed mid-append is opened in SWMR read mode.

    ``cache_bytes`` sizes the per-dataset chunk cache (``None``: HDF5's default, 1 MiB before
    HDF5 2.0 and 8 MiB since).
    """
    try:
        return h5py.File(path, "r", rdcc_nbytes=cache_bytes)
    except OSError as error:
        if "already open for write" not in str(error) and "unable to lock" not in str(error):
            raise UsageError(f"{path}: not an HDF5 file or damaged ({error})") from None
    try:
        return h5py.File(path, "r", swmr=True, rdcc_nbytes=cache_bytes)
    except OSError as error:
        raise UsageError(f"{path}: not an HDF5 file or damaged ({error})") from None


class FrameFile:
    """A schema-v1 frame file opened for reading, with its contents checked.

    Use as a context manager. ``frames`` is the h5py dataset (read slices of it); ``episodes`` the
    episode table as a NumPy structured array (real files) or ``None`` (synthetic files).
    ``cache_bytes`` sizes the chunk cache, for readers of single frames (see carsynth.data).
    """

    def __init__(self, path: str | os.PathLike, cache_bytes: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise UsageError(f"{self.path}: no such file")
        self.h5 = _open_h5(self.path, cache_bytes)
        try:
            self._check()
        except Exception:
            self.h5.close()
            raise

    def _fail(self, what: str) -> UsageError:
        return UsageError(f"{self.path}: not a carsynth frame file ({what})")

    def _check(self) -> None:
        self.attrs = read_attrs(self.h5)
        version = self.attrs.get("schema_version")
        if version is None or "kind" not in self.attrs:
            raise self._fail("no schema_version/kind attributes")
        if version != SCHEMA_VERSION:
            raise self._fail(f"schema version {version}, this carsynth reads {SCHEMA_VERSION}")
        self.kind = self.attrs["kind"]
        if self.kind not in KINDS:
            raise self._fail(f"kind {self.kind!r}")
        if "frames" not in self.h5 or not isinstance(self.h5["frames"], h5py.Dataset):
            raise self._fail("no 'frames' dataset")
        self.frames: h5py.Dataset = self.h5["frames"]
        if self.frames.dtype != np.uint8 or self.frames.ndim != 4 or self.frames.shape[3] != 3:
            raise self._fail(
                f"'frames' must be uint8 (N, H, W, 3), got {self.frames.dtype} {self.frames.shape}"
            )
        self.frame_size = (int(self.frames.shape[1]), int(self.frames.shape[2]))
        if list(self.frame_size) != list(self.attrs.get("frame_size", [])):
            raise self._fail(
                f"frames are {self.frame_size}, attribute says {self.attrs.get('frame_size')}"
            )
        self.episodes: np.ndarray | None = None
        self.num_frames = int(self.frames.shape[0])
        if self.kind == "real":
            for name in (*STEP_DATASETS, "episodes"):
                if name not in self.h5:
                    raise self._fail(f"real file without '{name}'")
            self.episodes = self.h5["episodes"][:]
            if self.episodes.dtype.names != EPISODE_DTYPE.names:
                raise self._fail("episode table has the wrong columns")
            starts = np.concatenate([[0], np.cumsum(self.episodes["length"])[:-1]])
            if len(self.episodes) and not np.array_equal(starts, self.episodes["start"]):
                raise self._fail("episode table is not contiguous")
            self.num_frames = int(self.episodes["length"].sum())
            for name in ("frames", *STEP_DATASETS):
                if self.h5[name].shape[0] < self.num_frames:
                    raise self._fail(
                        f"'{name}' is shorter than the episode table (truncated file?)"
                    )

    @property
    def num_episodes(self) -> int:
        return 0 if self.episodes is None else len(self.episodes)

    @property
    def trailing_frames(self) -> int:
        """Frames past the last episode: left by a writer killed mid-episode, ignored here."""
        return int(self.frames.shape[0]) - self.num_frames

    def episode_mask(self, split: Split) -> np.ndarray:
        """Which episodes belong to ``split`` ("all", "train" or "holdout")."""
        if self.episodes is None:
            if split != "all":
                raise UsageError(f"{self.path}: a {self.kind} file has no {split} split")
            return np.zeros(0, dtype=bool)
        if split == "all":
            return np.ones(len(self.episodes), dtype=bool)
        holdout = self.episodes["holdout"].astype(bool)
        return holdout if split == "holdout" else ~holdout

    def frame_ranges(self, split: Split = "all") -> list[tuple[int, int]]:
        """Half-open frame index ranges of the split, in file order (whole episodes)."""
        if self.episodes is None:
            self.episode_mask(split)
            return [(0, self.num_frames)] if self.num_frames else []
        if split != "all":
            return self.split_ranges()[split]  # THE split: one definition
        chosen = self.episodes
        return [
            (int(s), int(s + n))
            for s, n in zip(chosen["start"], chosen["length"], strict=True)
            if n
        ]

    def holdout_seeds(self, fraction: float | None = None) -> list[int]:
        """Seeds of the held-out episodes: the file's flags, or ``is_holdout(seed, fraction)``."""
        if self.episodes is None:
            return []
        seeds = self.episodes["seed"].astype(int)
        if fraction is None:
            return sorted(int(s) for s in seeds[self.episodes["holdout"].astype(bool)])
        return sorted(int(s) for s in seeds if is_holdout(int(s), fraction))

    def split_ranges(self, holdout_seeds: Iterable[int] | None = None) -> dict[str, Ranges]:
        """THE train/holdout split: frame ranges (whole episodes, file order) of each side.

        The held-out episodes are those whose seed is in ``holdout_seeds``; ``None`` takes the
        file's own holdout flags. A file without episodes (synthetic) is all "train".
        """
        if self.episodes is None:
            return {"train": self.frame_ranges("all"), "holdout": []}
        if holdout_seeds is None:
            held = self.episodes["holdout"].astype(bool)
        else:
            held = np.isin(self.episodes["seed"].astype(int), list(holdout_seeds))
        out: dict[str, Ranges] = {"train": [], "holdout": []}
        for row, is_held in zip(self.episodes, held, strict=True):
            if row["length"]:
                a = int(row["start"])
                out["holdout" if is_held else "train"].append((a, a + int(row["length"])))
        return out

    def read_ranges(self, ranges: Ranges) -> np.ndarray:
        """The frames of ``ranges`` as one uint8 array (N, H, W, 3)."""
        if not ranges:
            return np.zeros((0, *self.frame_size, 3), dtype=np.uint8)
        return np.concatenate([self.frames[a:b] for a, b in ranges])

    def count(self, split: Split = "all") -> int:
        return sum(b - a for a, b in self.frame_ranges(split))

    def read(self, split: Split = "all", limit: int | None = None) -> np.ndarray:
        """Frames of a split as one uint8 array (N, H, W, 3), at most ``limit`` of them."""
        parts, total = [], 0
        for a, b in self.frame_ranges(split):
            if limit is not None:
                b = min(b, a + limit - total)
            if b <= a:
                break
            parts.append(self.frames[a:b])
            total += b - a
        if not parts:
            return np.zeros((0, *self.frame_size, 3), dtype=np.uint8)
        return np.concatenate(parts)

    def close(self) -> None:
        self.h5.close()

    def __enter__(self) -> FrameFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def episode_ids(ranges: Ranges) -> np.ndarray:
    """Each frame's episode number (0, 1, ... in range order) for frames read from ``ranges``
    (:meth:`FrameFile.split_ranges`): int64 (N,). The validation treats episodes, not frames, as
    the unit of evidence."""
    lengths = [b - a for a, b in ranges]
    return np.repeat(np.arange(len(ranges), dtype=np.int64), lengths)


def open_frame_file(path: str | os.PathLike, cache_bytes: int | None = None) -> FrameFile:
    """Open and check a carsynth frame file; bad files raise :class:`UsageError` naming the path."""
    return FrameFile(path, cache_bytes)


def repair(path: str | os.PathLike) -> int:
    """Make a file left by a killed writer whole again; returns the number of frames dropped.

    A file killed inside an append is first rewritten (see :func:`_rewrite_interrupted`); then the
    step datasets are cut back to the end of the last complete episode. A file that needs neither
    is left untouched.
    """
    path = Path(path)
    try:
        h5py.File(path, "r").close()
    except OSError as error:
        if "already open for write" not in str(error):
            raise UsageError(f"{path}: not an HDF5 file or damaged ({error})") from None
        _rewrite_interrupted(path)
    with FrameFile(path) as frame_file:
        end, trailing = frame_file.num_frames, frame_file.trailing_frames
        names = ("frames", *STEP_DATASETS) if frame_file.kind == "real" else ()
    if trailing:
        with h5py.File(path, "a", libver="latest") as h5:
            for name in names:
                h5[name].resize(end, axis=0)
    return trailing


def merge(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    virtual: bool = False,
    overwrite: bool = False,
) -> Path:
    """Join real frame files (shards) into one, episodes in seed order.

    ``virtual=True`` writes an HDF5 virtual dataset that points at the shard files instead of
    copying their frames (the shards must then stay where they are). Shards must agree on every
    setting except their seed range. The merged file is written atomically.
    """
    if not inputs:
        raise UsageError("merge: give at least one input file")
    files = [open_frame_file(p) for p in inputs]
    try:
        for f in files:
            if f.kind != "real":
                raise UsageError(f"{f.path}: merge joins real files, this one is {f.kind}")
        files.sort(key=lambda f: int(f.episodes["seed"][0]) if f.num_episodes else 2**62)
        ignore = {"created", "shard", "episodes_requested", "first_episode"}
        first = {k: v for k, v in files[0].attrs.items() if k not in ignore}
        for f in files[1:]:
            other = {k: v for k, v in f.attrs.items() if k not in ignore}
            diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
            if diff:
                raise UsageError(
                    f"{f.path}: settings differ from {files[0].path}: {', '.join(diff)}"
                )
        seeds = np.concatenate([f.episodes["seed"] for f in files])
        if len(np.unique(seeds)) != len(seeds):
            raise UsageError("merge: the inputs share episode seeds (overlapping shards?)")
        out = check_writable(out, overwrite)
        if Path(out).resolve() in {f.path.resolve() for f in files}:
            raise UsageError(f"{out}: the output must not be one of the inputs")
        attrs = {**first, "merged_from": [str(f.path) for f in files]}
        action_dim = int(files[0].h5["actions"].shape[1])

        def build(tmp: Path) -> None:
            create_frame_file(
                tmp,
                kind="real",
                frame_size=files[0].frame_size,
                action_dim=action_dim,
                attrs=attrs,
                overwrite=True,
            )
            if virtual:
                _write_virtual(tmp, files)
            else:
                for f in files:
                    for episode in iter_episodes(f):
                        append_episodes(tmp, [episode])

        atomic_write(out, build)
    finally:
        for f in files:
            f.close()
    return out


def iter_episodes(frame_file: FrameFile) -> Iterable[Episode]:
    """The episodes of a real file, one at a time (memory holds one episode)."""
    h5 = frame_file.h5
    for row in frame_file.episodes:
        a, b = int(row["start"]), int(row["start"] + row["length"])
        yield Episode(
            seed=int(row["seed"]),
            frames=h5["frames"][a:b],
            actions=h5["actions"][a:b],
            rewards=h5["rewards"][a:b],
            terminated=h5["terminated"][a:b],
            truncated=h5["truncated"][a:b],
            holdout=bool(row["holdout"]),
        )


def _write_virtual(path: Path, files: Sequence[FrameFile]) -> None:
    """Replace the (empty) step datasets of ``path`` by virtual datasets over ``files``."""
    total = sum(f.num_frames for f in files)
    with h5py.File(path, "a", libver="latest") as h5:
        for name in ("frames", *STEP_DATASETS):
            source0 = files[0].h5[name]
            layout = h5py.VirtualLayout(shape=(total, *source0.shape[1:]), dtype=source0.dtype)
            at = 0
            for f in files:
                n = f.num_frames
                rel = os.path.relpath(f.path.resolve(), path.resolve().parent)
                layout[at : at + n] = h5py.VirtualSource(rel, name, shape=f.h5[name].shape)[:n]
                at += n
            del h5[name]
            h5.create_virtual_dataset(name, layout)
        table = np.concatenate([f.episodes for f in files])
        table["start"] = np.concatenate([[0], np.cumsum(table["length"])[:-1]])
        del h5["episodes"]
        h5.create_dataset("episodes", data=table, maxshape=(None,), chunks=(256,))
