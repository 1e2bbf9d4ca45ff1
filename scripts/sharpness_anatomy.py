"""Where the generated frames' extra sharpness comes from: neighbour differences and spectrum.

The gate's sharpness test (:mod:`carsynth.metrics.sharpness`) compares the median per-frame mean
absolute neighbour-pixel difference of generated and real frames. This script takes that number
apart for real frames and for the EMA generator of each run given:

- ``zero``: the share of neighbour differences that are exactly 0 (flat colour);
- ``small``: the part of the mean absolute difference carried by differences of 1-8 grey levels
  (low-amplitude texture), ``large`` the part carried by differences above 8 (edges);
- the mean power spectrum of the frames (above the HUD bar, per channel, frame mean removed) in
  bands of radial frequency, as a ratio to the real frames' (1 = the same energy there), and at
  the diagonal Nyquist frequency (0.5, 0.5) where transposed convolutions put their checkerboard
  (Odena et al. 2016, "Deconvolution and Checkerboard Artifacts").

Mean absolute differences weigh many small steps more than a few large ones of the same energy,
so two sets of frames can have the same spectrum and different sharpness: the table shows which.
Rows ``real + noise s`` are the real frames with Gaussian noise of s grey levels added (rounded,
clipped): how much invisible noise moves the statistic.

    python scripts/sharpness_anatomy.py --data runs/quick/real.h5 --runs runs/quick/train \\
        --json runs/anatomy.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from carsynth.errors import UsageError
from carsynth.metrics.sharpness import sharpness

BANDS = ((0.0, 0.12), (0.12, 0.42), (0.42, 0.6), (0.6, 0.8))  # cycles per pixel
PLAYFIELD = 48  # rows above the HUD bar of a 64x64 frame


def differences(frames: np.ndarray) -> np.ndarray:
    """Absolute differences of horizontally and vertically adjacent pixels, flattened (int16)."""
    x = frames.astype(np.int16)
    return np.concatenate([np.abs(np.diff(x, axis=1)).ravel(), np.abs(np.diff(x, axis=2)).ravel()])


def spectrum(frames: np.ndarray) -> np.ndarray:
    """Mean power spectrum (PLAYFIELD, W) of the frames' playfield, channels averaged."""
    x = frames[:, :PLAYFIELD].astype(np.float64)
    x -= x.mean(axis=(1, 2), keepdims=True)
    return (np.abs(np.fft.fft2(x, axes=(1, 2))) ** 2).mean(axis=(0, 3))


def anatomy(frames: np.ndarray, real_power: np.ndarray, real_median: float) -> dict[str, float]:
    """The table's row for ``frames`` against the real frames' spectrum and median sharpness."""
    d = differences(frames)
    power = spectrum(frames)
    fy = np.fft.fftfreq(power.shape[0])[:, None]
    fx = np.fft.fftfreq(power.shape[1])[None, :]
    radius = np.hypot(fy, fx)
    row = {
        "median_sharpness": float(np.median(sharpness(frames))),
        "zero": float(np.mean(d == 0)),
        "small": float(d[(d >= 1) & (d <= 8)].sum() / d.size),
        "large": float(d[d > 8].sum() / d.size),
    }
    row["log_ratio"] = float(np.log(row["median_sharpness"] / real_median))
    for low, high in BANDS:
        band = (radius >= low) & (radius < high)
        row[f"power {low:g}-{high:g}"] = _ratio(power[band].mean(), real_power[band].mean())
    corner = (power.shape[0] // 2, power.shape[1] // 2)
    row["power (0.5, 0.5)"] = _ratio(power[corner], real_power[corner])
    return row


def noisy(frames: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """``frames`` plus N(0, sigma^2) grey levels per value, rounded and clipped to uint8."""
    noise = np.random.default_rng(seed).normal(0.0, sigma, frames.shape)
    return np.clip(np.rint(frames + noise), 0, 255).astype(np.uint8)


def _ratio(a: float, b: float) -> float:
    """a / b, NaN where the real frames have no power at all."""
    return float(a / b) if b > 0 else float("nan")


def generated(run: str, count: int, seed: int) -> np.ndarray:
    """``count`` frames of the EMA generator of ``run``'s newest checkpoint."""
    from carsynth.rundir import load_generator
    from carsynth.sampling import generate_frames

    return generate_frames(load_generator(run), seed, 0, count)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="real frame file")
    p.add_argument("--runs", nargs="*", default=[], help="training run directories")
    p.add_argument("--frames", type=int, default=1000, help="frames per source")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--noise",
        nargs="*",
        type=float,
        default=[0.25, 0.5, 1.0, 2.0],
        help="grey levels of Gaussian noise added to the real frames, one row each",
    )
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    from carsynth.storage import open_frame_file

    try:
        real = open_frame_file(args.data).read("all")
        real = real[np.linspace(0, len(real) - 1, min(args.frames, len(real))).astype(int)]
        sources = {"real": real}
        sources |= {f"real + noise {s:g}": noisy(real, s, args.seed) for s in args.noise}
        sources |= {run: generated(run, args.frames, args.seed) for run in args.runs}
    except UsageError as error:
        print(f"sharpness_anatomy: error: {error}", file=sys.stderr)
        return 2
    real_power, real_median = spectrum(real), float(np.median(sharpness(real)))
    rows = {name: anatomy(frames, real_power, real_median) for name, frames in sources.items()}
    keys = list(rows["real"])
    print("| source | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, row in rows.items():
        label = "/".join(Path(name).parts[-2:]) if name in args.runs else name
        print(f"| {label} | " + " | ".join(f"{row[k]:.3g}" for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
