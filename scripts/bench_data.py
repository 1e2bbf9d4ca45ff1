"""Benchmark carsynth.data's loaders against the same data held in memory, in one run.

Why: a training loop should not wait for frames. A shuffled frame read decompresses a whole HDF5
chunk (8 frames) for one frame, so the loaders read batches in sorted runs (``__getitems__``),
can hand out uint8 (converted on the consumer's device with ``to_float``), and
``ChunkBatchSampler`` shuffles whole chunks instead of single frames. This script measures,
through a ``torch.utils.data.DataLoader`` with 0 and 2 worker processes:

- frames/s of shuffled frame batches (64 frames), uint8 and float32, for a per-frame shuffle
  (``shuffle=True``) and for ``ChunkBatchSampler`` (``mix=8``: each batch mixes frames of 64
  chunks; ``mix=1``: batches of 8 whole chunks);
- batches/s of shuffled window batches (32 windows of 16 steps: (32, 17, 3, 64, 64) uint8);

each beside the same loader over the same data in memory (a ``TensorDataset`` of a contiguous
(N, 3, 64, 64) tensor for frames, a plain Dataset slicing in-memory episodes for windows; 0
and 2 workers), measured in the same run. The target (issue 16): shuffled frame
loading with 2 workers at least 50% of the in-memory rate.

The file is a schema-2 real file of ``--episodes`` episodes of ``--steps`` steps built from the
fixture's frames (so it compresses like real frames), read while the OS page cache is warm: the
numbers are HDF5 + decompression + DataLoader costs, not disk speed. Each rate is the best of
``--repeats`` passes of ``--batches`` batches, timed from the first batch on (worker start-up
excluded), since the machine is shared and timings are noisy.

    python3 scripts/bench_data.py --json bench_data.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from carsynth import storage
from carsynth.data import ChunkBatchSampler, FrameDataset, WindowDataset, load_episodes

ROOT = Path(__file__).resolve().parents[1]


def build_file(path: Path, source: Path, episodes: int, steps: int) -> None:
    """A schema-2 file of ``episodes`` x ``steps`` steps cut from the fixture's frames."""
    frames = storage.open_frame_file(source)
    with frames:
        pool = frames.read()
    storage.create_frame_file(path, kind="real", frame_size=pool.shape[1:3], action_dim=3, attrs={})
    rng = np.random.default_rng(0)
    with storage.FrameWriter.open(path) as writer:
        for e in range(episodes):
            first = int(rng.integers(0, len(pool) - steps - 1))
            writer.append_episode(
                storage.Episode(
                    seed=e,
                    observations=pool[first : first + steps + 1],
                    actions=rng.uniform(-1, 1, (steps, 3)).astype(np.float32),
                    rewards=np.zeros(steps, np.float32),
                    terminations=np.zeros(steps, bool),
                    truncations=np.arange(steps) == steps - 1,
                )
            )


class MemoryWindows(Dataset):
    """The in-memory baseline for windows: the same items as WindowDataset, sliced from RAM."""

    def __init__(self, path: Path, steps: int) -> None:
        self.episodes = list(load_episodes(path, as_torch=True, dtype="uint8"))
        self.index = [
            (e, j)
            for e, episode in enumerate(self.episodes)
            for j in range(len(episode.observations) - steps)
        ]
        self.steps = steps

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        e, j = self.index[i]
        episode, n = self.episodes[e], self.steps
        return {
            "observations": episode.observations[j : j + n + 1],
            "actions": episode.actions[j : j + n],
            "rewards": episode.rewards[j : j + n],
            "terminations": episode.terminations[j : j + n],
            "truncations": episode.truncations[j : j + n],
        }


