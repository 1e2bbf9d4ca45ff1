"""``carsynth info``: what a frame file holds, checked, and a contact sheet of its frames."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from carsynth import files, storage
from carsynth.collect.frames import road_fraction_near_car


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """A summary of a frame file: schema, counts, attributes and a few frame statistics.

    Opening the file checks it against schema v1 (a bad file raises ``UsageError``).
    """
    with storage.open_frame_file(path) as f:
        summary: dict[str, Any] = {
            "file": str(path),
            "schema_version": f.attrs["schema_version"],
            "kind": f.kind,
            "frames": f"{f.num_frames} x {f.frame_size[0]}x{f.frame_size[1]}x3 uint8",
            "chunks": str(f.frames.chunks),
            "compression": f"{f.frames.compression} {f.frames.compression_opts}",
            "size_on_disk": f"{os.path.getsize(path) / 2**20:.1f} MiB",
        }
        if f.episodes is not None:
            lengths, returns = f.episodes["length"], f.episodes["return"]
            summary["episodes"] = f"{f.num_episodes} ({int(f.episodes['holdout'].sum())} holdout)"
            if f.num_episodes:
                summary["episode_length"] = (
                    f"mean {lengths.mean():.0f}, min {lengths.min()}, max {lengths.max()}"
                )
                summary["episode_return"] = (
                    f"mean {returns.mean():.1f}, min {returns.min():.1f}, max {returns.max():.1f}"
                )
                sample = f.frames[_spread(f, 512)]
                on_road = road_fraction_near_car(sample, bool(f.attrs.get("crop_hud"))) > 0.5
                summary["on_road_share"] = f"{on_road.mean():.2f} (of {len(sample)} sampled frames)"
        if f.trailing_frames:
            summary["trailing_frames"] = (
                f"{f.trailing_frames} (an episode cut short by a killed run; --resume removes them)"
            )
        for key, value in sorted(f.attrs.items()):
            if key not in ("schema_version", "kind"):
                summary[f"attr.{key}"] = value
    return summary


def _spread(f: storage.FrameFile, count: int) -> np.ndarray:
    """Up to ``count`` frame indices spread evenly over the file (sorted, for h5py)."""
    n = f.num_frames
    return (
        np.unique(np.linspace(0, n - 1, num=min(count, n)).astype(int)) if n else np.zeros(0, int)
    )


def write_grid(path: str | os.PathLike, out: str | os.PathLike, count: int = 64) -> None:
    """Save a contact sheet of ``count`` frames sampled evenly across the file (PNG)."""
    with storage.open_frame_file(path) as f:
        frames = f.frames[_spread(f, count)]
    files.write_grid(frames, out, columns=int(np.ceil(np.sqrt(len(frames)))) or 1)
