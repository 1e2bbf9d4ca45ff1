"""Calibrate the validation gate: false rejects on new real episodes, decisions on degraded sets.

One training file (``--real``, its holdout episodes held out) fits the gate once; then every set
below is judged against it at each size in ``--sizes``:

- perfect, i.i.d.: frames drawn independently from all episodes of ``--new`` (real episodes the
  training file never saw; no episode table, as a generator's samples), ``--sets`` sets per size;
- perfect, episodic: whole episodes of ``--new`` (a real file: its episode table is used),
  ``--sets`` sets per size, each of the fewest random episodes that reach the size;
- degraded, built from the new real frames: only the most common half / fifth of the K-means
  bins, straight-road frames only (|steering| < 0.05), Gaussian blur (sigma 1.5), brightness
  x0.85, added pixel noise (sigma 10, 25), a 70/30 mix of real and ``--fail`` frames (a failing
  generator's), 10 distinct frames repeated, copies of training frames.

Writes ``<out>/calibration.json`` (every decision, statistic and p-value) and
``<out>/calibration.md`` (the table in the README). Seeded; rerun it to reproduce the table:

    python scripts/calibrate_validate.py --real runs/calib/real.h5 --new runs/calib/new.h5 \\
        --fail runs/calib/fail.h5 --out runs/calib
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from carsynth import storage
from carsynth.files import atomic_write
from carsynth.metrics.ndb import NDBBins
from carsynth.metrics.neighbours import neighbour_space
from carsynth.metrics.null import bin_sample
from carsynth.validation import ValidationConfig
from carsynth.validation.gate import TESTS, RealReference


def read_split(path: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frames, per-frame episode ids and actions of a split of a real file."""
    with storage.open_frame_file(path) as f:
        ranges = f.frame_ranges(split)
        frames = f.read(split)
        actions = np.concatenate([f.h5["actions"][a:b] for a, b in ranges])
    episodes = np.concatenate([np.full(b - a, i) for i, (a, b) in enumerate(ranges)])
    return frames, episodes, actions


