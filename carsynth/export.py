"""``carsynth export``: sample a run's generator, validate the samples, write the synthetic file.

The synthetic file has the frame layout of a real file (a ``frames`` dataset, schema version 2,
``kind`` = "synthetic") and carries its provenance in attributes: the SHA-256 of the generator
checkpoint, the run's config, the sampling seed and the latent layout, and the validation
report. Frame ``i`` was generated from ``carsynth.sampling.latents(seed, i, 1, nz)``, so any frame
can be regenerated alone from the file's attributes and the checkpoint (see :func:`regenerate`).

The file is written only when the samples pass ``carsynth validate``'s checks against the run's
own training and held-out frames; ``force`` writes it anyway and records that they failed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from carsynth import files, report_html, rundir, sampling, storage
from carsynth.devices import resolve_device
from carsynth.errors import UsageError
from carsynth.flags import option, required
from carsynth.progress import Progress
from carsynth.rundir import (
    load_generator,
    read_run_config,
    run_episode_ids,
    run_frames,
)
from carsynth.validation import (
    ValidationConfig,
    ValidationResult,
    check_report_dir,
    fit_reference,
    judge_frames,
    write_report,
)

# Frames are appended to the temporary file in blocks of this many (bounds the write buffer).
WRITE_BLOCK = 4096


@dataclass
class ExportConfig:
    """Settings of ``carsynth export``; each field is the flag of the same name."""

    run: str = required("training run directory (carsynth train --out)")
    out: str = required("synthetic frame file to write (.h5)")
    num: int = option(50_000, "frames to generate")
    seed: int = option(0, "sampling seed: frame i's latent depends only on (SEED, i)")
    batch_size: int = option(256, "generator batch while sampling")
    device: str = option("auto", "auto (cuda, then mps, then cpu), cuda, mps or cpu")
    data: str | None = option(None, "the run's data file, if it moved (checked by fingerprint)")
    report: str | None = option(None, "also write the validation report to DIR", metavar="DIR")
    force: bool = option(False, "write the file even when validation fails, recording that")
    overwrite: bool = option(False, "replace an existing output file or report")
    progress: bool = option(True, "progress bars while sampling and validating")
    validation: ValidationConfig = field(default_factory=ValidationConfig)


@dataclass
class ExportResult:
    """What an export did: the file written (``None`` when refused) and the validation result."""

    path: Path | None
    validation: ValidationResult


class ExportRefused(Exception):
    """The samples failed validation and ``force`` was not set: nothing was written."""

    def __init__(self, result: ValidationResult):
        self.result = result
        super().__init__("generated frames failed validation: " + "; ".join(result.failures))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_settings(config: ExportConfig, frame_size: tuple[int, int] = (64, 64)) -> None:
    """UsageError naming the flag for a setting out of range; reads and writes nothing.

    ``carsynth run`` calls it before collecting, when the run directory does not exist yet.
    """
    if config.num < 1:
        raise UsageError(f"--num must be at least 1, got {config.num}")
    if config.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.seed < 0:
        raise UsageError(f"--seed must be 0 or more, got {config.seed}")
    need, have = config.num * frame_size[0] * frame_size[1] * 3, _memory_bytes()
    if need > have:  # the samples are validated in memory before anything is written
        raise UsageError(
            f"--num {config.num}: the frames would take {need / 2**30:.1f} GiB of memory, "
            f"this machine has {have / 2**30:.1f} GiB"
        )
    resolve_device(config.device)


def _check(config: ExportConfig) -> Path:
    check_settings(config)
    if not (Path(config.run) / rundir.CONFIG).is_file():
        raise UsageError(f"--run {config.run}: not a carsynth training run (no config.json)")
    rundir.read_run_config(config.run)  # a UsageError when config.json is not one
    if config.report:
        check_report_dir(config.report, config.overwrite)
    return files.check_writable(config.out, config.overwrite)


def _write(path: Path, frames: np.ndarray, attrs: dict[str, Any], overwrite: bool) -> None:
    """Build the whole file under a temporary name, then rename it over ``path``."""

    def build(tmp: Path) -> None:
        storage.create_frame_file(
            tmp,
            kind="synthetic",
            frame_size=frames.shape[1:3],
            action_dim=None,
            attrs=attrs,
            overwrite=True,
        )
        for start in range(0, len(frames), WRITE_BLOCK):
            storage.append_frames(tmp, frames[start : start + WRITE_BLOCK])
        files.check_writable(path, overwrite)  # nothing appeared at ``path`` meanwhile

    files.atomic_write(path, build)


def export(config: ExportConfig) -> ExportResult:
    """Sample ``config.num`` frames from the run's EMA generator, validate, and write the file.

    Raises :class:`ExportRefused` (nothing written) when validation fails without ``force``.
    """
    out = _check(config)
    device = resolve_device(config.device)
    checkpoint = rundir.generator_checkpoint(config.run)  # the newest that loads
    run_config = read_run_config(config.run)
    generator = load_generator(config.run, device=device, checkpoint=checkpoint)
    real = {
        split: (run_frames(config.run, split, config.data),
                run_episode_ids(config.run, split, config.data))
        for split in ("train", "holdout")
    }  # fmt: skip
    reference = fit_reference(*real["train"], *real["holdout"], config.validation,
                              progress=config.progress)  # fmt: skip
    reference.check_size(config.num)  # a too-small --num is refused before any sampling
    frames = sampling.generate_frames(
        generator,
        config.seed,
        0,
        config.num,
        batch_size=config.batch_size,
        device=device,
        progress=config.progress,
    )
    result = judge_frames(reference, frames, progress=config.progress)
    if config.report:
        write_report(result, config.report, overwrite=config.overwrite)
    if not result.passed and not config.force:
        raise ExportRefused(result)
    attrs = {
        "source_run": str(Path(config.run).resolve()),
        "checkpoint": checkpoint.name,
        "generator_sha256": sha256_file(checkpoint),
        "run_config": json.dumps(run_config),
        "seed": config.seed,
        "nz": int(run_config["config"]["nz"]),
        "latent_block": sampling.LATENT_BLOCK,
        "latents": "frame i: carsynth.sampling.latents(seed, i, 1, nz)",
        "validation_passed": bool(result.passed),
        "forced": bool(config.force and not result.passed),
        "validation": json.dumps(result.to_dict()),
        "export_config": json.dumps(
            {k: v for k, v in asdict(config).items() if k not in ("progress", "overwrite", "data")}
        ),
    }
    with Progress(1, desc="write", unit="files", mode="auto" if config.progress else "off") as bar:
        _write(out, frames, attrs, config.overwrite)
        bar.update()
    if config.report:
        report_html.write_validation_page(config.report, provenance(out, attrs))
    return ExportResult(out, result)


def provenance(path: Path, attrs: dict[str, Any]) -> dict[str, Any]:
    """Where the frames of an exported file came from, for the report page."""
    keys = ("source_run", "checkpoint", "generator_sha256", "seed", "nz", "latents",
            "validation_passed", "forced")  # fmt: skip
    return {"file": str(path.resolve()), **{k: attrs[k] for k in keys},
            "export_config": json.loads(attrs["export_config"])}  # fmt: skip


def regenerate(path: str | os.PathLike, index: int, device: str = "cpu") -> np.ndarray:
    """Regenerate frame ``index`` of a synthetic file from its recorded run, checkpoint and seed.

    Raises :class:`UsageError` when the file was not written by ``carsynth export`` or the
    checkpoint it names has changed since (its SHA-256 differs).
    """
    with storage.open_frame_file(path) as f:
        attrs = dict(f.attrs)
        count = f.num_frames
    if "generator_sha256" not in attrs:
        raise UsageError(f"{path}: not written by carsynth export (no generator_sha256)")
    if not 0 <= index < count:
        raise UsageError(f"{path}: frame {index} out of range (the file has {count})")
    run = attrs["source_run"]
    checkpoint = Path(run) / rundir.CHECKPOINTS / attrs["checkpoint"]
    if not checkpoint.is_file() or sha256_file(checkpoint) != attrs["generator_sha256"]:
        raise UsageError(f"{checkpoint}: missing or changed since {path} was exported")
    device = resolve_device(device)
    generator = load_generator(run, device=device, checkpoint=checkpoint)
    return sampling.generate_frames(generator, int(attrs["seed"]), index, 1, device=device)[0]
