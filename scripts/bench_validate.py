"""Benchmark ``carsynth validate`` against a plain scikit-learn version of the same checks.

Target (issue 4): 10,000 generated against 50,000 real 64x64 frames in at most 2 minutes,
everything included (reading both files, NDB bins, neighbour checks), and at least 3x faster
than the plain version: scikit-learn ``KMeans`` on all pixels plus brute-force
``NearestNeighbors`` for the same four neighbour searches.

The frames are built from the test fixture without a GAN: each real frame is a fixture frame
rolled by a few pixels (a new shift per copy of the fixture), each generated frame a mirrored,
rolled fixture frame, so nothing is an exact duplicate. The plain version is far too slow for
the full size on a small machine, so both versions also run on a smaller slice of the same
frames (``--baseline-real``/``--baseline-fake``) and the speed ratio is reported there.

    python scripts/bench_validate.py [--real 50000 --fake 10000] [--json bench_validate.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from sklearn.neighbors import NearestNeighbors

from carsynth import storage
from carsynth.validation import ValidationConfig, real_splits, validate_files, validate_frames

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "carracing_small.h5"
EPISODE = 200


def make_frames(count: int, mirrored: bool, seed: int) -> np.ndarray:
    """``count`` distinct frames from the fixture: rolled (and mirrored) copies, seeded."""
    with storage.open_frame_file(FIXTURE) as f:
        base = f.read("all")
    if mirrored:
        base = base[:, :, ::-1]
    rng = np.random.default_rng(seed)
    out = np.empty((count, *base.shape[1:]), np.uint8)
    for start in range(0, count, len(base)):
        n = min(len(base), count - start)
        shift = tuple(int(s) for s in rng.integers(-4, 5, size=2))
        out[start : start + n] = np.roll(base[:n], shift, axis=(1, 2))
    return out


def write_files(folder: Path, num_real: int, num_fake: int) -> tuple[Path, Path]:
    """A real file (200-frame episodes, every 10th held out) and a synthetic file."""
    real_path, fake_path = folder / f"real_{num_real}.h5", folder / f"fake_{num_fake}.h5"
    if not real_path.exists():
        real = make_frames(num_real, mirrored=False, seed=0)
        storage.create_frame_file(
            real_path, kind="real", frame_size=(64, 64), action_dim=3, attrs={}
        )
        episodes = [
            storage.Episode(
                seed=i, frames=real[a : a + EPISODE], actions=np.zeros((EPISODE, 3), np.float32),
                rewards=np.zeros(EPISODE, np.float32), terminated=np.zeros(EPISODE, bool),
                truncated=np.zeros(EPISODE, bool), holdout=i % 10 == 3,
            )
            for i, a in enumerate(range(0, num_real, EPISODE))
        ]  # fmt: skip
        storage.append_episodes(real_path, episodes)
    if not fake_path.exists():
        fake = make_frames(num_fake, mirrored=True, seed=1)
        storage.create_frame_file(
            fake_path, kind="synthetic", frame_size=(64, 64), action_dim=None, attrs={}
        )
        storage.append_frames(fake_path, fake)
    return real_path, fake_path


def plain_sklearn(train: np.ndarray, holdout: np.ndarray, fake: np.ndarray, k: int) -> None:
    """The straightforward version: K-means and brute-force neighbours on all pixels."""
    flat = [x.reshape(len(x), -1).astype(np.float32) / 255.0 for x in (train, holdout, fake)]
    train_v, holdout_v, fake_v = flat
    bins = KMeans(n_clusters=k, n_init=1, max_iter=30, random_state=0).fit(train_v)
    bins.predict(fake_v), bins.predict(holdout_v)
    m = min(len(fake_v), len(holdout_v))
    for x in (fake_v[:m], holdout_v[:m]):  # nearest other member of the same set
        NearestNeighbors(n_neighbors=2, algorithm="brute").fit(x).kneighbors(x)
    to_train = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(train_v)
    to_train.kneighbors(fake_v), to_train.kneighbors(holdout_v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=int, default=50_000, help="real frames (full run)")
    parser.add_argument("--fake", type=int, default=10_000, help="generated frames (full run)")
    parser.add_argument("--baseline-real", type=int, default=4_000, help="real frames (ratio)")
    parser.add_argument("--baseline-fake", type=int, default=2_000, help="generated (ratio)")
    parser.add_argument("--k", type=int, default=100, help="NDB bins")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if any)")
    parser.add_argument("--workdir", type=Path, help="keep the generated files here")
    parser.add_argument("--json", type=Path, default=Path("bench_validate.json"))
    args = parser.parse_args()
    config = ValidationConfig(k=args.k, device=args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        real_path, fake_path = write_files(folder, args.real, args.fake)
        start = time.perf_counter()
        result = validate_files(real_path, fake_path, config=config, progress=False)
        full = time.perf_counter() - start
        rows.append(("carsynth validate (files)", args.real, args.fake, full))

        with storage.open_frame_file(real_path) as f:
            train, train_ep, holdout, holdout_ep = real_splits(f)
        with storage.open_frame_file(fake_path) as f:
            fake = f.read("all", limit=args.baseline_fake)
        n_hold = max(2, len(holdout) * args.baseline_real // args.real)
        n_train = args.baseline_real - n_hold
        train, train_ep = train[:n_train], train_ep[:n_train]
        holdout, holdout_ep = holdout[:n_hold], holdout_ep[:n_hold]
        start = time.perf_counter()
        validate_frames(train, train_ep, holdout, holdout_ep, fake, config)
        ours = time.perf_counter() - start
        start = time.perf_counter()
        plain_sklearn(train, holdout, fake, args.k)
        plain = time.perf_counter() - start
        small = len(train) + len(holdout)
        rows += [("carsynth validate_frames", small, len(fake), ours)]
        rows += [("plain scikit-learn", small, len(fake), plain)]

    print(f"{'version':<28}{'real':>8}{'fake':>8}{'seconds':>10}")
    for name, n_real, n_fake, seconds in rows:
        print(f"{name:<28}{n_real:>8}{n_fake:>8}{seconds:>10.1f}")
    print(f"full run stages (s): {result.seconds}")
    print(f"speed-up over plain scikit-learn: {plain / ours:.1f}x (target >= 3x)")
    print(f"full run: {full:.1f} s (target <= 120 s)")
    report = {
        "rows": [dict(zip(("version", "real", "fake", "seconds"), r, strict=True)) for r in rows],
        "full_run_stages": result.seconds,
        "speedup": plain / ours,
        "device": str(config.device or "auto"),
        "k": args.k,
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
