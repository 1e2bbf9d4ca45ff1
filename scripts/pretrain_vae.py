"""Does synthetic data help a world model? Train the World Models VAE three ways and compare.

Three training sets, each trained with several seeds and evaluated on the same held-out real
frames (the real file's holdout split, episodes never seen in training):

(a) ``small``       the first ``--small`` frames of the real file's train split (whole episodes
                    in file order, as a short collection run would give);
(b) ``small+synth`` (a) plus the first ``--synthetic-frames`` frames of the synthetic file;
(c) ``real |b|``    the first |b| real train frames: (a) plus as many further real frames as (b)
                    added synthetic ones, i.e. what collecting more real data would have bought.

(b) better than (a) says the synthetic frames help; (c) says how much the same number of real
frames would have helped instead.
With ``--budget steps`` (the default) every arm gets the same number of gradient steps (arm (a)
runs proportionally more epochs), so a gain of (b) over (a) cannot come from more training alone.

Reports held-out reconstruction MSE per pixel (values in [0, 1], z = mu), mean +- sample std over
seeds: a table on stdout, ``--out`` JSON with every run's curves, and a Markdown table next to it.

CPU-sized default (a few minutes on two cores)::

    python3 scripts/pretrain_vae.py --real real.h5 --synthetic synthetic.h5 --out runs/vae.json

GPU-sized setting (needs 20,000 real train frames, e.g. ``carsynth collect --episodes 32`` at
the default 1000 steps, and 10,000 synthetic frames; not timed here, the development machine has
no GPU)::

    python3 scripts/pretrain_vae.py --real real.h5 --synthetic synthetic.h5 --out runs/vae.json \\
        --small 10000 --synthetic-frames 10000 --epochs 20 --batch-size 100 \\
        --seeds 0 1 2 3 4 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from carsynth import files, storage
from carsynth.devices import resolve_device
from carsynth.errors import UsageError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the VAE lives beside this script
from vae_eval import FRAME_SIZE, VAEConfig, train_vae  # noqa: E402

ARMS = {
    "a": "small real",
    "b": "small real + synthetic",
    "c": "real, same size as (b)",
}


@dataclass
class ExperimentConfig:
    """The experiment's settings; the VAE's own are in :class:`vae_eval.VAEConfig`."""

    real: str
    """Real frame file: its train split supplies (a) and (c), its holdout split the evaluation."""
    synthetic: str
    """Frame file whose frames are added in (b) (normally written by ``carsynth export``)."""
    out: str
    """JSON result path; the Markdown table is written beside it with the suffix ``.md``."""
    small: int = 1000
    """Frames in the small real set (a)."""
    synthetic_frames: int | None = None
    """Synthetic frames added in (b); ``None`` means as many as ``small`` (doubling the set)."""
    eval_frames: int | None = None
    """Cap on held-out frames used for evaluation (``None``: the whole holdout split)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """One VAE per arm and seed; the seed sets initialisation, shuffling and noise."""
    budget: Literal["steps", "epochs"] = "steps"
    """"steps": every arm gets as many gradient steps as (b) gets in ``vae.epochs`` epochs;
    "epochs": every arm gets ``vae.epochs`` epochs (the small set then gets fewer steps)."""
    vae: VAEConfig = field(default_factory=VAEConfig)
    """Model and optimiser settings shared by all runs (its ``seed`` is replaced per run)."""
    overwrite: bool = False
    """Replace an existing ``out`` (and its ``.md``)."""


