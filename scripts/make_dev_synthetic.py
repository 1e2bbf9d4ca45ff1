"""A stand-in synthetic frame file for developing scripts/pretrain_vae.py before a GAN exists.

A GAN trained on a small real set can only re-express what that set holds, so the honest
placeholder is built from the same frames: the first ``--source`` real train frames (arm (a) of
pretrain_vae.py when ``--source`` equals its ``--small``), each copy perturbed by a random shift
of up to ``--shift`` pixels (edges repeated), a brightness/contrast change of up to
``--jitter`` and Gaussian pixel noise of standard deviation ``--noise`` (in 0-255 units). The
file is written with ``kind="synthetic"`` and a ``description`` attribute saying what it is.
Results with it say nothing about real GAN output; they only exercise the experiment.

    python3 scripts/make_dev_synthetic.py --real real.h5 --out dev_synthetic.h5
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from carsynth import storage
from carsynth.errors import UsageError


def perturb(
    frames: np.ndarray, rng: np.random.Generator, shift: int, jitter: float, noise: float
) -> np.ndarray:
    """Randomly shifted, brightness/contrast-jittered, noisy copies of uint8 (N, H, W, 3) frames."""
    out = np.empty_like(frames)
    for i, frame in enumerate(frames):
        dy, dx = rng.integers(-shift, shift + 1, size=2)
        padded = np.pad(frame, ((shift, shift), (shift, shift), (0, 0)), mode="edge")
        h, w = frame.shape[:2]
        moved = padded[shift + dy : shift + dy + h, shift + dx : shift + dx + w].astype(np.float32)
        gain, offset = 1.0 + rng.uniform(-jitter, jitter), 255.0 * rng.uniform(-jitter, jitter) / 2
        moved = moved * gain + offset + rng.normal(0.0, noise, size=moved.shape)
        out[i] = np.clip(np.rint(moved), 0, 255).astype(np.uint8)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--real", required=True, help="real frame file (its train split is the source)")
    p.add_argument("--out", required=True, help="synthetic frame file to write")
    p.add_argument("--source", type=int, default=1000, help="first SOURCE train frames are copied")
    p.add_argument("--count", type=int, default=1000, help="frames to write")
    p.add_argument("--shift", type=int, default=4, help="largest shift in pixels")
    p.add_argument("--jitter", type=float, default=0.1, help="largest relative brightness change")
    p.add_argument("--noise", type=float, default=4.0, help="pixel noise std (0-255 units)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)
    try:
        with storage.open_frame_file(args.real) as real:
            source = real.read("train", limit=args.source)
        if len(source) == 0:
            raise UsageError(f"{args.real}: no train frames to copy")
        rng = np.random.default_rng(args.seed)
        frames = perturb(source[rng.integers(0, len(source), size=args.count)], rng,
                         args.shift, args.jitter, args.noise)  # fmt: skip
        settings = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite")}
        stand_in = f"make_dev_synthetic.py: perturbed copies of {args.real}, not GAN output"
        attrs = {**settings, "description": stand_in}
        storage.create_frame_file(
            args.out, kind="synthetic", frame_size=source.shape[1:3], action_dim=None,
            attrs=attrs, overwrite=args.overwrite,
        )  # fmt: skip
    except UsageError as error:
        print(f"make_dev_synthetic.py: error: {error}", file=sys.stderr)
        return 2
    storage.append_frames(args.out, frames)
    print(f"wrote {args.out}: {len(frames)} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
