"""Mode collapse: train the DCGAN with each mitigation on the same data, budget and seeds; compare.

Every variant is one :class:`carsynth.training.TrainConfig` that differs from the baseline only in
its mitigation flags (network sizes, batch, generator steps, seed and data are shared). After
training, ``--samples`` frames from each run's EMA generator (fixed latents, the same for every
variant) are judged by :func:`carsynth.validation.validate_frames` against the run's own training
and held-out frames (:func:`carsynth.rundir.run_frames`): NDB/K and JS divergence (Richardson &
Weiss 2018), the nearest-neighbour collapse ratio and near-duplicate share, the copying share,
and the pass/fail verdict ``carsynth validate`` would give. Runs also carry the collapse monitor
(:mod:`carsynth.monitor`), whose curves go into the JSON.

Output in ``--out``: ``runs/<variant>_s<seed>/`` (the training runs; an existing run is resumed,
so a repeated command only evaluates), ``results.json`` (every setting, score and monitor row),
``results.md`` (the table printed on stdout) and ``samples.png`` (each variant's first 16
samples, side by side, for the first seed).

CPU preset (this 2-core machine, about 25 minutes per seed with ``nice``)::

    nice -n 5 python3 scripts/compare_mitigations.py --data data/carracing_small.h5 \\
        --out runs/mitigations --preset cpu --seeds 0 1 2

GPU preset (full-size DCGAN-64, tens of thousands of steps; wants a file of 50,000+ frames, e.g.
``carsynth collect --episodes 200``; not run here, this machine has no GPU)::

    python3 scripts/compare_mitigations.py --data real.h5 --out runs/mitigations --preset gpu \\
        --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from carsynth import files
from carsynth.errors import UsageError
from carsynth.pipeline import CANDIDATE, RECIPE
from carsynth.pipeline import PRESETS as PIPELINE

# Each variant's changes to the baseline TrainConfig. Sources: Radford et al. 2015 (bce),
# Salimans et al. 2016 (fm, minibatch discrimination with B=100 kernels of C=5 as in their code,
# one-sided label smoothing at 0.9, historical averaging), Gulrajani et al. 2017 (wgan-gp: no
# batch norm in the critic, lambda 10, 5 critic steps, Adam(1e-4, (0, 0.9))), Metz et al. 2017
# (unrolled: 5 unrolled discriminator steps, one of the step counts of their experiments). The
# historical weight is ours: the penalty sums over every parameter, so 1e-3 keeps it near the
# loss scale.
VARIANTS: dict[str, dict[str, Any]] = {
    "bce": {},
    "fm": {"fm": True},
    "mbd": {"minibatch_kernels": 100},
    "wgan-gp": {"loss": "wgan-gp", "lr": 1e-4, "beta1": 0.0, "beta2": 0.9},
    "fm+mbd": {"fm": True, "minibatch_kernels": 100},
    "bce+smooth": {"real_label": 0.9},
    "fm+hist": {"fm": True, "historical_weight": 1e-3},
    "unrolled": {"unrolled_steps": 5},
    # the pipeline's recipe (carsynth.pipeline.RECIPE) and the candidate measured against it
    # (carsynth.pipeline.CANDIDATE: fm + DiffAugment + spectral norm)
    "recipe": dict(RECIPE),
    "fm+da+sn": dict(CANDIDATE),
}


# The collapse monitor's columns of a metrics row (carsynth.monitor), kept per run in the JSON.
MONITOR_KEYS = ("step", "ndb", "ndb_js", "collapse_ratio", "duplicate_share", "collapsed")


@dataclass
class Preset:
    """The sizes a comparison runs at (shared by every variant)."""

    steps: int  # generator updates per variant
    batch_size: int  # frames per step
    ngf: int  # generator width
    ndf: int  # discriminator width
    nz: int  # latent size
    samples: int  # generated frames validated per variant
    monitor_interval: int  # steps between collapse-monitor measurements
    monitor_samples: int  # frames per monitor measurement
    variants: tuple[str, ...]  # run when --variants is not given


PRESETS = {
    # Small nets and a short budget: all eight variants in about 25 minutes on 2 cores.
    "cpu": Preset(steps=500, batch_size=32, ngf=32, ndf=32, nz=100, samples=1000,
                  monitor_interval=100, monitor_samples=500,
                  variants=tuple(v for v in VARIANTS if v not in ("recipe", "fm+da+sn"))),
    # The full DCGAN-64 of Radford et al. 2015 at the full preset's batch and budget: the
    # pipeline's recipe against the DiffAugment + spectral-norm candidate (README, "Recipes").
    "gpu": Preset(steps=PIPELINE["full"].train["steps"], batch_size=256, ngf=64, ndf=64, nz=100,
                  samples=10_000, monitor_interval=2000, monitor_samples=2000,
                  variants=("recipe", "fm+da+sn")),
}  # fmt: skip


@dataclass
class CompareConfig:
    """Every setting of a comparison; all are recorded in ``results.json``."""

    data: str  # real frame file (with holdout episodes) every variant trains on
    out: str  # output folder (runs/, results.json, results.md, samples.png)
    preset: Preset = field(default_factory=lambda: PRESETS["cpu"])
    variants: list[str] = field(default_factory=lambda: list(PRESETS["cpu"].variants))
    seeds: list[int] = field(default_factory=lambda: [0])  # one run per variant and seed
    sample_seed: int = 1234  # latents of the validated samples (the same for every run)
    device: str = "auto"  # training and validation device
    overwrite: bool = False  # retrain runs that exist instead of resuming them
    progress: bool = True  # progress bars


def train_config(c: CompareConfig, variant: str, seed: int):
    """The TrainConfig of one run: the preset's sizes, the variant's flags, the seed."""
    from carsynth.training import TrainConfig

    p = c.preset
    interval = p.monitor_interval
    base = TrainConfig(
        data=c.data, out=str(Path(c.out) / "runs" / f"{variant}_s{seed}"), nz=p.nz, ngf=p.ngf,
        ndf=p.ndf, batch_size=p.batch_size, steps=p.steps, seed=seed, device=c.device,
        log_interval=interval, sample_interval=p.steps, checkpoint_interval=p.steps,
        monitor_interval=interval, monitor_samples=p.monitor_samples, progress=c.progress,
    )  # fmt: skip
    return replace(base, **VARIANTS[variant])


def check(c: CompareConfig) -> None:
    """UsageError for unknown variants, a missing data file or an out path that is a file."""
    unknown = [v for v in c.variants if v not in VARIANTS]
    if unknown:
        raise UsageError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if not c.variants or not c.seeds:
        raise UsageError("--variants and --seeds need at least one value each")
    if not Path(c.data).is_file():
        raise UsageError(f"{c.data}: no such file")
    if Path(c.out).exists() and not Path(c.out).is_dir():
        raise UsageError(f"{c.out}: exists and is not a folder")


def run_one(c: CompareConfig, variant: str, seed: int) -> tuple[dict[str, Any], np.ndarray]:
    """Train (or resume) one run, validate its samples; its result row and the samples."""
    from carsynth.devices import resolve_device
    from carsynth.rundir import load_generator, run_episode_ids, run_frames
    from carsynth.sampling import generate_frames
    from carsynth.training import train

    config = train_config(c, variant, seed)
    resume = (Path(config.out) / "config.json").is_file() and not c.overwrite
    run = train(replace(config, resume=resume, overwrite=c.overwrite))
    device = str(resolve_device(c.device, allow_mps=False))  # the validation metrics need float64
    fake = generate_frames(load_generator(run, device), c.sample_seed, 0, c.preset.samples,
                           device=device)  # fmt: skip
    real = [(run_frames(run, split), run_episode_ids(run, split)) for split in ("train", "holdout")]
    scores = judge(real, fake, seed, device)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    row = {
        "variant": variant,
        "seed": seed,
        "run": str(run),
        "changes": VARIANTS[variant],
        **scores,
        # generator-step images/s, median over the run's log intervals (the box is shared)
        "images_per_s": float(np.median([r["images_per_s"] for r in rows])),
        "monitor": [{k: r[k] for k in MONITOR_KEYS} for r in rows if "ndb" in r],
    }  # fmt: skip
    return row, fake


def judge(real: list, fake: np.ndarray, seed: int, device: str) -> dict[str, Any]:
    """The comparison's scores (NDB/K and JS of Richardson & Weiss, the monitor's collapse ratio
    and near-duplicate share, the share of generated frames nearer to training than 1% of
    held-out frames) and the calibrated gate's verdict: ``passed`` is None, with the reason in
    ``failures``, when the gate refuses to decide (too few samples for its power)."""
    from carsynth.errors import UsageError
    from carsynth.metrics import NDBBins, collapse_check, neighbour_space
    from carsynth.metrics.features import nearest
    from carsynth.validation import ValidationConfig, validate_frames

    (train, train_ep), (holdout, holdout_ep) = real
    bins = NDBBins.fit(train, 100, seed, device=device)
    ndb, baseline = bins.compare(fake), bins.compare(holdout)
    space = neighbour_space(train, seed=seed, device=device)
    collapse = collapse_check(fake, holdout, space, seed=seed)
    train_v = space.transform(train)
    d_fake, d_real = (nearest(space.transform(x), train_v)[0] for x in (fake, holdout))
    scores = {
        "ndb": ndb.score, "ndb_real_baseline": baseline.score, "js": ndb.js_divergence,
        "collapse_ratio": collapse.ratio, "duplicate_share": collapse.duplicate_share,
        "copy_share": float(np.mean(d_fake < np.quantile(d_real, 0.01))),
    }  # fmt: skip
    try:
        result = validate_frames(train, train_ep, holdout, holdout_ep, fake,
                                 ValidationConfig(seed=seed, device=device))  # fmt: skip
        return {**scores, "passed": result.passed, "failures": result.failures}
    except UsageError as refused:
        return {**scores, "passed": None, "failures": [str(refused)]}


def _verdict(passed: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: "refused"}[passed]


def markdown(rows: list[dict[str, Any]]) -> str:
    """The comparison table, one row per run, in Markdown; with several seeds, a second table
    gives each variant's mean and range over its seeds."""
    lines = [
        "| variant | seed | NDB/K | JS | collapse ratio | duplicate share | copying share "
        "| verdict | images/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['ndb']:.2f} | {r['js']:.3f} "
            f"| {r['collapse_ratio']:.2f} | {r['duplicate_share']:.1%} | {r['copy_share']:.1%} "
            f"| {_verdict(r['passed'])} | {r['images_per_s']:.0f} |"
        )
    # The bins are fitted per seed, so the real-vs-real NDB/K (the limit's base) is per seed too.
    baselines = {r["seed"]: r["ndb_real_baseline"] for r in rows}
    lines.append("")
    lines.append(
        "Held-out real frames against the same bins: NDB/K "
        + ", ".join(f"{b:.2f} (seed {seed})" for seed, b in baselines.items())
        + "."
    )
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    if len(rows) > len(variants):
        lines += [
            "",
            "| variant | seeds | NDB/K mean (min-max) | JS mean (min-max) | collapse ratio mean "
            "| passed |",
            "|---|---|---|---|---|---|",
        ]
        for variant in variants:
            mine = [r for r in rows if r["variant"] == variant]
            ndb, js = ([r[key] for r in mine] for key in ("ndb", "js"))
            collapse = np.mean([r["collapse_ratio"] for r in mine])
            passed = sum(r["passed"] is True for r in mine)
            lines.append(
                f"| {variant} | {len(mine)} | {_spread(ndb, 2)} | {_spread(js, 3)} "
                f"| {collapse:.2f} | {passed}/{len(mine)} |"
            )
    return "\n".join(lines)


