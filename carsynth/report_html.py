"""``report.html``: one self-contained page per run directory and per validation report.

Everything is in the one file (figures inlined as base64 PNG, no scripts, no external styles), so
it can be mailed, attached to a ticket or opened from a cluster's scratch disk. The pages show:

- a training run (:func:`write_run_page`): its settings and data, the latest metrics, the curves
  (``loss.png``) and the fixed-noise sample grids over time;
- a validation report (:func:`write_validation_page`): the verdict and its failures, every
  figure of the folder, and whatever ``report.json`` holds (statistics, null quantiles,
  p-values, ...) rendered generically as nested tables; with the provenance of the exported
  file when ``export`` wrote one;
- a pipeline directory (:func:`write_pipeline_page`): the run's and the validation's sections.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any

from carsynth import files, rundir

PAGE = "report.html"
MAX_LIST = 12  # longer lists of numbers are shown by their first values and their length
MAX_GRIDS = 6  # sample grids shown over time (evenly spaced, the first and the last among them)
STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.4em 0;font-size:.85em}
td,th{border:1px solid #ddd;padding:.2em .5em;vertical-align:top;text-align:left}
th{background:#f4f4f4}.pass{color:#176f2c;font-weight:bold}.fail{color:#b00020;font-weight:bold}
figure{display:inline-block;margin:.5em}figcaption{font-size:.8em;color:#555}
img{max-width:100%;image-rendering:pixelated}.grids img{width:256px}
"""


def _text(value: Any) -> str:
    if isinstance(value, float):
        return html.escape(f"{value:.4g}")
    return html.escape(str(value))


def json_html(value: Any, key: str = "") -> str:
    """Any JSON value as HTML: objects as two-column tables (nested), long number lists cut; a
    verdict (a bool under a key with "pass" in it) in green or red."""
    if isinstance(value, dict):
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{json_html(v, str(k))}</td></tr>"
                       for k, v in value.items())  # fmt: skip
        return f"<table>{rows}</table>" if rows else "{}"
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            return "".join(json_html(v) for v in value[:MAX_LIST])
        shown = ", ".join(_text(v) for v in value[:MAX_LIST])
        more = f", ... ({len(value)} values)" if len(value) > MAX_LIST else ""
        return f"[{shown}{more}]"
    if isinstance(value, bool) and "pass" in key:
        return f'<span class="{"pass" if value else "fail"}">{value}</span>'
    return _text(value)


def figure(path: Path, caption: str | None = None) -> str:
    """A PNG inlined as a data URI, with its caption (the file name by default)."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = html.escape(caption or path.name)
    return (f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>")  # fmt: skip


def page(title: str, sections: list[tuple[str, str]]) -> str:
    """The whole document: a title and (heading, HTML) sections."""
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{content}\n" for h, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
            f"<body><h1>{html.escape(title)}</h1>\n{body}</body></html>\n")  # fmt: skip


def _write(path: Path, text: str) -> Path:
    return files.atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------------------------- training run
def run_sections(run_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """The sections of a training run: settings, latest metrics, curves, samples over time."""
    from carsynth.training.tracking import read_rows

    run_dir = Path(run_dir)
    record = rundir.read_run_config(run_dir)
    rows, _ = read_rows(rundir.metrics_path(run_dir))
    found = rundir.checkpoints(run_dir)
    status = (f"{rows[-1]['step'] if rows else 0} of {record['steps']} steps logged; "
              f"checkpoints: {', '.join(p.name for p in found) or 'none'}")  # fmt: skip
    sections = [("Training run", f"<p>{html.escape(str(run_dir.resolve()))}: {status}</p>")]
    plot = run_dir / rundir.LOSS_PLOT
    if plot.exists():
        sections.append(("Curves", figure(plot, "losses, D outputs, diversity, monitor")))
    grids = sorted((run_dir / rundir.SAMPLES).glob("step_*.png"))
    if grids:
        shown = min(MAX_GRIDS, len(grids))  # evenly spaced, the first and the last among them
        pick = sorted({round(i * (len(grids) - 1) / max(1, shown - 1)) for i in range(shown)})
        shown = "".join(figure(grids[i], f"step {int(grids[i].stem[5:])}") for i in pick)
        sections.append(("Samples over time (EMA generator, fixed noise)",
                         f'<div class="grids">{shown}</div>'))  # fmt: skip
    if rows:
        sections.append(("Latest metrics", json_html(rows[-1])))
    settings = {key: record[key] for key in record if key != "config"}
    sections.append(("Settings", json_html(record["config"])))
    sections.append(("Data, schedule and versions", json_html(settings)))
    return sections


def write_run_page(run_dir: str | os.PathLike) -> Path:
    """Write ``RUN/report.html`` (atomically) and return its path."""
    run_dir = Path(run_dir)
    return _write(run_dir / PAGE, page(f"carsynth run {run_dir.name}", run_sections(run_dir)))


# ---------------------------------------------------------------------------- validation report
def validation_sections(
    report_dir: str | os.PathLike, provenance: dict[str, Any] | None = None
) -> list[tuple[str, str]]:
    """The verdict, the figures, report.json in full, and the exported file's provenance."""
    report_dir = Path(report_dir)
    report = json.loads((report_dir / "report.json").read_text())
    passed = bool(report.get("passed"))
    verdict = f'<p class="{"pass" if passed else "fail"}">{"PASS" if passed else "FAIL"}</p>'
    failures = report.get("failures") or []
    if failures:
        verdict += "<ul>" + "".join(f"<li>{html.escape(str(f))}</li>" for f in failures) + "</ul>"
    sections = [("Validation verdict", verdict)]
    pictures = sorted(report_dir.glob("*.png"))
    if pictures:
        sections.append(("Figures", "".join(figure(p) for p in pictures)))
    rest = {k: v for k, v in report.items() if k not in ("passed", "failures")}
    sections.append(("Statistics (report.json)", json_html(rest)))
    if provenance:
        sections.append(("Provenance of the exported file", json_html(provenance)))
    return sections


def write_validation_page(
    report_dir: str | os.PathLike, provenance: dict[str, Any] | None = None
) -> Path:
    """Write ``REPORT/report.html`` (atomically) and return its path."""
    report_dir = Path(report_dir)
    sections = validation_sections(report_dir, provenance)
    return _write(report_dir / PAGE, page(f"carsynth validation {report_dir.name}", sections))


def write_pipeline_page(
    out: str | os.PathLike, run_dir: Path, report_dir: Path, provenance: dict[str, Any] | None
) -> Path:
    """Write ``OUT/report.html`` for ``carsynth run``: the verdict first, then the run's and the
    validation's sections, the pipeline's settings last."""
    out = Path(out)
    validation = []
    if (report_dir / "report.json").exists():
        validation = validation_sections(report_dir, provenance)
    sections = validation[:1]  # the verdict
    if (run_dir / rundir.CONFIG).exists():
        sections += run_sections(run_dir)
    sections += validation[1:]
    if (out / "pipeline.json").exists():
        sections.append(("Pipeline settings",
                         json_html(json.loads((out / "pipeline.json").read_text()))))  # fmt: skip
    return _write(out / PAGE, page(f"carsynth pipeline {out.name}", sections))