def read_frames(config: ExperimentConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(real train frames, synthetic frames, held-out real frames), exactly as many as needed."""
    n_synth = config.synthetic_frames if config.synthetic_frames is not None else config.small
    if config.vae.epochs < 1 or config.vae.batch_size < 1:
        raise UsageError(
            f"--epochs and --batch-size must be >= 1, got {config.vae.epochs}, "
            f"{config.vae.batch_size}"
        )
    if config.small < 1 or n_synth < 1:
        raise UsageError(
            f"--small and --synthetic-frames must be >= 1, got {config.small}, {n_synth}"
        )
    with storage.open_frame_file(config.real) as real:
        if real.kind != "real":
            raise UsageError(
                f"{real.path}: --real must be a real frame file, this one is {real.kind}"
            )
        need = config.small + n_synth
        if real.count("train") < need:
            raise UsageError(
                f"{real.path}: arm (c) needs {need} real train frames (--small + "
                f"--synthetic-frames), the file has {real.count('train')}"
            )
        if real.count("holdout") == 0:
            raise UsageError(f"{real.path}: no holdout episodes to evaluate on")
        if real.frame_size != (FRAME_SIZE, FRAME_SIZE):
            raise UsageError(f"{real.path}: frames are {real.frame_size}, the VAE needs 64x64")
        train = real.read("train", limit=need)
        held_out = real.read("holdout", limit=config.eval_frames)
    with storage.open_frame_file(config.synthetic) as synth:
        if synth.count() < n_synth:
            raise UsageError(
                f"{synth.path}: --synthetic-frames {n_synth} but the file has {synth.count()}"
            )
        if synth.frame_size != (FRAME_SIZE, FRAME_SIZE):
            raise UsageError(f"{synth.path}: frames are {synth.frame_size}, the VAE needs 64x64")
        synthetic = synth.read(limit=n_synth)
    return train, synthetic, held_out


def training_sets(
    real_train: np.ndarray, synthetic: np.ndarray, small: int
) -> dict[str, tuple[np.ndarray, int, int]]:
    """Arm -> (training frames, real count, synthetic count).

    (a) is the first ``small`` real frames, (b) adds all of ``synthetic``, (c) the first
    ``small + len(synthetic)`` real frames, so (a) is contained in both others.
    """
    n_b = small + len(synthetic)
    if len(real_train) < n_b:
        raise ValueError(f"need {n_b} real frames for (c), got {len(real_train)}")
    return {
        "a": (real_train[:small], small, 0),
        "b": (np.concatenate([real_train[:small], synthetic]), small, len(synthetic)),
        "c": (real_train[:n_b], n_b, 0),
    }


def epochs_for(size: int, largest: int, epochs: int, budget: str) -> int:
    """Epochs for a set of ``size`` frames: ``epochs`` ("epochs"), or as many frames seen as
    ``epochs`` passes over ``largest`` frames ("steps"), rounded to whole epochs: the steps are
    then exactly equal when ``largest`` is a multiple of ``size`` and of the batch size."""
    if budget == "epochs":
        return epochs
    if budget != "steps":
        raise UsageError(f"--budget must be 'steps' or 'epochs', got {budget!r}")
    return max(1, round(epochs * largest / size))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def run_experiment(config: ExperimentConfig, progress: bool = True) -> dict:
    """Train every (arm, seed), evaluate on the held-out real frames; the JSON-ready result."""
    resolve_device(config.vae.device)  # refuse a missing device before any data is read
    real_train, synthetic, held_out = read_frames(config)
    sets = training_sets(real_train, synthetic, config.small)
    largest = max(len(frames) for frames, _, _ in sets.values())
    arms = {}
    with tqdm(total=len(sets) * len(config.seeds), disable=not progress, desc="vae") as bar:
        for arm, (frames, n_real, n_synth) in sets.items():
            epochs = epochs_for(len(frames), largest, config.vae.epochs, config.budget)
            runs = []
            for seed in config.seeds:
                settings = VAEConfig(**{**asdict(config.vae), "epochs": epochs, "seed": seed})
                runs.append(train_vae(frames, held_out, settings).to_dict())
                bar.set_postfix(arm=arm, mse=f"{runs[-1]['eval_mse']:.5f}")
                bar.update()
            mean, std = mean_std([run["eval_mse"] for run in runs])
            arms[arm] = {
                "label": ARMS[arm],
                "real_frames": n_real,
                "synthetic_frames": n_synth,
                "train_frames": len(frames),
                "epochs": epochs,
                "steps": runs[0]["steps"],
                "eval_mse": [run["eval_mse"] for run in runs],
                "eval_mse_mean": mean,
                "eval_mse_std": std,
                "runs": runs,
            }
    return {
        "real": str(config.real),
        "synthetic": str(config.synthetic),
        "eval_frames": len(held_out),
        "seeds": list(config.seeds),
        "budget": config.budget,
        "vae": asdict(config.vae),
        "arms": arms,
    }


def markdown_table(result: dict) -> str:
    """The result as a Markdown table: one row per arm, MSE as mean +- std over the seeds."""
    base = result["arms"]["a"]["eval_mse_mean"]
    lines = [
        "| arm | training set | real | synthetic | epochs | steps "
        "| held-out MSE/pixel (mean ± std) | vs (a) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for arm, row in result["arms"].items():
        change = 100.0 * (row["eval_mse_mean"] / base - 1.0)
        lines.append(
            f"| ({arm}) | {row['label']} | {row['real_frames']} | {row['synthetic_frames']} "
            f"| {row['epochs']} | {row['steps']} "
            f"| {row['eval_mse_mean']:.5f} ± {row['eval_mse_std']:.5f} | {change:+.1f}% |"
        )
    lines.append(
        f"\n{len(result['seeds'])} seeds, {result['eval_frames']} held-out real frames "
        f"({result['real']}), synthetic frames from {result['synthetic']}."
    )
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    d = VAEConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--real", required=True, help="real frame file (train + holdout splits)")
    p.add_argument("--synthetic", required=True, help="synthetic frame file added in arm (b)")
    p.add_argument("--out", required=True, help="result JSON (the Markdown table goes to .md)")
    p.add_argument("--small", type=int, default=1000, help="frames in the small real set (a)")
    p.add_argument("--synthetic-frames", type=int, help="synthetic frames in (b) (default: SMALL)")
    p.add_argument("--eval-frames", type=int, help="cap on held-out frames (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed")
    p.add_argument("--epochs", type=int, default=3, help="epochs over the largest set")
    p.add_argument(
        "--budget", choices=("steps", "epochs"), default="steps",
        help="steps: equal gradient steps for every arm; epochs: equal epochs",
    )  # fmt: skip
    # 32 rather than World Models' 100: a few thousand frames need the extra updates.
    p.add_argument("--batch-size", type=int, default=32, help="frames per step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--recon", choices=("mse", "bce"), default=d.recon)
    p.add_argument("--kl-tolerance", type=float, default=d.kl_tolerance, help="free nats per dim")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.threads:
        # On a shared CPU one thread per run is often faster than contended ones (tiny batches).
        torch.set_num_threads(args.threads)
    config = ExperimentConfig(
        real=args.real, synthetic=args.synthetic, out=args.out, small=args.small,
        synthetic_frames=args.synthetic_frames, eval_frames=args.eval_frames, seeds=args.seeds,
        budget=args.budget, overwrite=args.overwrite,
        vae=VAEConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, recon=args.recon,
            kl_tolerance=args.kl_tolerance, device=args.device,
        ),
    )  # fmt: skip
    try:
        out = files.check_writable(config.out, config.overwrite)
        table_path = files.check_writable(out.with_suffix(".md"), config.overwrite)
        result = run_experiment(config, progress=not args.no_progress)
    except UsageError as error:
        print(f"pretrain_vae.py: error: {error}", file=sys.stderr)
        return 2
    table = markdown_table(result)
    _write_text(out, json.dumps(result, indent=2) + "\n")
    _write_text(table_path, table)
    print(table, end="")
    print(f"wrote {out} and {table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