def _spread(values: list[float], digits: int) -> str:
    """'mean (min-max)' with ``digits`` decimals."""
    low, mean, high = min(values), float(np.mean(values)), max(values)
    return f"{mean:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def plot_samples(
    samples: dict[str, np.ndarray], path: Path, per_side: int = 4, columns: int = 4
) -> None:
    """One figure: each variant's first ``per_side``^2 samples as a titled grid, ``columns``
    variants per row, at about one screen pixel per frame pixel."""
    import torch
    from matplotlib.figure import Figure
    from torchvision.utils import make_grid

    rows = -(-len(samples) // columns)
    cols = min(columns, len(samples))
    fig = Figure(figsize=(2.9 * cols, 3.1 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, (name, frames) in zip(axes, samples.items(), strict=False):
        images = torch.from_numpy(frames[: per_side**2]).permute(0, 3, 1, 2)
        grid = make_grid(images, nrow=per_side, padding=1, pad_value=255)
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_title(name, fontsize="medium")
    for ax in axes:
        ax.axis("off")
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    # A 256-colour palette keeps the figure small enough to commit (a third of the RGB size).
    image = Image.open(buffer).convert("RGB").quantize(256)
    files.atomic_write(path, lambda tmp: image.save(tmp, format="png", optimize=True))


def compare(c: CompareConfig) -> list[dict[str, Any]]:
    """Train and validate every (variant, seed); write results.json, results.md, samples.png."""
    check(c)
    out = Path(c.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    rows, grids = [], {}
    for variant in c.variants:
        for seed in c.seeds:
            row, fake = run_one(c, variant, seed)
            rows.append(row)
            if seed == c.seeds[0]:
                grids[f"{variant} ({'pass' if row['passed'] else 'FAIL'})"] = fake
    table = markdown(rows)
    record = {"config": asdict(c), "results": rows}
    for name, text in (("results.json", json.dumps(record, indent=2) + "\n"),
                       ("results.md", table + "\n")):  # fmt: skip
        files.atomic_write(out / name, lambda tmp, text=text: tmp.write_text(text))
    plot_samples(grids, out / "samples.png")
    print(table)
    return rows


def parse_args(argv: list[str] | None = None) -> CompareConfig:
    """Flags -> CompareConfig; a preset's sizes can be overridden one by one."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="real frame file with holdout episodes")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--preset", choices=PRESETS, default="cpu", help="sizes (see the docstring)")
    p.add_argument("--variants", nargs="+", help="default: the preset's; " + ", ".join(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds")
    for name in ("steps", "batch_size", "ngf", "ndf", "nz", "samples"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"the preset's {name}")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--overwrite", action="store_true", help="retrain existing runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    sizes = {k: v for k, v in vars(args).items()
             if k in asdict(PRESETS["cpu"]) and k != "variants" and v is not None}  # fmt: skip
    preset = replace(PRESETS[args.preset], **sizes)
    if preset.steps % preset.monitor_interval:  # the monitor needs whole log intervals
        preset.monitor_interval = preset.steps
    return CompareConfig(
        data=args.data, out=args.out, preset=preset,
        variants=args.variants or list(preset.variants), seeds=args.seeds, device=args.device,
        overwrite=args.overwrite, progress=not args.no_progress,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    try:
        compare(parse_args(argv))
    except UsageError as error:
        print(f"compare_mitigations: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
