"""``carsynth run``: collect, train --fm, validate and export in one command.

A run directory holds one file or folder per step::

    OUT/real.h5          carsynth collect
    OUT/train/           carsynth train --fm (config.json, metrics, samples, checkpoints)
    OUT/validation/      carsynth validate's report for the exported samples
    OUT/synthetic.h5     carsynth export (only written when the samples pass)

A step whose output is complete is skipped and an interrupted one is resumed, so running the same
command again after a crash (or Ctrl-C) continues where it stopped. The presets are the settings
of each step; ``carsynth run --preset NAME --print-config`` shows them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from carsynth import files, storage
from carsynth.collect.workers import CollectConfig, collect
from carsynth.errors import UsageError
from carsynth.flags import option, required

if TYPE_CHECKING:
    from carsynth.export import ExportConfig
    from carsynth.training.config import TrainConfig


@dataclass(frozen=True)
class Preset:
    """The settings of every step of a pipeline run (the fields of each step's config)."""

    description: str
    collect: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)


# The training recipe of the quick and full presets: the feature-matching DCGAN of Salimans et al.
# 2016 with Adam's step raised from DCGAN's 2e-4 to 5e-4, matching the last discriminator block's
# feature standard deviations as well as their means. scripts/compare_recipes.py measured it on
# the quick data (README, "Recipes: what makes frames pass"): 5e-4 brought the NDB statistic to
# 0.36-0.62x plain --fm's at every checkpoint to 2,000 steps, and the second moments lowered it
# again at 2,000 steps on 3 of 3 seeds (6.3-7.4 against 9.7-11.4), sharpness unchanged.
RECIPE = dict(fm=True, lr=5e-4, fm_moments=2)
CANDIDATE = dict(fm=True, diffaugment="color,translation,cutout", spectral_norm=True)

PRESETS: dict[str, Preset] = {
    # Unit-test size: seconds on a laptop CPU. Checks the plumbing, not the pictures. With 6
    # training episodes the gate can decide (from 300 generated frames); with 3 it could not.
    "test": Preset(
        description="plumbing check: 8 tiny episodes, a tiny GAN, 500 frames (seconds)",
        collect=dict(episodes=8, max_steps=60, workers=1, holdout=0.25),
        train=dict(steps=4, batch_size=16, nz=8, ngf=8, ndf=8, fm=True),
        export=dict(num=500, batch_size=250),
        validation=dict(k=5),
    ),
    # 2-core CPU, at most 15 minutes end to end: 3,000 steps are about 11 minutes of training
    # on the idle box (about 290 images/s with bf16 autocast and channels_last), with about a
    # minute each for the collection and for sampling, validation and export (README, "Recipes").
    "quick": Preset(
        description="CPU-sized: 48 episodes (~14k frames), fm2 lr 5e-4, ngf=ndf=32, 3,000 steps, "
        "10k frames",
        collect=dict(episodes=48, max_steps=350, workers=0),
        train=dict(
            **RECIPE,
            steps=3000,
            batch_size=64,
            ngf=32,
            ndf=32,
            sample_interval=500,
            checkpoint_interval=500,
        ),
        export=dict(num=10_000),
    ),
    # GPU-sized, World Models scale: 10k rollouts of up to 1000 steps, full-size DCGAN.
    "full": Preset(
        description="GPU-sized: 10,000 episodes (~9M frames, World Models scale), full DCGAN, "
        "fm2 lr 5e-4, 16,000 steps of batch 256",
        collect=dict(episodes=10_000, max_steps=1000, workers=0),
        # 16,000 steps x 256 = 4.1M images, measured on an H200 (README, "Recipes", On a GPU):
        # this recipe at these sizes on the quick data brought the NDB statistic into its band
        # at 3.1M images (2.37, band 2.46) and to 2.12 at 4.1M, JS 0.014 (real null 95%: 0.021).
        # Its sharpness statistic stayed at 0.46-0.62 (band about +-0.02) from 1M to 4.1M
        # images, so the preset is predicted to fail on sharpness: one seed, 48 episodes.
        train=dict(**RECIPE, steps=16_000, batch_size=256, ngf=64, ndf=64),
        export=dict(num=500_000, batch_size=1024),
    ),
}


@dataclass
class PipelineConfig:
    """Settings of ``carsynth run``."""

    out: str = required("pipeline directory (re-run to resume)")
    preset: str = option("quick", "settings of all steps", choices=tuple(PRESETS))
    seed: int = option(0, "seeds collection, training and sampling")
    device: str = option("auto", "training and sampling device: auto, cuda, mps or cpu")
    force: bool = option(False, "export even when validation fails (recorded in the file)")
    progress: bool = option(True, "progress bars")


@dataclass
class PipelineResult:
    real: Path
    run: Path
    synthetic: Path | None
    passed: bool
    skipped: list[str]


