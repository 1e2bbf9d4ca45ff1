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

Writers. One process writes a file at a time: :func:`writer_lock` takes an exclusive lock on a
file beside it (``NAME.lock``, holding the writer's pid, host and command), and a second writer is
refused with one line naming the first. A :class:`FrameWriter` keeps the file open for the whole
run in HDF5's single-writer/multiple-reader (SWMR) mode, so readers (``carsynth info``, a
``FrameDataset``) may open it at any time: they read in SWMR mode without HDF5's file lock, so
they never hold a lock a writer needs. (Reopening the file per episode, as carsynth once did,
made the writer collide with any reader that held it open: ``BlockingIOError: unable to lock
file``.)

Crash safety. SWMR orders HDF5's writes so that the file on disk is consistent at every instant,
so a SIGKILL at any moment leaves a readable file. Each episode's steps are written and flushed
first and its episode-table row last: frames of an episode whose row never landed are ignored by
every reader here and cut away by :func:`repair`. A killed writer leaves HDF5's "open for writing"
flag set, which SWMR read mode ignores; :func:`repair` (run by ``--resume``) rewrites the file
clean (a copy: it needs the file's size free on its disk).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
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


def _build(
    h5: h5py.File,
    kind: str,
    frame_size: tuple[int, int],
    action_dim: int | None,
    attrs: Mapping[str, Any],
) -> None:
    """Create the schema's (empty) datasets and attributes in a new file."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "real" and action_dim is None:
        raise ValueError("real files need action_dim")
    height, width = frame_size
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
            h5.create_dataset(name, shape=(0,), maxshape=(None,), dtype=bool, chunks=(step_chunk,))
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
    path = check_writable(path, overwrite)

    def build(tmp: Path) -> None:
        with h5py.File(tmp, "w", libver="latest") as h5:
            _build(h5, kind, frame_size, action_dim, attrs)

    return atomic_write(path, build)


# How long opening a file waits for another process: a writer for a reader that holds HDF5's
# lock, a reader for a writer that has not switched to SWMR mode yet.
OPEN_WAIT_SECONDS = 10.0


def _open_append(path: str | os.PathLike) -> h5py.File:
    """Open a file for appending, waiting for readers that hold it without SWMR.

    Such a reader holds HDF5's file lock; this waits up to ``OPEN_WAIT_SECONDS`` for it to close
    the file, then refuses with one line.
    """
    deadline = time.monotonic() + OPEN_WAIT_SECONDS
    while True:
        try:
            return h5py.File(path, "a", libver="latest")
        except OSError as error:
            if "unable to lock" not in str(error):
                raise UsageError(f"{path}: cannot open for appending ({error})") from None
            if time.monotonic() > deadline:
                raise UsageError(
                    f"{path}: another program holds HDF5's lock on it (read with h5py.File(path, "
                    "'r', swmr=True, locking=False) to let carsynth write); close it and retry"
                ) from None
            time.sleep(0.1)


# errno values that mean "no room": the disk is full, the user's quota is used up, or the file
# reached the process's size limit (ulimit -f).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _no_space(error: Exception) -> int | None:
    """The errno of a full disk in an h5py error (HDF5 reports it in the message), else None."""
    found = re.search(r"errno = (\d+)", str(error))
    code = int(found.group(1)) if found else getattr(error, "errno", None)
    return code if code in NO_SPACE else None


def _detach(h5: h5py.File) -> None:
    """Point an open file's descriptor at /dev/null, so that closing it writes nothing more.

    After a failed write (disk full) HDF5 would retry its pending writes at close, fail again
    and crash the interpreter (a segfault, exit 139). What is on disk was flushed in SWMR order
    and stays readable, like the file of a killed writer.
    """
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, h5.id.get_vfd_handle())
    os.close(null)


def _close_after(h5: h5py.File, error: BaseException) -> None:
    """Close a file being written after ``error``: detached first if the disk is full."""
    if _no_space(error) is not None:
        _detach(h5)
    h5.close()


@contextlib.contextmanager
def _no_space_is_one_line(path: Path, what: str) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into a :class:`UsageError` saying ``what`` now."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        code = _no_space(error)
        if code is None:
            raise
        raise UsageError(f"{path}: {os.strerror(code).lower()}; {what}") from None


class FrameWriter:
    """Appends to a frame file held open in SWMR-write mode until :meth:`close`.

    Make one with :meth:`create` (a new file) or :meth:`open` (an existing one); the caller holds
    the :func:`writer_lock`. Each append writes whole episodes (or frames, for synthetic files)
    and flushes them, so readers and a killed run see every finished episode (module docstring).
    """

    def __init__(self, h5: h5py.File):
        self.h5 = h5
        self.path = Path(h5.filename)
        self.h5.swmr_mode = True  # after every dataset exists: SWMR cannot add datasets
        if "episodes" in h5:
            table = h5["episodes"]
            last = table[-1] if len(table) else None
            self.num_episodes = len(table)
            self.num_frames = int(last["start"] + last["length"]) if last is not None else 0
        else:
            self.num_episodes, self.num_frames = 0, len(h5["frames"])

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        kind: str,
        frame_size: tuple[int, int],
        action_dim: int | None,
        attrs: Mapping[str, Any],
        overwrite: bool = False,
    ) -> FrameWriter:
        """A writer on a new file, built under a temporary name and renamed into place already
        in SWMR mode, so no reader can hold it in a way that blocks the writer."""
        path = check_writable(path, overwrite)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with _no_space_is_one_line(path, "nothing written"):
                h5 = h5py.File(tmp, "w", libver="latest")
                try:
                    _build(h5, kind, frame_size, action_dim, attrs)
                    writer = cls(h5)
                    os.replace(tmp, path)
                except BaseException as error:
                    _close_after(h5, error)
                    raise
        finally:
            tmp.unlink(missing_ok=True)
        writer.path = path
        return writer

    @classmethod
    def open(cls, path: str | os.PathLike) -> FrameWriter:
        """A writer appending to an existing, whole file (run :func:`repair` on a killed one)."""
        return cls(_open_append(path))

    @contextlib.contextmanager
    def _disk_full_is_one_line(self) -> Iterator[None]:
        """Turn a full disk into a :class:`UsageError`; the file keeps what was appended."""
        what = (
            f"the file keeps its {self.num_episodes} whole episodes; make room, then continue "
            "with --resume"
            if "episodes" in self.h5
            else "make room and retry"
        )
        with _no_space_is_one_line(self.path, what):
            try:
                yield
            except (OSError, RuntimeError) as error:
                if _no_space(error) is not None:
                    _detach(self.h5)
                raise

    def append_episode(self, episode: Episode) -> None:
        """Append one whole episode: its steps, flushed, then its row in the episode table."""
        with self._disk_full_is_one_line():
            self._append_episode(episode)

    def _append_episode(self, episode: Episode) -> None:
        h5, end = self.h5, self.num_frames
        _extend(h5["frames"], episode.frames, end)
        _extend(h5["actions"], episode.actions.astype(np.float32), end)
        _extend(h5["rewards"], episode.rewards.astype(np.float32), end)
        _extend(h5["terminated"], episode.terminated.astype(bool), end)
        _extend(h5["truncated"], episode.truncated.astype(bool), end)
        row = np.array(
            [(end, len(episode), episode.seed, float(episode.rewards.sum()), episode.holdout)],
            dtype=EPISODE_DTYPE,
        )
        _extend(h5["episodes"], row, self.num_episodes)
        self.num_episodes += 1
        self.num_frames += len(episode)

    def append_frames(self, frames: np.ndarray) -> None:
        """Append frames to a synthetic file."""
        with self._disk_full_is_one_line():
            _extend(self.h5["frames"], frames, self.num_frames)
        self.num_frames += len(frames)

    def close(self) -> None:
        self.h5.close()

    def __enter__(self) -> FrameWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _extend(dataset: h5py.Dataset, values: np.ndarray, at: int) -> None:
    dataset.resize(at + len(values), axis=0)
    dataset[at:] = values
    dataset.flush()


def append_episodes(path: str | os.PathLike, episodes: Iterable[Episode]) -> int:
    """Append whole episodes to a real frame file; returns the number of frames stored after."""
    with FrameWriter.open(path) as writer:
        for episode in episodes:
            writer.append_episode(episode)
        return writer.num_frames


def append_frames(path: str | os.PathLike, frames: np.ndarray) -> int:
    """Append frames to a synthetic frame file; returns the number of frames stored after."""
    with FrameWriter.open(path) as writer:
        writer.append_frames(frames)
        return writer.num_frames


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of a frame file: ``NAME.lock`` beside it (the real path, however spelled)."""
    path = Path(path).resolve()
    return path.with_name(f"{path.name}.lock")


def _holder(lock: Path) -> str:
    """Who holds ``lock``, as its holder recorded it."""
    try:
        info = json.loads(lock.read_text())
        return f"pid {info['pid']} on {info['host']} since {info['since']} ({info['command']})"
    except (OSError, ValueError, KeyError):
        return "another process"


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the one-writer lock of ``path`` (see the module docstring) for the ``with`` block.

    The lock is an ``flock`` on ``NAME.lock``, which the kernel releases when its holder dies,
    so a killed writer never leaves a stale lock. A second writer gets :class:`UsageError`.
    """
    lock = lock_path(path)
    if not lock.parent.is_dir():
        raise UsageError(f"{path}: folder {lock.parent} does not exist")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise UsageError(
                f"{path}: cannot create the lock file {lock} ({error.strerror})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(
                f"{path} is being written by {_holder(lock)}; wait or stop it"
            ) from None
        try:  # the previous holder may have removed the file between our open and our lock
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "since": now_iso(),
    }
    os.write(fd, json.dumps(info).encode())
    try:
        yield lock
    finally:
        os.unlink(lock)
        os.close(fd)


def _rewrite(path: Path, end: int | None) -> None:
    """Copy a file left by a killed writer into a fresh file, renamed into place.

    HDF5 refuses to open such a file for writing (its "open for writing" flag is set and its
    end-of-allocation mark is stale), but SWMR read mode sees consistent contents. ``h5py``'s
    ``copy`` (HDF5's H5Ocopy) moves the compressed chunks as they are, so this is a fast copy.
    With ``end``, the step datasets of the copy are cut back to ``end`` frames. Readers that
    have the old file open keep reading it undisturbed.
    """

    def copy(tmp: Path) -> None:
        with h5py.File(path, "r", swmr=True, locking=False) as src:
            dst = h5py.File(tmp, "w", libver="latest")
            try:
                for key, value in src.attrs.items():
                    dst.attrs[key] = value
                for name in src:
                    src.copy(src[name], dst, name=name)
                    if end is not None and name in ("frames", *STEP_DATASETS):
                        dst[name].resize(end, axis=0)
            except BaseException as error:
                _close_after(dst, error)
                raise
            dst.close()

    size, free = path.stat().st_size, shutil.disk_usage(path.parent).free
    if free < size:
        raise UsageError(
            f"{path}: repairing it needs {size / 2**20:.1f} MiB free beside it, "
            f"{free / 2**20:.1f} MiB are; free space and retry"
        )
    with _no_space_is_one_line(path, "left as it was; free space and retry"):
        atomic_write(path, copy)


def _open_h5(path: Path, cache_bytes: int | None = None) -> h5py.File:
    """Open read-only, in SWMR read mode and without HDF5's file lock.

    SWMR read mode sees consistent contents while a writer appends (a plain reader's view goes
    stale: it fails on chunks the writer rewrote, "addr overflow"), and reads a file whose
    killed writer left its "open for writing" flag set. Without the lock, a reader that holds
    the file open (a FrameDataset, for a whole training run) never keeps a writer from opening
    it. A plain open first checks what SWMR read mode skips: a file cut short.
    ``cache_bytes`` sizes the per-dataset chunk cache (``None``: HDF5's default, 1 MiB before
    HDF5 2.0 and 8 MiB since).
    """
    deadline = time.monotonic() + OPEN_WAIT_SECONDS
    while True:
        try:
            h5py.File(path, "r", locking=False).close()
        except OSError as error:
            if "already open for write" not in str(error):
                raise UsageError(f"{path}: not an HDF5 file or damaged ({error})") from None
        try:
            return h5py.File(path, "r", swmr=True, locking=False, rdcc_nbytes=cache_bytes)
        except OSError as error:
            # A writer between opening the file and switching to SWMR mode (milliseconds).
            if "not already open for SWMR writing" not in str(error):
                raise UsageError(f"{path}: not an HDF5 file or damaged ({error})") from None
            if time.monotonic() > deadline:
                raise UsageError(f"{path}: being written without SWMR; retry later") from None
        time.sleep(0.01)


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
        # The episode table is read before any other dataset is opened: while a writer appends
        # (SWMR), the datasets are then at least as long as the table says, because the writer
        # flushes an episode's steps before its row. (Read the other way round, a reader could
        # see a row whose frames its older view of 'frames' did not have yet.)
        self.episodes: np.ndarray | None = self._read_table() if self.kind == "real" else None
        self._check_frames()
        self.num_frames = int(self.frames.shape[0])
        if self.episodes is not None:
            self.num_frames = int(self.episodes["length"].sum())
            for name in ("frames", *STEP_DATASETS):
                if self.h5[name].shape[0] < self.num_frames:
                    raise self._fail(
                        f"'{name}' is shorter than the episode table (truncated file?)"
                    )

    def _read_table(self) -> np.ndarray:
        """The episode table of a real file, checked: columns, lengths, contiguous starts."""
        if "frames" not in self.h5:
            raise self._fail("no 'frames' dataset")
        for name in (*STEP_DATASETS, "episodes"):
            if name not in self.h5:
                raise self._fail(f"real file without '{name}'")
        table = self.h5["episodes"][:]
        if table.dtype.names != EPISODE_DTYPE.names:
            raise self._fail("episode table has the wrong columns")
        negative = np.flatnonzero(table["length"] < 0)
        if len(negative):
            first = table[negative[0]]
            raise self._fail(
                f"episode {negative[0]} (seed {first['seed']}) has length {first['length']}"
            )
        starts = np.concatenate([[0], np.cumsum(table["length"])[:-1]])
        if len(table) and not np.array_equal(starts, table["start"]):
            raise self._fail("episode table is not contiguous")
        return table

    def _check_frames(self) -> None:
        """The frames dataset: uint8 (N, H, W, 3), H and W as the attribute says."""
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

    def rows(self, name: str, index: Any) -> np.ndarray:
        """``index`` of dataset ``name``; a damaged chunk raises :class:`UsageError`."""
        try:
            return self.h5[name][index]
        except (OSError, RuntimeError) as error:
            raise UsageError(f"{self.path}: cannot read '{name}' (damaged? {error})") from None

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
            parts.append(self.rows("frames", slice(a, b)))
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


def open_frame_file(path: str | os.PathLike, cache_bytes: int | None = None) -> FrameFile:
    """Open and check a carsynth frame file; bad files raise :class:`UsageError` naming the path."""
    return FrameFile(path, cache_bytes)


def repair(path: str | os.PathLike) -> int:
    """Make a file left by a killed writer whole again; returns the number of frames dropped.

    A file whose writer was killed, or with frames past its last episode, is rewritten with its
    complete episodes only (see :func:`_rewrite`); a file that needs neither is left untouched.
    The file is never changed in place, so readers that have it open are not disturbed. The
    caller holds the :func:`writer_lock`.
    """
    path = Path(path)
    try:
        h5py.File(path, "r", locking=False).close()
        killed = False
    except OSError as error:
        if "already open for write" not in str(error):
            raise UsageError(f"{path}: not an HDF5 file or damaged ({error})") from None
        killed = True
    with FrameFile(path) as frame_file:
        end, trailing = frame_file.num_frames, frame_file.trailing_frames
        real = frame_file.kind == "real"
    if killed or trailing:
        _rewrite(path, end if real else None)
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
                with FrameWriter.open(tmp) as writer:
                    for f in files:
                        for episode in iter_episodes(f):
                            writer.append_episode(episode)

        with writer_lock(out):
            atomic_write(check_writable(out, overwrite), build)
    finally:
        for f in files:
            f.close()
    return Path(out)


def iter_episodes(frame_file: FrameFile) -> Iterable[Episode]:
    """The episodes of a real file, one at a time (memory holds one episode)."""
    for row in frame_file.episodes:
        steps = slice(int(row["start"]), int(row["start"] + row["length"]))
        yield Episode(
            seed=int(row["seed"]),
            frames=frame_file.rows("frames", steps),
            actions=frame_file.rows("actions", steps),
            rewards=frame_file.rows("rewards", steps),
            terminated=frame_file.rows("terminated", steps),
            truncated=frame_file.rows("truncated", steps),
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
