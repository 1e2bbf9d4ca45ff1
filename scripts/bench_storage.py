"""Benchmark the layout of the ``frames`` dataset: chunk size x compression.

Why: training reads frames in random order (a shuffled DataLoader asks for one frame at a time),
and a random read decompresses a whole chunk; sequential reads (``load_frames``, ``carsynth
info``) read whole chunks anyway. This script measures, for chunks of {8, 32, 128} frames and
gzip levels {1, 4} (and no compression):

- file size (MiB) and write speed (frames/s, whole 1,000-frame blocks),
- sequential read speed (frames/s, slices of 256 frames from start to end),
- random read speed (frames/s, single frames at uniformly random indices, one HDF5 handle with
  carsynth.data's chunk cache, as a DataLoader worker reads them).

The frames are the fixture's 1,600 real frames repeated to ~20k (each chunk is compressed on its
own, so the repetition does not help compression). Files are read right after being written, so
the OS page cache is warm: the numbers are HDF5 + decompression cost, not disk speed. Every row
is compared with the layout storage.py uses (FRAME_CHUNK, COMPRESSION_OPTS), measured in the same
run. Reads take the best of ``--repeats`` passes, since the machine is shared and timings noisy.

    python3 scripts/bench_storage.py --json bench_storage.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from carsynth import storage
from carsynth.data import CACHE_BYTES

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = [(chunk, level) for chunk in (8, 32, 128) for level in (None, 1, 4)]
BASELINE = (storage.FRAME_CHUNK, storage.COMPRESSION_OPTS)


def write(path: Path, frames: np.ndarray, chunk: int, level: int | None) -> float:
    """Write ``frames`` with this layout in 1,000-frame blocks; returns seconds taken."""
    start = time.perf_counter()
    with h5py.File(path, "w", libver="latest") as h5:
        dataset = h5.create_dataset(
            "frames",
            shape=(0, *frames.shape[1:]),
            maxshape=(None, *frames.shape[1:]),
            dtype=np.uint8,
            chunks=(chunk, *frames.shape[1:]),
            compression=None if level is None else storage.COMPRESSION,
            compression_opts=level,
        )
        for at in range(0, len(frames), 1000):
            block = frames[at : at + 1000]
            dataset.resize(at + len(block), axis=0)
            dataset[at:] = block
    return time.perf_counter() - start


def read_sequential(path: Path) -> float:
    """Seconds to read every frame in slices of 256."""
    start = time.perf_counter()
    with h5py.File(path, "r", rdcc_nbytes=CACHE_BYTES) as h5:
        frames = h5["frames"]
        for at in range(0, len(frames), 256):
            frames[at : at + 256]
    return time.perf_counter() - start


def read_random(path: Path, indices: np.ndarray) -> float:
    """Seconds to read the frames at ``indices`` one by one."""
    start = time.perf_counter()
    with h5py.File(path, "r", rdcc_nbytes=CACHE_BYTES) as h5:
        frames = h5["frames"]
        for index in indices:
            frames[index]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(ROOT / "data" / "carracing_small.h5"))
    parser.add_argument("--frames", type=int, default=20_000, help="frames per test file")
    parser.add_argument("--random-reads", type=int, default=2_000, help="single-frame reads")
    parser.add_argument("--repeats", type=int, default=3, help="read passes (best one counts)")
    parser.add_argument("--json", default="bench_storage.json", help="results file")
    args = parser.parse_args()

    source = storage.open_frame_file(args.source)
    with source:
        base = source.read()
    frames = np.concatenate([base] * -(-args.frames // len(base)))[: args.frames]
    indices = np.random.default_rng(0).integers(0, len(frames), args.random_reads)

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for chunk, level in LAYOUTS:
            path = Path(folder) / f"chunk{chunk}_gzip{level}.h5"
            write_s = write(path, frames, chunk, level)
            sequential_s = min(read_sequential(path) for _ in range(args.repeats))
            random_s = min(read_random(path, indices) for _ in range(args.repeats))
            rows.append(
                {
                    "chunk": chunk,
                    "gzip": level,
                    "size_mib": path.stat().st_size / 2**20,
                    "write_fps": len(frames) / write_s,
                    "sequential_fps": len(frames) / sequential_s,
                    "random_fps": len(indices) / random_s,
                }
            )
            path.unlink()

    base_row = next(r for r in rows if (r["chunk"], r["gzip"]) == BASELINE)
    print(
        f"{len(frames)} frames of {frames.shape[1]}x{frames.shape[2]} "
        f"({frames.nbytes / 2**20:.0f} MiB raw); x = ratio to chunk {BASELINE[0]} / gzip "
        f"{BASELINE[1]} (storage.py's layout), measured in this run"
    )
    print()
    print("| chunk | gzip | size MiB | write frames/s | sequential frames/s | random frames/s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        cells = [
            f"{r[key]:,.0f} ({r[key] / base_row[key]:.2f}x)"
            for key in ("write_fps", "sequential_fps", "random_fps")
        ]
        gzip = "none" if r["gzip"] is None else r["gzip"]
        size = f"{r['size_mib']:.1f} ({r['size_mib'] / base_row['size_mib']:.2f}x)"
        print(f"| {r['chunk']} | {gzip} | {size} | {' | '.join(cells)} |")
    result = {
        "frames": len(frames),
        "frame_shape": list(frames.shape[1:]),
        "random_reads": len(indices),
        "cache_bytes": CACHE_BYTES,
        "baseline": {"chunk": BASELINE[0], "gzip": BASELINE[1]},
        "rows": rows,
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