def _configs(config: PipelineConfig):
    """The config of each step, built from the preset; imports kept here so collect stays light."""
    from carsynth.export import ExportConfig
    from carsynth.training.config import TrainConfig
    from carsynth.validation import ValidationConfig

    if config.preset not in PRESETS:
        raise UsageError(f"--preset {config.preset}: expected one of {', '.join(PRESETS)}")
    preset = PRESETS[config.preset]
    out = Path(config.out)
    collect_config = CollectConfig(
        out=str(out / "real.h5"), seed=config.seed, progress=config.progress, **preset.collect
    )
    train_config = TrainConfig(
        data=str(out / "real.h5"),
        out=str(out / "train"),
        seed=config.seed,
        device=config.device,
        progress=config.progress,
        **preset.train,
    )
    export_config = ExportConfig(
        run=str(out / "train"),
        out=str(out / "synthetic.h5"),
        seed=config.seed,
        device=config.device,
        report=str(out / "validation"),
        force=config.force,
        overwrite=True,  # only the report directory: the synthetic file is skipped when present
        progress=config.progress,
        validation=ValidationConfig(seed=config.seed, **preset.validation),
        **preset.export,
    )
    return collect_config, train_config, export_config


def describe(config: PipelineConfig) -> dict:
    """Every step's settings as a JSON-able dict (``carsynth run --print-config``)."""
    return {
        name: dataclasses.asdict(step)
        for name, step in zip(("collect", "train", "export"), _configs(config), strict=True)
    }


def check_settings(out: Path, collect_config: CollectConfig, train_config: TrainConfig,
                   export_config: ExportConfig) -> None:  # fmt: skip
    """Every step's settings, the device and the output folder, checked before the first step
    starts: a bad ``--device`` is refused at once, not after the collection."""
    from carsynth.collect.workers import check_config as check_collect
    from carsynth.devices import resolve_device
    from carsynth.export import check_settings as check_export
    from carsynth.training.config import check_config as check_train

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    folder = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--out {out}: {folder} is not writable")
    check_collect(collect_config)
    check_train(train_config)
    resolve_device(train_config.device)
    check_export(export_config)


def run(config: PipelineConfig, log: Callable[[str], None] = print) -> PipelineResult:
    """Run the pipeline, skipping each step whose output is complete and resuming the others."""
    from carsynth.export import ExportRefused, export
    from carsynth.rundir import training_finished
    from carsynth.training import train

    collect_config, train_config, export_config = _configs(config)
    out = Path(config.out)
    check_settings(out, collect_config, train_config, export_config)
    out.mkdir(parents=True, exist_ok=True)
    settings = json.dumps(describe(config), indent=2, default=str)
    files.atomic_write(out / "pipeline.json", lambda tmp: tmp.write_text(settings))
    skipped = []

    real = Path(collect_config.out)
    if _collection_finished(real, collect_config.episodes):
        skipped.append("collect")
        log(f"[1/3] collect: {real} is complete, skipped")
    else:
        log(f"[1/3] collect -> {real}")
        collect_config.resume = real.exists()
        collect(collect_config)

    run_dir = Path(train_config.out)
    if training_finished(run_dir):
        skipped.append("train")
        log(f"[2/3] train: {run_dir} is finished, skipped")
    else:
        log(f"[2/3] train --fm -> {run_dir}")
        train_config.resume = run_dir.exists()
        train(train_config)

    synthetic = Path(export_config.out)
    if synthetic.exists():
        skipped.append("export")
        with storage.open_frame_file(synthetic) as f:
            passed = bool(f.attrs.get("validation_passed", False))
        log(f"[3/3] validate + export: {synthetic} exists (validation passed: {passed}), skipped")
        return _finish(out, PipelineResult(real, run_dir, synthetic, passed, skipped), log)
    log(f"[3/3] validate + export -> {synthetic}")
    try:
        result = export(export_config)
    except ExportRefused as refused:
        log(refused.result.summary())
        log(f"validation failed; report in {export_config.report}; nothing exported")
        return _finish(out, PipelineResult(real, run_dir, None, False, skipped), log)
    log(result.validation.summary())
    done = PipelineResult(real, run_dir, result.path, result.validation.passed, skipped)
    return _finish(out, done, log)


def _finish(out: Path, result: PipelineResult, log: Callable[[str], None]) -> PipelineResult:
    """Write ``OUT/report.html``: the run, the validation and the exported file's provenance."""
    from carsynth.export import provenance
    from carsynth.report_html import write_pipeline_page

    origin = None
    if result.synthetic is not None:
        with storage.open_frame_file(result.synthetic) as f:
            origin = provenance(result.synthetic, dict(f.attrs))
    page = write_pipeline_page(out, result.run, out / "validation", origin)
    log(f"report: {page}")
    return result


def _collection_finished(path: Path, episodes: int) -> bool:
    if not path.exists():
        return False
    with storage.open_frame_file(path) as f:
        return f.num_episodes >= episodes and f.trailing_frames == 0
