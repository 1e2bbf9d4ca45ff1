"""Benchmark carsynth.data's loaders against the same data held in memory, in one run.

Why: a training loop should not wait for frames. The frame files store frames in gzip chunks of
8, and a shuffled read from the file decompresses a whole chunk for one frame; the datasets
therefore read from the frame cache (``carsynth.frame_cache``: the frames decompressed once into
a memory-mapped, channels-first ``.npy`` file). This script measures, through a
``torch.utils.data.DataLoader`` with 0 and 2 worker processes, uint8 and float32 items:

- frames/s of shuffled frame batches (64 frames): from the cache (the default), and from the
  compressed file (``cache=False``) with a per-frame shuffle (``shuffle=True``) and with
  ``ChunkBatchSampler`` (``mix=8``: each batch mixes frames of 64 chunks; ``mix=1``: batches of
  8 whole chunks);
- batches/s of shuffled window batches (32 windows of 16 steps: (32, 17, 3, 64, 64));
- with 2 workers, two cheap changes to how batches cross the worker boundary: "one tensor per
  batch", ``DataLoader(dataset, sampler=BatchSampler(...), batch_size=None)``, so a worker reads
  a batch as one tensor instead of a list of items that the DataLoader stacks; and "file_system
  sharing", workers that hand their batches over as named shared-memory files
  (``torch.multiprocessing.set_sharing_strategy("file_system")`` in ``worker_init_fn``) instead
  of passing a file descriptor per batch through a socket (torch's default); and, as the
  ceiling, "dataset[batch], no DataLoader": a loop reading ``dataset[indices]`` itself;

each beside the same loader over the same data in memory (a ``TensorDataset`` of a contiguous
(N, 3, 64, 64) tensor for frames, a plain Dataset slicing in-memory episodes for windows; 0 and
2 workers), in the same run. The target (issue 16): shuffled frame loading with 2 workers at
least 50% of the in-memory rate.

The file is a schema-2 real file of ``--episodes`` episodes of ``--steps`` steps built from the
fixture's frames (so it compresses like real frames), read while the OS page cache is warm: the
numbers are decompression + DataLoader costs, not disk speed. The cache is built before the
timing (its build time is reported separately). The machine is shared and timings are noisy, so
every configuration is timed once per round, in a new random order each round, ``--repeats``
rounds (each pass: up to ``--seconds`` or one epoch, from the first batch on, worker start-up
excluded), and the table gives each configuration's median.

    python3 scripts/bench_data.py --json bench_data.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, TensorDataset

from carsynth import storage
from carsynth.data import ChunkBatchSampler, FrameDataset, WindowDataset, load_episodes

ROOT = Path(__file__).resolve().parents[1]
FRAME_BATCH, WINDOW_BATCH, WINDOW_STEPS = 64, 32, 16


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


class MemoryBatches(Dataset):
    """The in-memory baseline for ``dataset[indices]``: a NumPy gather of whole rows (torch's
    advanced indexing of a uint8 tensor measured 5x slower here, not a fair baseline)."""

    def __init__(self, pixels: torch.Tensor) -> None:
        self.array = pixels.numpy()

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, indices: list[int]) -> torch.Tensor:
        return torch.from_numpy(self.array[indices])


class MemoryWindows(Dataset):
    """The in-memory baseline for windows: the same items as WindowDataset, sliced from RAM."""

    def __init__(self, path: Path, steps: int, dtype: str) -> None:
        self.episodes = list(load_episodes(path, as_torch=True, dtype=dtype))
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


def one_pass(make_loader: Callable[[], DataLoader], seconds: float) -> float:
    """Batches per second of one pass: up to ``seconds`` or the epoch, from the first batch."""
    loader = iter(make_loader())
    next(loader)  # workers started, first batch in
    start, count = time.perf_counter(), 0
    for _ in loader:
        count += 1
        if time.perf_counter() - start >= seconds:
            break
    return count / (time.perf_counter() - start)


def file_system_sharing(worker: int) -> None:
    """A worker_init_fn: this worker hands tensors over as named shared-memory files."""
    torch.multiprocessing.set_sharing_strategy("file_system")


def without_loader(dataset: Dataset, batch: int) -> Iterator:
    """Shuffled batches read as ``dataset[indices]`` in this process, without a DataLoader."""
    order = torch.randperm(len(dataset)).tolist()
    for at in range(0, len(order), batch):
        yield dataset[order[at : at + batch]]


def loader_factory(dataset: Dataset, batch: int, workers: int, how: str) -> Callable:
    """A loader maker: ``how`` is "per-frame shuffle" / "shuffle", "one tensor per batch",
    "file_system sharing", "dataset[batch], no DataLoader" or "chunks, mix=M"
    (ChunkBatchSampler)."""
    if how == "dataset[batch], no DataLoader":
        if isinstance(dataset, TensorDataset):
            dataset = MemoryBatches(dataset.tensors[0])
        return lambda: without_loader(dataset, batch)
    if how == "file_system sharing":
        return lambda: DataLoader(
            dataset, batch, shuffle=True, num_workers=workers, worker_init_fn=file_system_sharing
        )
    if how.startswith("chunks"):
        mix = int(how.split("=")[1])
        sampler = ChunkBatchSampler(dataset, batch, num_replicas=1, rank=0, mix=mix)
        return lambda: DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
    if how == "one tensor per batch":
        sampler = BatchSampler(RandomSampler(dataset), batch, drop_last=False)
        return lambda: DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=workers)
    return lambda: DataLoader(dataset, batch, shuffle=True, num_workers=workers)


def frame_configs(path: Path, cache: Path) -> list[tuple[dict, Callable]]:
    """Shuffled frame batches: memory, the cache, the compressed file; 0 and 2 workers."""
    configs = []
    with storage.open_frame_file(path) as f:
        pixels = torch.from_numpy(f.read()).permute(0, 3, 1, 2).contiguous()
    for dtype in ("uint8", "float32"):
        sources = {
            "memory": TensorDataset(pixels if dtype == "uint8" else pixels.float().div(255)),
            "cache": FrameDataset(path, dtype=dtype, cache=cache),
            "file": FrameDataset(path, dtype=dtype, cache=False),
        }
        for source, dataset in sources.items():
            for workers in (0, 2):
                hows = ["per-frame shuffle"]
                if source == "file":
                    hows += ["chunks, mix=8", "chunks, mix=1"]
                elif workers:  # other ways to hand batches over
                    hows += ["one tensor per batch", "file_system sharing"]
                else:
                    hows += ["dataset[batch], no DataLoader"]
                for how in hows:
                    fields = {"kind": "frames", "dtype": dtype, "source": source}
                    fields |= {"order": how, "workers": workers, "per_batch": FRAME_BATCH}
                    configs.append((fields, loader_factory(dataset, FRAME_BATCH, workers, how)))
    return configs


def window_configs(path: Path, cache: Path) -> list[tuple[dict, Callable]]:
    """Shuffled window batches: memory (episodes), the cache, the compressed file."""
    configs = []
    for dtype in ("uint8", "float32"):
        sources = {
            "memory": MemoryWindows(path, WINDOW_STEPS, dtype),
            "cache": WindowDataset(path, WINDOW_STEPS, dtype=dtype, cache=cache),
            "file": WindowDataset(path, WINDOW_STEPS, dtype=dtype, cache=False),
        }
        for source, windows in sources.items():
            for workers in (0, 2):
                fields = {"kind": "windows", "dtype": dtype, "source": source, "order": "shuffle"}
                fields |= {"workers": workers, "per_batch": 1}
                configs.append((fields, loader_factory(windows, WINDOW_BATCH, workers, "shuffle")))
    return configs


def measure(configs: list[tuple[dict, Callable]], args: argparse.Namespace) -> list[dict]:
    """Every configuration once per round, in random order, ``args.repeats`` rounds; rows with
    the median rate and its ratios to the in-memory loader of the same data and dtype (0 and
    the same workers)."""
    passes: list[list[float]] = [[] for _ in configs]
    rng = np.random.default_rng(0)
    for round_ in range(args.repeats):
        for i in rng.permutation(len(configs)):  # a new order each round: no fixed neighbours
            passes[i].append(one_pass(configs[i][1], args.seconds))
        print(f"round {round_ + 1}/{args.repeats} done", flush=True)
    rows = []
    for speeds, (fields, _) in zip(passes, configs, strict=True):
        per_batch = fields["per_batch"]
        rows.append({
            **{k: v for k, v in fields.items() if k != "per_batch"},
            "rate": statistics.median(speeds) * per_batch,
            "unit": "frames/s" if per_batch > 1 else "batches/s",
            "passes": [s * per_batch for s in speeds],
        })  # fmt: skip
    for r in rows:
        base = {
            b["workers"]: b["rate"]
            for b in rows
            if (b["kind"], b["dtype"], b["source"]) == (r["kind"], r["dtype"], "memory")
            and b["order"] in ("per-frame shuffle", "shuffle")
        }
        r["vs_memory"] = r["rate"] / base[0]
        r["vs_memory_same_workers"] = r["rate"] / base[r["workers"]]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(ROOT / "data" / "carracing_small.h5"))
    parser.add_argument("--episodes", type=int, default=48, help="episodes in the bench file")
    parser.add_argument("--steps", type=int, default=300, help="steps per episode")
    parser.add_argument("--seconds", type=float, default=1.0, help="longest timed pass")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (the median counts)")
    parser.add_argument("--json", default="bench_data.json", help="results file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the loaders' work is per process; keep the main one to one core

    with tempfile.TemporaryDirectory() as folder:
        path, cache = Path(folder) / "bench.h5", Path(folder) / "cache"
        build_file(path, Path(args.source), args.episodes, args.steps)
        start = time.perf_counter()
        FrameDataset(path, cache=cache)
        build = {"seconds": time.perf_counter() - start, "file_bytes": path.stat().st_size}
        build["cache_bytes"] = sum(p.stat().st_size for p in cache.glob("*.npy"))
        rows = measure(frame_configs(path, cache) + window_configs(path, cache), args)
    frames = args.episodes * (args.steps + 1)
    print_table(rows, args, build, frames)
    result = {
        "file": {"episodes": args.episodes, "steps": args.steps, "frame": [64, 64, 3]},
        "cache_build": build,
        "seconds": args.seconds,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


def print_table(rows: list[dict], args: argparse.Namespace, build: dict, frames: int) -> None:
    print(
        f"\n{args.episodes} episodes x {args.steps} steps ({frames:,} observations of 64x64); "
        f"cache built in {build['seconds']:.2f} s ({frames / build['seconds']:,.0f} frames/s; "
        f"file {build['file_bytes'] / 2**20:.1f} MiB, cache {build['cache_bytes'] / 2**20:.1f} "
        f"MiB); frame batches of {FRAME_BATCH}, window batches of {WINDOW_BATCH} x "
        f"{WINDOW_STEPS} steps; medians of {args.repeats} rounds; x = ratio to the in-memory "
        "loader (with 0 workers, and with the same number of workers), same run"
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
