"""The carsynth frame file: HDF5 schema version 2 (written), versions 1 and 2 (read).

Every file carsynth writes or reads goes through this module. The layout of a real file (schema
version 2, in Minari's and gymnasium's names; documented in README.md), E episodes of T_e steps:

``observations`` uint8   (N + E, H, W, 3) each episode's T_e + 1 observations, the last one the
                                          observation after its last action; chunked along the
                                          first axis and compressed (``FRAME_CHUNK``)
``actions``      float32 (N, A)           action t was taken on the episode's observation t
``rewards``      float32 (N,)             reward t followed action t
``terminations`` bool    (N,)             the env's ``terminated`` after action t
``truncations``  bool    (N,)             the env's ``truncated`` after action t
``episodes``     compound (E,)            start (first observation row), length (T_e), seed,
                                          return, holdout, step_start (first step row)

N = sum(T_e). A synthetic file has ``frames`` (N, H, W, 3) only. Version 1 (still read
everywhere) named the frame dataset ``frames`` and the flags ``terminated``/``truncated``, and
stored T_e frames per episode (no final observation) with steps at the same rows.

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

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
KINDS = ("real", "synthetic")

# Chosen with scripts/bench_storage.py (numbers in README.md, "HDF5 schema"): training reads
# frames in random order, so a chunk should hold few frames (8 frames of 64x64x3 = 96 KiB: a
# random read decompresses 8 frames, not 32) and gzip level 4 wins back the size that small
# chunks lose (measured: 8 / gzip 4 gave a smaller file and 2.6x the random reads/s of 32 / gzip 1).
FRAME_CHUNK = 8
COMPRESSION = "gzip"
COMPRESSION_OPTS = 4

# The episode table. ``start`` is the episode's first row of the frame dataset, ``step_start``
# its first row of the step datasets, ``length`` its number of steps (actions). Version 2 stores
# ``length + 1`` observations per episode (the last: the observation after the last action) and
# adds ``step_start``; in version 1 an episode has ``length`` frames and steps, both at ``start``.
EPISODE_DTYPE_V1 = np.dtype(
    [
        ("start", "<i8"),
        ("length", "<i8"),
        ("seed", "<i8"),
        ("return", "<f8"),
        ("holdout", "?"),
    ]
)
EPISODE_DTYPE = np.dtype([*EPISODE_DTYPE_V1.descr, ("step_start", "<i8")])
# Step datasets under their schema-v2 names (Minari's and gymnasium's), and the names version 1
# used for the same data.
STEP_DATASETS = ("actions", "rewards", "terminations", "truncations")
V1_NAMES = {"terminations": "terminated", "truncations": "truncated"}
Split = Literal["all", "train", "holdout"]
Ranges = list[tuple[int, int]]  # half-open frame index ranges


def dataset_names(version: int, kind: str) -> dict[str, str]:
    """Where the data of a file of this schema version and kind lives: concept -> dataset name.

    ``frames`` is the frame dataset (``observations`` in a version-2 real file, ``frames``
    otherwise); real files add the step datasets (:data:`STEP_DATASETS`) and ``episodes``.
    """
    if kind != "real":
        return {"frames": "frames"}
    names = {"frames": "observations" if version >= 2 else "frames", "episodes": "episodes"}
    for name in STEP_DATASETS:
        names[name] = V1_NAMES.get(name, name) if version == 1 else name
    return names


@dataclass
class Episode:
    """One whole episode: T actions and the T + 1 observations around them.

    ``observations[t]`` is the observation action ``t`` was taken on and ``observations[T]`` the
    one after the last action (an episode read from a version-1 file lacks it: T observations).
    ``rewards[t]``, ``terminations[t]`` and ``truncations[t]`` are what the env returned for
    action ``t`` (the names and layout of Minari's ``EpisodeData``).
    """

    seed: int
    observations: np.ndarray  # uint8 (T + 1, H, W, 3)
    actions: np.ndarray  # float32 (T, A)
    rewards: np.ndarray  # float32 (T,)
    terminations: np.ndarray  # bool (T,)
    truncations: np.ndarray  # bool (T,)
    holdout: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        """The number of steps T."""
        return int(self.actions.shape[0])


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
    version: int = SCHEMA_VERSION,
) -> None:
    """Create the (empty) datasets and attributes of a new file of schema ``version``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "real" and action_dim is None:
        raise ValueError("real files need action_dim")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"schema version must be one of {READABLE_VERSIONS}, got {version}")
    names = dataset_names(version, kind)
    height, width = frame_size
    h5.create_dataset(
        names["frames"],
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
        for name in (names["terminations"], names["truncations"]):
            h5.create_dataset(name, shape=(0,), maxshape=(None,), dtype=bool, chunks=(step_chunk,))
        table = EPISODE_DTYPE if version >= 2 else EPISODE_DTYPE_V1
        h5.create_dataset("episodes", shape=(0,), maxshape=(None,), dtype=table, chunks=(256,))
    base = {
        "kind": kind,
        "frame_size": [height, width],
        "carsynth_version": __version__,
        "created": now_iso(),
    }
    for key, value in {**base, **attrs, "schema_version": version}.items():
        h5.attrs[key] = _attr_value(value)


def create_frame_file(
    path: str | os.PathLike,
    *,
    kind: str,
    frame_size: tuple[int, int],
    action_dim: int | None,
    attrs: Mapping[str, Any],
    overwrite: bool = False,
    schema_version: int = SCHEMA_VERSION,
) -> Path:
    """Create an empty frame file with its datasets and attributes, atomically.

    The file is built under a temporary name and renamed into place, so ``path`` either does not
    exist or is a complete, empty file. ``action_dim`` is required for real files, which carry
    actions, rewards, episode flags and the episode table. ``schema_version`` 1 is for joining
    version-1 files (``merge``); new data is written as version 2.
    """
    path = check_writable(path, overwrite)

    def build(tmp: Path) -> None:
        with h5py.File(tmp, "w", libver="latest") as h5:
            _build(h5, kind, frame_size, action_dim, attrs, schema_version)

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
        self.version = int(h5.attrs["schema_version"])
        self.names = dataset_names(self.version, str(read_attrs(h5)["kind"]))
        # Observations per episode beyond its steps: the final one, from version 2 on.
        self.final = int(self.version >= 2 and "episodes" in h5)
        self.num_episodes, self.num_frames, self.num_steps = 0, len(h5[self.names["frames"]]), 0
        if "episodes" in h5:
            table = h5["episodes"]
            last = table[-1] if len(table) else None
            self.num_episodes = len(table)
            self.num_frames = int(last["start"] + last["length"]) + self.final if len(table) else 0
            step_start = "step_start" if self.version >= 2 else "start"
            self.num_steps = int(last[step_start] + last["length"]) if len(table) else 0

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
        """A writer on a new file (schema version 2), built under a temporary name and renamed
        into place already in SWMR mode, so no reader can hold it in a way that blocks the
        writer."""
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
        """Append one whole episode: its observations and steps, flushed, then its row in the
        episode table. A version-2 file needs T + 1 observations for T actions; a version-1 file
        (a collection begun before version 2, resumed) keeps the first T, as that layout did."""
        with self._disk_full_is_one_line():
            self._append_episode(episode)

    def _append_episode(self, episode: Episode) -> None:
        steps, observations = len(episode), episode.observations
        if not self.final and len(observations) == steps + 1:
            observations = observations[:steps]
        if len(observations) != steps + self.final:
            raise UsageError(
                f"{self.path}: a schema-{self.version} file stores {steps + self.final} "
                f"observations for {steps} actions, this episode has {len(episode.observations)}"
            )
        h5, names = self.h5, self.names
        _extend(h5[names["frames"]], observations, self.num_frames)
        _extend(h5["actions"], episode.actions.astype(np.float32), self.num_steps)
        _extend(h5["rewards"], episode.rewards.astype(np.float32), self.num_steps)
        _extend(h5[names["terminations"]], episode.terminations.astype(bool), self.num_steps)
        _extend(h5[names["truncations"]], episode.truncations.astype(bool), self.num_steps)
        row = (self.num_frames, steps, episode.seed, float(episode.rewards.sum()), episode.holdout)
        if self.version >= 2:
            row = np.array([(*row, self.num_steps)], dtype=EPISODE_DTYPE)
        else:
            row = np.array([row], dtype=EPISODE_DTYPE_V1)
        _extend(h5["episodes"], row, self.num_episodes)
        self.num_episodes += 1
        self.num_frames += steps + self.final
        self.num_steps += steps

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


def _rewrite(path: Path, ends: Mapping[str, int]) -> None:
    """Copy a file left by a killed writer into a fresh file, renamed into place.

    HDF5 refuses to open such a file for writing (its "open for writing" flag is set and its
    end-of-allocation mark is stale), but SWMR read mode sees consistent contents. ``h5py``'s
    ``copy`` (HDF5's H5Ocopy) moves the compressed chunks as they are, so this is a fast copy.
    Each dataset named in ``ends`` is cut back to that many rows in the copy. Readers that
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
                    if name in ends:
                        dst[name].resize(ends[name], axis=0)
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
    """A frame file (schema version 1 or 2) opened for reading, with its contents checked.

    Use as a context manager. ``frames`` is the h5py frame dataset (``observations`` in a
    version-2 real file; read slices of it), ``steps`` the step datasets of a real file under
    their version-2 names (:data:`STEP_DATASETS`, whatever the file's version), ``episodes`` the
    episode table as a NumPy structured array with :data:`EPISODE_DTYPE` (a version-1 table gets
    ``step_start = start``) or ``None`` (synthetic files). ``final_observations`` says whether
    each episode has its observation after the last action (version 2) or not (version 1).
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
        self.version = self.attrs.get("schema_version")
        if self.version is None or "kind" not in self.attrs:
            raise self._fail("no schema_version/kind attributes")
        if self.version not in READABLE_VERSIONS:
            raise self._fail(
                f"schema version {self.version}, this carsynth reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        self.kind = self.attrs["kind"]
        if self.kind not in KINDS:
            raise self._fail(f"kind {self.kind!r}")
        self.names = dataset_names(self.version, self.kind)
        # The episode table first: a writer appends an episode's steps and then its row, and an
        # SWMR reader keeps each dataset's extent as of its first access, so datasets opened
        # after the table hold at least the episodes it lists (opened before it, they may not).
        table = self.h5["episodes"][:] if self.kind == "real" and "episodes" in self.h5 else None
        name = self.names["frames"]
        if name not in self.h5 or not isinstance(self.h5[name], h5py.Dataset):
            raise self._fail(f"no '{name}' dataset")
        self.frames: h5py.Dataset = self.h5[name]
        if self.frames.dtype != np.uint8 or self.frames.ndim != 4 or self.frames.shape[3] != 3:
            raise self._fail(
                f"'{name}' must be uint8 (N, H, W, 3), got {self.frames.dtype} {self.frames.shape}"
            )
        self.frame_size = (int(self.frames.shape[1]), int(self.frames.shape[2]))
        if list(self.frame_size) != list(self.attrs.get("frame_size", [])):
            raise self._fail(
                f"frames are {self.frame_size}, attribute says {self.attrs.get('frame_size')}"
            )
        self.final_observations = self.kind == "real" and self.version >= 2
        self.episodes: np.ndarray | None = None
        self.steps: dict[str, h5py.Dataset] = {}
        self.num_frames = int(self.frames.shape[0])
        self.num_steps = 0
        if self.kind == "real":
            self._check_episodes(table)

    def _check_episodes(self, stored: np.ndarray | None) -> None:
        """Read the episode table of a real file and check it against the step datasets."""
        for concept in (*STEP_DATASETS, "episodes"):
            if self.names[concept] not in self.h5:
                raise self._fail(f"real file without '{self.names[concept]}'")
        self.steps = {name: self.h5[self.names[name]] for name in STEP_DATASETS}
        expected = EPISODE_DTYPE if self.version >= 2 else EPISODE_DTYPE_V1
        if set(stored.dtype.names or ()) != set(expected.names):
            raise self._fail("episode table has the wrong columns")
        self.episodes = np.zeros(len(stored), dtype=EPISODE_DTYPE)
        for column in EPISODE_DTYPE.names:
            self.episodes[column] = stored[column if column in expected.names else "start"]
        negative = np.flatnonzero(self.episodes["length"] < 0)
        if len(negative):
            first = self.episodes[negative[0]]
            raise self._fail(
                f"episode {negative[0]} (seed {first['seed']}) has length {first['length']}"
            )
        lengths = self.episodes["length"]
        observations = lengths + int(self.final_observations)
        for column, counts in (("start", observations), ("step_start", lengths)):
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            if len(self.episodes) and not np.array_equal(starts, self.episodes[column]):
                raise self._fail("episode table is not contiguous")
        self.num_frames = int(observations.sum())
        self.num_steps = int(lengths.sum())
        for name, dataset in (("frames", self.frames), *self.steps.items()):
            if dataset.shape[0] < (self.num_frames if name == "frames" else self.num_steps):
                raise self._fail(
                    f"'{self.names[name]}' is shorter than the episode table (truncated file?)"
                )

    def rows(self, name: str, index: Any) -> np.ndarray:
        """``index`` of dataset ``name`` ("frames" or a step dataset, by its version-2 name);
        a damaged chunk raises :class:`UsageError` naming the file and the dataset."""
        name = self.names.get(name, name)
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

    def episode_mask(self, split: Split, holdout_seeds: Iterable[int] | None = None) -> np.ndarray:
        """THE split, per episode: which episodes belong to ``split`` ("all", "train" or
        "holdout"). The held-out episodes are those whose seed is in ``holdout_seeds``; ``None``
        takes the file's own holdout flags. :meth:`split_ranges` is the same split in frames."""
        if self.episodes is None:
            if split != "all":
                raise UsageError(f"{self.path}: a {self.kind} file has no {split} split")
            return np.zeros(0, dtype=bool)
        if split == "all":
            return np.ones(len(self.episodes), dtype=bool)
        if holdout_seeds is None:
            held = self.episodes["holdout"].astype(bool)
        else:
            held = np.isin(self.episodes["seed"].astype(int), list(holdout_seeds))
        return held if split == "holdout" else ~held

    def frame_ranges(self, split: Split = "all") -> list[tuple[int, int]]:
        """Half-open frame index ranges of the split, in file order (whole episodes: in a
        version-2 file each range ends with the episode's final observation)."""
        if self.episodes is None:
            self.episode_mask(split)
            return [(0, self.num_frames)] if self.num_frames else []
        if split != "all":
            return self.split_ranges()[split]  # THE split: one definition
        return self._episode_ranges(self.episodes)

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

        The held-out episodes are those of :meth:`episode_mask` (``holdout_seeds``, or the
        file's own flags); each episode gives all its stored observations, so in a version-2 file
        its final one too (T + 1 frames; T in version 1). A file without episodes (synthetic) is
        all "train".
        """
        if self.episodes is None:
            return {"train": self.frame_ranges("all"), "holdout": []}
        return {
            split: self._episode_ranges(self.episodes[self.episode_mask(split, holdout_seeds)])
            for split in ("train", "holdout")
        }

    def _episode_ranges(self, rows: np.ndarray) -> Ranges:
        """Frame (observation) ranges of episode-table ``rows``, the final observations included."""
        ends = rows["start"] + rows["length"] + int(self.final_observations)
        return [(int(a), int(b)) for a, b in zip(rows["start"], ends, strict=True) if b > a]

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

    def episode(self, index: int) -> Episode:
        """Episode ``index`` of a real file, read whole: its observations (``length + 1`` in a
        version-2 file, ``length`` in a version-1 file: see ``final_observations``) and steps."""
        row = self.episodes[index]
        a = int(row["start"])
        s, t = int(row["step_start"]), int(row["step_start"] + row["length"])
        return Episode(
            seed=int(row["seed"]),
            observations=self.rows("frames", slice(a, a + t - s + int(self.final_observations))),
            **{name: self.rows(name, slice(s, t)) for name in self.steps},
            holdout=bool(row["holdout"]),
        )

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
        trailing = frame_file.trailing_frames
        ends = {frame_file.names["frames"]: frame_file.num_frames}
        if frame_file.kind == "real":
            ends.update({frame_file.names[n]: frame_file.num_steps for n in STEP_DATASETS})
        cut = any(frame_file.h5[name].shape[0] > end for name, end in ends.items())
    if killed or cut:
        _rewrite(path, ends)
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
                schema_version=files[0].version,
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
    for index in range(frame_file.num_episodes):
        yield frame_file.episode(index)


def _write_virtual(path: Path, files: Sequence[FrameFile]) -> None:
    """Replace the (empty) datasets of ``path`` by virtual datasets over ``files``."""
    names = files[0].names
    for concept in ("frames", *STEP_DATASETS):
        counts = [f.num_frames if concept == "frames" else f.num_steps for f in files]
        name = names[concept]
        source0 = files[0].h5[name]
        layout = h5py.VirtualLayout(shape=(sum(counts), *source0.shape[1:]), dtype=source0.dtype)
        at = 0
        for f, n in zip(files, counts, strict=True):
            rel = os.path.relpath(f.path.resolve(), path.resolve().parent)
            layout[at : at + n] = h5py.VirtualSource(rel, name, shape=f.h5[name].shape)[:n]
            at += n
        with h5py.File(path, "a", libver="latest") as h5:
            del h5[name]
            h5.create_virtual_dataset(name, layout)
    table = np.concatenate([f.episodes for f in files])
    final = int(files[0].final_observations)
    for column, counts in (("start", table["length"] + final), ("step_start", table["length"])):
        table[column] = np.concatenate([[0], np.cumsum(counts)[:-1]])
    if files[0].version == 1:
        table = table[list(EPISODE_DTYPE_V1.names)].astype(EPISODE_DTYPE_V1)
    with h5py.File(path, "a", libver="latest") as h5:
        del h5["episodes"]
        h5.create_dataset("episodes", data=table, maxshape=(None,), chunks=(256,))
