"""Quality against training compute: the calibrated gate on every kept checkpoint of a run.

The recipe experiments (``scripts/compare_recipes.py``, ``scripts/quick_seeds.py``) judge each
checkpoint's EMA generator exactly as ``carsynth export`` would judge it (the same frames for the
same seed, the run's own training and held-out episodes), so a curve's last point is the export's
verdict and the earlier points say how fast a recipe got there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from carsynth import files
from carsynth.validation.checks import ValidationConfig, fit_reference, judge_frames

CURVE_PANELS = (  # (key, title, log scale): what :func:`plot_curves` draws
    ("ndb", "NDB test: mean z^2 (band dashed)", True),
    ("sharpness", "sharpness: log median ratio (band shaded)", False),
    ("js", "JS divergence (null 95% dashed)", True),
    ("ndb_k", "NDB/K", False),
)


def gate_numbers(report: dict[str, Any]) -> dict[str, Any]:
    """The verdict, the failed tests' names, each test's statistic and band, JS and NDB/K, of a
    validation ``report`` (``ValidationResult.to_dict()``, or a report.json read back)."""
    tests = report["tests"]
    return {
        "passed": report["passed"],
        "failed": [line.split(":")[0] for line in report["failures"]],
        "ndb": tests["ndb"]["statistic"], "ndb_band": tests["ndb"]["band"],
        "sharpness": tests["sharpness"]["statistic"], "sharpness_band": tests["sharpness"]["band"],
        "collapse": tests["collapse"]["statistic"], "copying": tests["copying"]["statistic"],
        "js": tests["ndb"]["js"]["generated"], "js_null_q95": tests["ndb"]["js"]["null"]["q0.95"],
        "ndb_k": tests["ndb"]["ndb_k"]["generated"],
    }  # fmt: skip


def verdict(numbers: dict[str, Any]) -> str:
    """A table cell for :func:`gate_numbers`: "pass", or "FAIL (the failed tests)"."""
    return "pass" if numbers["passed"] else f"FAIL ({', '.join(numbers['failed'])})"


def judge_checkpoints(
    run_dir: str | os.PathLike,
    samples: int = 10_000,
    seed: int = 0,
    config: ValidationConfig | None = None,
) -> list[dict[str, Any]]:
    """For every kept checkpoint of ``run_dir``, oldest first: its step, training images and
    :func:`gate_numbers` for ``samples`` frames of its EMA generator (latents of ``seed``)."""
    from carsynth import rundir
    from carsynth.sampling import generate_frames

    batch = rundir.read_run_config(run_dir)["config"]["batch_size"]
    real = [part for split in ("train", "holdout")
            for part in (rundir.run_frames(run_dir, split),
                         rundir.run_episode_ids(run_dir, split))]  # fmt: skip
    reference = fit_reference(*real, config or ValidationConfig(seed=seed))  # once per run
    curve = []
    for checkpoint in rundir.checkpoints(run_dir):
        step = int(checkpoint.stem.split("_")[-1])
        generator = rundir.load_generator(run_dir, "cpu", checkpoint)
        fake = generate_frames(generator, seed, 0, samples)
        result = judge_frames(reference, fake)
        curve.append({"step": step, "images": step * batch, **gate_numbers(result.to_dict())})
    return curve


def plot_curves(curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """One line per labelled curve in each of :data:`CURVE_PANELS`, against training images;
    the real-data bands of the first curve's last point drawn dashed or shaded."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.4), layout="constrained")
    axes = fig.subplots(1, len(CURVE_PANELS))
    for label, curve in curves.items():
        images = [p["images"] / 1000 for p in curve]
        for ax, (key, _, _) in zip(axes, CURVE_PANELS, strict=True):
            ax.plot(images, [p[key] for p in curve], marker="o", ms=3, label=label)
    last = next(iter(curves.values()))[-1]
    axes[0].axhline(last["ndb_band"][1], color="k", linestyle="--")
    axes[1].axhspan(*last["sharpness_band"], color="k", alpha=0.25)
    axes[2].axhline(last["js_null_q95"], color="k", linestyle="--")
    for ax, (_, title, log) in zip(axes, CURVE_PANELS, strict=True):
        ax.set_title(title, fontsize="small")
        ax.set_xlabel("training images (thousands)")
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize="x-small")
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