def rate(make_loader, batches: int, repeats: int) -> float:
    """Batches per second of the best of ``repeats`` passes, timed from the first batch."""
    best = 0.0
    for _ in range(repeats):
        loader = iter(make_loader())
        next(loader)  # workers started, first batch in
        start = time.perf_counter()
        for _ in range(batches):
            next(loader)
        best = max(best, batches / (time.perf_counter() - start))
        del loader
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(ROOT / "data" / "carracing_small.h5"))
    parser.add_argument("--episodes", type=int, default=48, help="episodes in the bench file")
    parser.add_argument("--steps", type=int, default=300, help="steps per episode")
    parser.add_argument("--batches", type=int, default=60, help="batches per timed pass")
    parser.add_argument("--repeats", type=int, default=2, help="passes (the best one counts)")
    parser.add_argument("--json", default="bench_data.json", help="results file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the loaders' work is per process; keep the main one to one core

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.h5"
        build_file(path, Path(args.source), args.episodes, args.steps)
        rows += frame_rows(path, args)
        rows += window_rows(path, args)
    print_table(rows, args)
    result = {
        "file": {"episodes": args.episodes, "steps": args.steps, "frame": [64, 64, 3]},
        "batches": args.batches,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "rows": rows,
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


def frame_rows(path: Path, args: argparse.Namespace) -> list[dict]:
    """Shuffled frame batches of 64: the in-memory loader, then the file per order, each with 0
    and 2 workers."""
    batch = 64
    rows = []
    for dtype in ("uint8", "float32"):
        dataset = FrameDataset(path, dtype=dtype)
        with storage.open_frame_file(path) as f:
            pixels = torch.from_numpy(f.read()).permute(0, 3, 1, 2).contiguous()
        memory = TensorDataset(pixels if dtype == "uint8" else pixels.float().div(255))
        base = {}
        for workers in (0, 2):
            speed = rate(
                lambda w=workers, m=memory: DataLoader(m, batch, shuffle=True, num_workers=w),
                args.batches,
                args.repeats,
            )
            base[workers] = speed
            rows.append(
                row("frames", dtype, "memory", "per-frame shuffle", workers, speed, batch, base)
            )
        for workers in (0, 2):
            for order, mix in (
                ("per-frame shuffle", 0),
                ("chunks, mix=8", 8),
                ("chunks, mix=1", 1),
            ):

                def loader(mix=mix, workers=workers, dataset=dataset):
                    if mix:
                        sampler = ChunkBatchSampler(dataset, batch, num_replicas=1, rank=0, mix=mix)
                        return DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
                    return DataLoader(dataset, batch, shuffle=True, num_workers=workers)

                speed = rate(loader, args.batches, args.repeats)
                rows.append(row("frames", dtype, "file", order, workers, speed, batch, base))
    return rows


def window_rows(path: Path, args: argparse.Namespace) -> list[dict]:
    """Shuffled batches of 32 windows of 16 steps (uint8): in memory, then the file."""
    batch, steps = 32, 16
    sources = {"memory (episodes)": MemoryWindows(path, steps)}
    sources["file"] = WindowDataset(path, steps, dtype="uint8")
    rows, base = [], {}
    for source, windows in sources.items():
        for workers in (0, 2):
            speed = rate(
                lambda w=workers, d=windows: DataLoader(d, batch, shuffle=True, num_workers=w),
                args.batches,
                args.repeats,
            )
            base.setdefault(workers, speed)
            rows.append(row("windows", "uint8", source, "shuffle", workers, speed, 1, base))
    return rows


def row(kind, dtype, source, order, workers, batches_s, per_batch, base: dict) -> dict:
    """One result; ``base`` holds the in-memory batches/s by worker count."""
    return {
        "kind": kind, "dtype": dtype, "source": source, "order": order, "workers": workers,
        "rate": batches_s * per_batch, "unit": "frames/s" if per_batch > 1 else "batches/s",
        "vs_memory": batches_s / base[0], "vs_memory_same_workers": batches_s / base[workers],
    }  # fmt: skip


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"{args.episodes} episodes x {args.steps} steps of 64x64 frames; frame batches of 64, "
        "window batches of 32 x 16 steps; x = ratio to the in-memory loader (with 0 workers, and "
        "with the same number of workers), measured in the same run"
    )
    print()
    print(
        "| data | dtype | source | order | workers | rate | vs memory | vs memory, same workers |"
    )
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['kind']} | {r['dtype']} | {r['source']} | {r['order']} | {r['workers']} | "
            f"{r['rate']:,.0f} {r['unit']} | {r['vs_memory']:.2f}x | "
            f"{r['vs_memory_same_workers']:.2f}x |"
        )


if __name__ == "__main__":
    main()