def iid(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return pool[np.sort(rng.choice(len(pool), n, replace=len(pool) < n))]


def whole_episodes(
    frames: np.ndarray, episodes: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random whole episodes, the fewest that reach ``n`` frames, with their episode ids."""
    ids = rng.permutation(np.unique(episodes))
    lengths = np.array([np.sum(episodes == i) for i in ids])
    chosen = np.sort(ids[: int(np.searchsorted(np.cumsum(lengths), n)) + 1])
    mask = np.isin(episodes, chosen)
    return frames[mask], episodes[mask]


def degraded_sets(
    new: np.ndarray,
    actions: np.ndarray,
    train: np.ndarray,
    fail: np.ndarray | None,
    reference: RealReference,
) -> dict[str, Callable[[int, np.random.Generator], np.ndarray]]:
    """Name -> function (n, rng) -> n degraded frames."""
    shares = reference.train_counts.sum(0)  # bins are numbered by decreasing training share
    labels = reference.bins.assign(new)
    k = len(shares)
    straight = new[np.abs(actions[:, 0]) < 0.05]

    def noise(sigma: float) -> Callable[[int, np.random.Generator], np.ndarray]:
        def make(n: int, rng: np.random.Generator) -> np.ndarray:
            x = iid(new, n, rng).astype(np.float32) + rng.normal(0, sigma, (n, *new.shape[1:]))
            return np.clip(np.rint(x), 0, 255).astype(np.uint8)

        return make

    def blur(n: int, rng: np.random.Generator) -> np.ndarray:
        x = iid(new, n, rng).astype(np.float32)
        return np.clip(np.rint(gaussian_filter(x, (0, 1.5, 1.5, 0))), 0, 255).astype(np.uint8)

    def repeated(n: int, rng: np.random.Generator) -> np.ndarray:
        return np.resize(iid(new, 10, rng), (n, *new.shape[1:]))

    def mix(n: int, rng: np.random.Generator) -> np.ndarray:
        m = int(round(0.3 * n))
        return rng.permutation(np.concatenate([iid(new, n - m, rng), iid(fail, m, rng)]))

    sets = {
        "most common half of the bins": lambda n, rng: iid(new[labels < k // 2], n, rng),
        "most common fifth of the bins": lambda n, rng: iid(new[labels < k // 5], n, rng),
        f"straight road only ({len(straight)} frames)": lambda n, rng: iid(straight, n, rng),
        "Gaussian blur, sigma 1.5": blur,
        "brightness x0.85": lambda n, rng: (iid(new, n, rng) * 0.85).astype(np.uint8),
        "noise, sigma 10": noise(10),
        "noise, sigma 25": noise(25),
        "10 distinct frames repeated": repeated,
        "copies of training frames": lambda n, rng: iid(train, n, rng),
    }
    if fail is not None:
        sets["70% real + 30% failing generator"] = mix
    return sets


def record(result, seconds: float) -> dict:
    return {
        "passed": result.passed,
        "failed_tests": [name for name, t in result.tests.items() if not t.passed],
        "p_values": {name: t.p_value for name, t in result.tests.items()},
        "statistics": {name: t.statistic for name, t in result.tests.items()},
        "density": result.density_coverage.density,
        "coverage": result.density_coverage.coverage,
        "seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, required=True, help="training real file")
    parser.add_argument("--new", type=Path, required=True, help="real file of new episodes")
    parser.add_argument("--fail", type=Path, help="frames of a failing generator (synthetic)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON and table")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10_000])
    parser.add_argument("--sets", type=int, default=20, help="perfect sets per kind and size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=100)
    args = parser.parse_args()

    start = time.perf_counter()
    train, train_ep, _ = read_split(args.real, "train")
    holdout, holdout_ep, _ = read_split(args.real, "holdout")
    new, new_ep, new_actions = read_split(args.new, "all")
    fail = None
    if args.fail:
        with storage.open_frame_file(args.fail) as f:
            fail = f.read("all")
    bins = NDBBins.fit(train, args.k, args.seed)
    space = neighbour_space(train, seed=args.seed)
    config = ValidationConfig(k=args.k, seed=args.seed)
    reference = RealReference(train, train_ep, holdout, holdout_ep, bins, space, config)
    print(f"fitted in {time.perf_counter() - start:.0f} s; minimum size {reference.min_frames}")
    rng = np.random.default_rng(args.seed)
    rows: list[dict] = []

    def judge(kind: str, name: str, n: int, fake: np.ndarray, episodes=None) -> None:
        t = time.perf_counter()
        result = reference.judge(fake, episodes)
        row = {"kind": kind, "set": name, "size": n, "frames": len(fake)}
        rows.append({**row, **record(result, time.perf_counter() - t)})
        print(json.dumps(rows[-1]), flush=True)

    for n in args.sizes:
        for _ in range(args.sets):
            judge("perfect", "i.i.d. frames of new episodes", n, iid(new, n, rng))
            frames, episodes = whole_episodes(new, new_ep, n, rng)
            judge("perfect", "whole new episodes (episode table used)", n, frames, episodes)
        for name, make in degraded_sets(new, new_actions, train, fail, reference).items():
            judge("degraded", name, n, make(n, rng))
    report = {
        "real": str(args.real), "new": str(args.new), "fail": str(args.fail),
        "train_frames": len(train), "train_episodes": len(np.unique(train_ep)),
        "holdout_episodes": len(np.unique(holdout_ep)), "new_episodes": len(np.unique(new_ep)),
        "min_frames": reference.min_frames, "level": reference.config.level,
        "design_effect": float(bin_sample(reference.train_counts).deff), "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(
        args.out / "calibration.json", lambda p: p.write_text(json.dumps(report, indent=1))
    )
    table = markdown(rows, args.sizes)
    atomic_write(args.out / "calibration.md", lambda p: p.write_text(table))
    print(table)


def markdown(rows: list[dict], sizes: list[int]) -> str:
    """Rejected / judged per set and size, with the tests that rejected."""
    lines = ["| set | " + " | ".join(f"rejected at {n:,}" for n in sizes) + " | failing tests |"]
    lines.append("| --- |" + " --- |" * (len(sizes) + 1))
    names = list(dict.fromkeys(r["set"] for r in rows))
    for name in names:
        cells, failing = [], set()
        for n in sizes:
            mine = [r for r in rows if r["set"] == name and r["size"] == n]
            cells.append(f"{sum(not r['passed'] for r in mine)}/{len(mine)}")
            failing |= {t for r in mine for t in r["failed_tests"]}
        ordered = [t for t in TESTS if t in failing]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {', '.join(ordered) or '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
