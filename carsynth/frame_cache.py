"""The frame cache: a frame file's frames decompressed once into a memory-mapped ``.npy`` file.

Why. The frame files store frames in gzip-compressed HDF5 chunks of 8 (``storage.FRAME_CHUNK``),
and one core decompresses about 20,000 frames/s (``scripts/bench_storage.py``). A shuffled read
of one frame decompresses its whole chunk, so a training loop reading straight from the file is
held to a few thousand frames/s per core (``scripts/bench_data.py``). The datasets of
:mod:`carsynth.data` therefore read from a cache, the way nanoGPT reads ``train.bin`` and Hugging
Face datasets read their Arrow files: the file's frames decompressed ONCE, sequentially, into an
uncompressed uint8 array in a ``.npy`` file, which every process (each DataLoader worker its
own) opens with ``np.load(mmap_mode="r")``. A read is then a memory copy from the OS page cache,
which all processes share; nothing is held in a process's own memory. The array is stored
channels-first, (N, 3, H, W), the layout of the datasets' torch items: reordering (N, H, W, 3)
frames for every batch would cost three times the read itself (measured: 450 us per 64 frames
against 100 us for the read).

Cost. Disk: H * W * 3 bytes per frame, 12,288 bytes for 64x64 (about 8x the compressed file:
the shipped 1,600-frame fixture is 2.5 MB, its cache 19.7 MB; 1 GB per 81,000 frames). Time: one
sequential pass over the file the first time it is used (numbers in README.md, "Loader speed").

Where. :func:`cache_folder`: ``cache=True`` is ``$CARSYNTH_CACHE``, else
``$XDG_CACHE_HOME/carsynth``, else ``~/.cache/carsynth``; a path is that folder; ``False`` or
``None`` is no cache (the datasets read the HDF5 file). The folder may be deleted at any time.
The datasets default to ``cache=True``: measured, shuffled reads from the compressed file are 10x
(whole chunks) to 44x (a per-frame shuffle) slower than from the cache, which costs one pass and
the disk space above.

Identity. A cache is named after what it copies: the file's fingerprint
(:func:`carsynth.rundir.fingerprint`: its size and the SHA-256 of its first and last 4 MiB, the
identity runs already record for their data; for a merged virtual file also its shards'). An
appended or rewritten file changes size or tail, so it gets a new cache and never a stale frame
(the old cache stays until the folder is cleaned); a copied or touched file keeps its cache.
Path, size and mtime would rebuild on every copy and could miss a rewrite of the same size
within the file system's mtime resolution. A cache that holds fewer frames than its file (a
writer appended between the fingerprint and the read) is rebuilt.

Safety. A cache is written under a temporary name and renamed into place when complete
(:func:`carsynth.files.atomic_write`, after an fsync), so no reader ever sees a part of one.
Builders of one cache take an exclusive lock (``fcntl.flock`` on a lock file beside it): two
processes (DDP ranks, two jobs) build it once, the second waits and reuses it, and the temporary
file of a killed build is removed by the next build. Any failure to write (read-only folder,
too little space: checked before building) raises ``OSError``; the datasets then warn once and
read the HDF5 file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from carsynth.files import atomic_write
from carsynth.progress import Progress
from carsynth.rundir import fingerprint
from carsynth.storage import FrameFile

CACHE_ENV = "CARSYNTH_CACHE"
# Frames decompressed per read while building: whole chunks, 12 MiB of 64x64 frames at a time.
BLOCK_FRAMES = 1024
CacheSetting = bool | str | os.PathLike | None


def cache_folder(cache: CacheSetting) -> Path | None:
    """The folder ``cache`` names (see the module docstring); ``None`` for no cache."""
    if cache is None or cache is False:
        return None
    if cache is True:
        if os.environ.get(CACHE_ENV):
            return Path(os.environ[CACHE_ENV])
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "carsynth"
    return Path(cache)


def _sources(frame_file: FrameFile) -> list[Path]:
    """The shard files a merged virtual file's frames live in (none for a plain file)."""
    if not frame_file.frames.is_virtual:
        return []
    names = {source.file_name for source in frame_file.frames.virtual_sources()}
    return [frame_file.path.parent / name for name in sorted(names)]


def cache_path(frame_file: FrameFile, folder: Path) -> Path:
    """Where the cache of ``frame_file`` lives in ``folder``: its name holds the file's identity."""
    identity = {
        "file": fingerprint(frame_file.path),
        "sources": [fingerprint(source) for source in _sources(frame_file)],
        "frame_size": list(frame_file.frame_size),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return folder / f"frames-{digest[:32]}.npy"  # no file name: a copy shares the cache


def _complete(path: Path, frame_file: FrameFile) -> bool:
    """Whether ``path`` is a cache holding every frame of ``frame_file``."""
    try:
        frames = np.load(path, mmap_mode="r")
    except (OSError, ValueError):  # missing, or not a whole .npy file
        return False
    size = (3, *frame_file.frame_size)
    return (
        frames.dtype == np.uint8
        and frames.shape[1:] == size
        and (frames.shape[0] >= frame_file.num_frames)
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the exclusive lock of cache ``path`` (a file beside it, left there)."""
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(frame_file: FrameFile, path: Path) -> None:
    """Write the cache of ``frame_file`` at ``path``: its frames in file order, whole or none."""
    shape = (frame_file.num_frames, 3, *frame_file.frame_size)
    size = int(np.prod(shape))
    free = shutil.disk_usage(path.parent).free
    if free < size + 2**20:
        raise OSError(f"the cache needs {size / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB are free")
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed build
        stale.unlink(missing_ok=True)

    def write(tmp: Path) -> None:
        header = {"descr": "|u1", "fortran_order": False, "shape": shape}
        with (
            open(tmp, "wb") as out,
            Progress(shape[0], desc=f"cache {frame_file.path.name}", unit="frames") as bar,
        ):
            np.lib.format.write_array_header_1_0(out, header)
            for start in range(0, shape[0], BLOCK_FRAMES):
                block = frame_file.rows("frames", slice(start, min(start + BLOCK_FRAMES, shape[0])))
                out.write(np.ascontiguousarray(block.transpose(0, 3, 1, 2)).data)
                bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())  # on disk before the rename makes it visible

    atomic_write(path, write)


def cached_frames(frame_file: FrameFile, cache: CacheSetting) -> Path | None:
    """The cache of ``frame_file``'s frames in the folder ``cache`` names, built first if missing
    or incomplete; ``None`` when ``cache`` is off. Raises ``OSError`` when it cannot be written."""
    folder = cache_folder(cache)
    if folder is None:
        return None
    path = cache_path(frame_file, folder)
    if not _complete(path, frame_file):
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            if not _complete(path, frame_file):  # another process may have built it meanwhile
                _build(frame_file, path)
    return path
