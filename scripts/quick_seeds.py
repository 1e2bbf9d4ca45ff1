"""Does ``carsynth run --preset quick`` export validated frames? Every seed end to end, and a curve.

For each ``--seeds`` value this runs the whole pipeline of a preset (collect, train, validate,
export: :func:`carsynth.pipeline.run`, what ``carsynth run --preset quick --seed S`` runs) in
``OUT/s<seed>/`` and times it end to end. The only change to the preset is that every
``--every``-th training step's checkpoint is kept (checkpoints do not touch the weights), so that
afterwards each kept checkpoint's EMA generator can be judged by the calibrated gate
(:func:`carsynth.validation.validate_frames`, ``--samples`` frames against the run's own real
file): a quality-versus-compute curve from the same runs whose verdicts the table reports.

Outputs in ``--out``: ``results.json`` (every seed's timings, verdict and curve), ``results.md``
(the table printed at the end) and ``curve.png`` (the gate's NDB and sharpness statistics, JS
and NDB/K against training images, one line per seed, the real-data bands dashed).

    python3 scripts/quick_seeds.py --out runs/quick_seeds --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from carsynth import files
from carsynth.errors import UsageError


def pipeline_config(out: Path, preset: str, seed: int, every: int):
    """The pipeline run of one seed: the preset with every ``every``-th checkpoint kept."""
    from carsynth import pipeline

    base = pipeline.PRESETS[preset]
    steps = base.train["steps"]
    if steps % every:
        raise UsageError(f"--every {every} must divide the preset's {steps} steps")
    kept = dict(base.train, checkpoint_interval=every, keep_checkpoints=steps // every + 1)
    pipeline.PRESETS[f"{preset}+curve"] = dataclasses.replace(base, train=kept)
    return pipeline.PipelineConfig(out=str(out), preset=f"{preset}+curve", seed=seed,
                                   progress=False)  # fmt: skip


def run_seed(out: Path, preset: str, seed: int, every: int) -> dict[str, Any]:
    """Run (or finish) one seed's pipeline; its seconds per step, verdict and exported file."""
    from carsynth import pipeline
    from carsynth.validation.curve import gate_numbers

    config = pipeline_config(out, preset, seed, every)
    marks = [("start", time.perf_counter())]

    def log(line: str) -> None:
        print(f"[s{seed}] {line}", flush=True)
        if line.startswith("[") and "/3]" in line:  # a step starts
            marks.append((line.split("]")[0] + "]", time.perf_counter()))

    result = pipeline.run(config, log=log)
    marks.append(("end", time.perf_counter()))
    stages = {a[0]: round(b[1] - a[1], 1) for a, b in zip(marks[1:-1], marks[2:], strict=True)}
    report = json.loads((out / "validation" / "report.json").read_text())
    return {"seed": seed, "seconds": round(marks[-1][1] - marks[0][1], 1), "stages": stages,
            "skipped": result.skipped, "exported": str(result.synthetic or ""),
            **gate_numbers(report)}  # fmt: skip


def markdown(rows: list[dict[str, Any]], preset: str) -> str:
    """One row per seed: seconds end to end (and per step), training speed, the gate's verdict."""
    from carsynth.validation.curve import verdict

    lines = [
        "| preset | seed | seconds end to end (collect / train / validate+export) | img/s "
        "| NDB stat. (band) | sharpness (band) | NDB/K | JS (null 95%) | collapse | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        stages = " / ".join(f"{s:.0f}" for s in r["stages"].values())
        low, high = r["sharpness_band"]
        lines.append(
            f"| {preset} | {r['seed']} | {r['seconds']:.0f} ({stages}) | {r['images_per_s']:.0f} "
            f"| {r['ndb']:.2f} (<= {r['ndb_band'][1]:.2f}) | {r['sharpness']:.3f} "
            f"({low:.3f}..{high:.3f}) | {r['ndb_k']:.2f} | {r['js']:.4f} "
            f"({r['js_null_q95']:.4f}) | {r['collapse']:.3f} | {verdict(r)} |"
        )
    return "\n".join(lines)


def extrapolate(curve: list[dict[str, Any]], key: str, target: float, skip: int = 1) -> dict:
    """A power law ``key`` = c * images^b fitted (least squares in log-log) to the curve's points
    after the first ``skip``, and the training images at which it would reach ``target``
    (``None`` when the fitted law does not fall, or a point is not positive)."""
    points = [(p["images"], p[key]) for p in curve[skip:]]
    if len(points) < 2 or min(v for _, v in points) <= 0:
        return {"exponent": None, "images": None}
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    slope, intercept = np.polyfit(x, y, 1)
    images = float(np.exp((np.log(target) - intercept) / slope)) if slope < 0 else None
    return {"exponent": float(slope), "images": images}


def budget_lines(rows: list[dict[str, Any]]) -> str:
    """Per seed: where the fitted power laws of the NDB and sharpness statistics reach the upper
    end of their real-data bands (the first judged checkpoint left out of the fit)."""
    lines = []
    for r in rows:
        parts = []
        for key, band in (("ndb", "ndb_band"), ("sharpness", "sharpness_band")):
            fit = extrapolate(r["curve"], key, r[band][1])
            r[f"{key}_fit"] = fit
            reach = f"{fit['images']:.2g} images" if fit["images"] else "never (not falling)"
            slope = f"{fit['exponent']:.2f}" if fit["exponent"] is not None else "-"
            parts.append(f"{key} ~ images^{slope}, band reached at {reach}")
        lines.append(f"- seed {r['seed']}: " + "; ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from carsynth.validation.curve import judge_checkpoints, plot_curves

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (one pipeline folder per seed)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="pipeline seeds")
    p.add_argument("--preset", default="quick", help="carsynth.pipeline preset")
    p.add_argument("--every", type=int, default=400, help="steps between judged checkpoints")
    p.add_argument("--samples", type=int, default=10_000, help="frames judged per checkpoint")
    p.add_argument("--report-only", action="store_true", help="redraw from results.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    rows = []
    if args.report_only:
        rows = json.loads((out / "results.json").read_text())["rows"]
    try:
        for seed in [] if args.report_only else args.seeds:
            row = run_seed(out / f"s{seed}", args.preset, seed, args.every)
            run_dir = out / f"s{seed}" / "train"
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
            row["images_per_s"] = float(np.median([m["images_per_s"] for m in metrics]))
            row["curve"] = judge_checkpoints(run_dir, args.samples, seed)
            rows.append(row)
    except UsageError as error:
        print(f"quick_seeds: error: {error}", file=sys.stderr)
        return 2
    table = markdown(rows, args.preset) + "\n\n" + budget_lines(rows)  # adds the fits to rows
    record = {"preset": args.preset, "every": args.every, "samples": args.samples, "rows": rows}
    files.atomic_write(out / "results.json",
                       lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))  # fmt: skip
    files.atomic_write(out / "results.md", lambda tmp: tmp.write_text(table + "\n"))
    plot_curves({f"seed {r['seed']}": r["curve"] for r in rows}, out / "curve.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
