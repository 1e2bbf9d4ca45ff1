"""Which training recipe makes frames that pass? Candidates on the same data, seeds and budget.

Every recipe is feature matching at the ``quick`` preset's network sizes and batch
(:data:`carsynth.pipeline.PRESETS`) plus its own changes (:data:`RECIPES`); data, seeds, steps
and batch are shared. Each run keeps a checkpoint every ``--eval-every`` steps, and the EMA
generator of each checkpoint is judged by the calibrated gate of ``carsynth validate``
(:func:`carsynth.validation.curve.judge_checkpoints`: ``--samples`` frames against the data's
training and held-out episodes, as ``carsynth export`` judges them), so one run gives both a row
of the table (its last checkpoint) and a quality-versus-compute curve.

Outputs in ``--out``: ``runs/<recipe>_s<seed>/`` (training runs; an existing run is resumed),
``results.json`` (settings, every checkpoint's numbers), ``results.md`` (the table) and
``curve.png`` (the gate's statistics against training images, per recipe and seed).

    python scripts/compare_recipes.py --data runs/quick/real.h5 --out runs/recipes \\
        --recipes fm fm+adv --seeds 0 --steps 2000 --eval-every 500
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from carsynth import files
from carsynth.errors import UsageError

DA = "color,translation,cutout"  # DiffAugment's full policy (Zhao et al. 2020)
# Each recipe's changes to plain feature matching at the preset's sizes.
RECIPES: dict[str, dict[str, Any]] = {
    "fm": {},
    "fm+lr5e-4": {"lr": 5e-4},
    "fm+lr1e-3": {"lr": 1e-3},
    "fm+adv": {"adv_weight": 1.0},
    "fm+lowpass+lr5e-4": {"lowpass": "all", "lr": 5e-4},
    "fm+lowpass-last+lr5e-4": {"lowpass": "last", "lr": 5e-4},
    "fm@1+lr5e-4": {"fm_layer": "1", "lr": 5e-4},  # the first D block's features: local texture
    "fm@2+lr5e-4": {"fm_layer": "2", "lr": 5e-4},
    "fm2+lr5e-4": {"fm_moments": 2, "lr": 5e-4},  # the spread too: carsynth.pipeline.RECIPE
    # the speckle: settle the weights (linear decay to 0 over the last half or all of the run),
    # a slower generator, fp32, steadier batch statistics, a shorter Adam memory
    "fm2+lr5e-4+decay": {"fm_moments": 2, "lr": 5e-4, "lr_decay": 0.5},
    "fm2+lr5e-4+decay1": {"fm_moments": 2, "lr": 5e-4, "lr_decay": 1.0},
    "fm2+lr-g2e-4+lr-d5e-4": {"fm_moments": 2, "lr_g": 2e-4, "lr_d": 5e-4},
    "fm2+lr5e-4+fp32": {"fm_moments": 2, "lr": 5e-4, "amp": "off"},
    "fm2+lr5e-4+b128": {"fm_moments": 2, "lr": 5e-4, "batch_size": 128},
    "fm2+lr5e-4+beta2-0.99": {"fm_moments": 2, "lr": 5e-4, "beta2": 0.99},
    # feature matching on the first block too: local texture statistics beside the last block's
    "fm2@1,4+lr5e-4": {"fm_moments": 2, "lr": 5e-4, "fm_layer": "1,4"},
    "fm@1,4+lr5e-4": {"lr": 5e-4, "fm_layer": "1,4"},
    "fm2@2,4+lr5e-4": {"fm_moments": 2, "lr": 5e-4, "fm_layer": "2,4"},
    "fm2@1,2,3,4+lr5e-4": {"fm_moments": 2, "lr": 5e-4, "fm_layer": "1,2,3,4"},
    "fm2+adv0.1+lr5e-4": {"fm_moments": 2, "lr": 5e-4, "adv_weight": 0.1},
    # a longer weight average: averaging the EMA of a run's last checkpoints lowered its
    # sharpness excess. A half-life alone changes nothing below ~9,000 steps (the warm-up caps
    # it); the ramp-up caps the half-life at a quarter of the images seen instead
    "fm2+lr5e-4+ema100k": {"fm_moments": 2, "lr": 5e-4, "ema_half_life": 100_000.0},
    "fm2+lr5e-4+ema-ramp0.25": {"fm_moments": 2, "lr": 5e-4, "ema_half_life": 1e9,
                                "ema_rampup": 0.25},
    "fm2+lr1e-3+decay": {"fm_moments": 2, "lr": 1e-3, "lr_decay": 0.5},
    "fm2+lowpass-last+decay": {"fm_moments": 2, "lr": 5e-4, "lowpass": "last", "lr_decay": 0.5},
    "fm+da": {"diffaugment": DA},
    "fm+sn": {"spectral_norm": True},
    "fm+da+sn": {"diffaugment": DA, "spectral_norm": True},
    "fm2+da": {"diffaugment": DA, "fm_moments": 2},
    "fm2+da+sn": {"diffaugment": DA, "fm_moments": 2, "spectral_norm": True},
    "fm+da+ttur": {"diffaugment": DA, "lr_g": 1e-4, "lr_d": 4e-4},
    "fm2+da+sn+ttur": {"diffaugment": DA, "fm_moments": 2, "spectral_norm": True, "lr_g": 1e-4,
                       "lr_d": 4e-4},
}  # fmt: skip
SIZES = ("nz", "ngf", "ndf", "batch_size")  # what a recipe takes from the preset


@dataclass
class CompareConfig:
    """Every setting of a comparison; all are recorded in ``results.json``."""

    data: str  # real frame file (with holdout episodes) every recipe trains on
    out: str
    recipes: list[str] = field(default_factory=lambda: list(RECIPES))
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 2000  # generator updates per run
    eval_every: int = 500  # steps between judged checkpoints
    samples: int = 10_000  # generated frames the gate judges per checkpoint (as export's default)
    preset: str = "quick"  # the carsynth.pipeline preset whose sizes and batch are used
    judge_only: bool = False  # judge the checkpoints the runs have, train nothing
    device: str = "auto"  # training device (carsynth.devices.resolve_device)
    progress: bool = False


def train_config(c: CompareConfig, recipe: str, seed: int):
    """The TrainConfig of one run: the preset's sizes, --fm, the recipe's changes, the budget."""
    from carsynth.pipeline import PRESETS
    from carsynth.training import TrainConfig

    sizes = {k: v for k, v in PRESETS[c.preset].train.items() if k in SIZES}
    settings = {**sizes, "fm": True, **RECIPES[recipe]}
    settings.update(steps=c.steps, checkpoint_interval=c.eval_every, sample_interval=c.eval_every,
                    keep_checkpoints=c.steps // c.eval_every + 1, log_interval=50)  # fmt: skip
    out = Path(c.out) / "runs" / f"{recipe}_s{seed}"
    return TrainConfig(data=c.data, out=str(out), seed=seed, device=c.device, progress=c.progress,
                       **settings)  # fmt: skip


def run_one(c: CompareConfig, recipe: str, seed: int) -> dict[str, Any]:
    """Train (or resume) one run, judge every checkpoint's EMA generator; its record."""
    from carsynth.training import train
    from carsynth.validation.curve import judge_checkpoints

    config = train_config(c, recipe, seed)
    resume = (Path(config.out) / "config.json").is_file()
    if c.judge_only and not resume:
        raise UsageError(f"--judge-only: {config.out} has no run")
    run = Path(config.out) if c.judge_only else train(replace(config, resume=resume))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = judge_checkpoints(run, c.samples, seed)
    images_per_s = float(np.median([m["images_per_s"] for m in metrics]))
    # training seconds from the metrics rows (each row: its steps' images over its rate), so a
    # resumed run counts only the time its steps took
    steps = np.diff([0] + [m["step"] for m in metrics])
    seconds = float(sum(n * config.batch_size / m["images_per_s"]
                        for n, m in zip(steps, metrics, strict=True)))  # fmt: skip
    return {"recipe": recipe, "seed": seed, "changes": RECIPES[recipe], "run": str(run),
            "train_seconds": seconds, "images_per_s": images_per_s,
            **curve[-1], "curve": curve}  # fmt: skip


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table: one row per run (its last checkpoint), then the real-data bands."""
    from carsynth.validation.curve import verdict

    lines = [
        "| recipe | seed | steps | seconds | img/s | NDB stat. | sharpness | NDB/K | JS "
        "| collapse | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['seed']} | {r['step']} | {r['train_seconds']:.0f} "
            f"| {r['images_per_s']:.0f} | {r['ndb']:.1f} | {r['sharpness']:.3f} "
            f"| {r['ndb_k']:.2f} | {r['js']:.4f} | {r['collapse']:.3f} | {verdict(r)} |"
        )
    if rows:
        r = rows[0]
        low, high = r["sharpness_band"]
        bands = (f"NDB statistic <= {r['ndb_band'][1]:.2f}, sharpness {low:.3f}..{high:.3f}, "
                 f"JS null 95th pct {r['js_null_q95']:.4f}")  # fmt: skip
        lines += ["", f"Real-data bands (first row's data): {bands}."]
    return "\n".join(lines)


def compare(c: CompareConfig) -> list[dict[str, Any]]:
    """Train and judge every (recipe, seed); write results.json, results.md, curve.png."""
    from carsynth.validation.curve import plot_curves

    unknown = [r for r in c.recipes if r not in RECIPES]
    if unknown:
        raise UsageError(f"--recipes: unknown {unknown}; choose from {', '.join(RECIPES)}")
    if c.steps % c.eval_every:
        raise UsageError(f"--steps {c.steps} must be a multiple of --eval-every {c.eval_every}")
    if not Path(c.data).is_file():
        raise UsageError(f"{c.data}: no such file")
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in c.seeds:
        for recipe in c.recipes:
            rows.append(run_one(c, recipe, seed))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
    table = markdown(rows)
    record = {"config": asdict(c), "recipes": {r: RECIPES[r] for r in c.recipes},
              "results": rows}  # fmt: skip
    for name, text in (("results.json", json.dumps(record, indent=2) + "\n"),
                       ("results.md", table + "\n")):  # fmt: skip
        files.atomic_write(out / name, lambda tmp, text=text: tmp.write_text(text))
    plot_curves({f"{r['recipe']} s{r['seed']}": r["curve"] for r in rows}, out / "curve.png")
    print(table)
    return rows


def parse_args(argv: list[str] | None = None) -> CompareConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = CompareConfig(data="", out="")
    p.add_argument("--data", required=True, help="real frame file (with holdout episodes)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--recipes", nargs="+", default=d.recipes, help=", ".join(RECIPES))
    p.add_argument("--seeds", nargs="+", type=int, default=d.seeds, help="training seeds")
    p.add_argument("--steps", type=int, default=d.steps, help="generator updates per run")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between judgings")
    p.add_argument("--samples", type=int, default=d.samples, help="frames judged per checkpoint")
    p.add_argument("--preset", default=d.preset, help="carsynth.pipeline preset of the base")
    p.add_argument("--judge-only", action="store_true", help="judge existing checkpoints only")
    p.add_argument("--device", default=d.device, help="training device: auto, cuda, mps or cpu")
    p.add_argument("--progress", action="store_true", help="training progress bars")
    return CompareConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    try:
        compare(parse_args(argv))
    except UsageError as error:
        print(f"compare_recipes: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
