"""The validation report: the summary table, report.json and the figures.

Every file is written under a temporary name and renamed into place, so a report folder never
holds half a file. Figures use matplotlib's object API (no pyplot global state, no display).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from carsynth import files
from carsynth.metrics.ndb import NDBResult
from carsynth.metrics.neighbours import CollapseResult, CopyResult

if TYPE_CHECKING:
    from carsynth.validation.checks import ValidationResult


def write_json(data: dict[str, Any], path: Path) -> None:
    """``data`` as indented JSON, atomically."""
    files.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def _verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def summary_table(result: ValidationResult) -> str:
    """The verdict, one row per measure (generated, held-out real, limit, verdict), failures."""
    ndb, base, col, cop = result.ndb, result.ndb_baseline, result.collapse, result.copying
    config = result.config
    rows = [
        ("NDB/K", f"K={ndb.k}, alpha={ndb.alpha:g}", f"{ndb.score:.3f}", f"{base.score:.3f}",
         f"<= {result.ndb_limit:.3f}", _verdict(ndb.score <= result.ndb_limit)),
        ("JS divergence", "bin histograms, nats", f"{ndb.js_divergence:.4f}",
         f"{base.js_divergence:.4f}", "", ""),
        ("collapse", "median NN-other distance", f"{col.median_fake:.3g}",
         f"{col.median_real:.3g}", "", ""),
        ("", "ratio generated/held-out", f"{col.ratio:.2f}", "1.00",
         f">= {col.min_ratio:.2f}", _verdict(col.ratio >= col.min_ratio)),
        ("", f"near-duplicates (< q{config.duplicate_quantile:g})", f"{col.duplicate_share:.1%}",
         f"{col.real_duplicate_share:.1%}", f"<= {col.max_duplicate_share:.1%}",
         _verdict(col.duplicate_share <= col.max_duplicate_share)),
        ("copying", "median NN-train distance", f"{cop.median_fake:.3g}",
         f"{cop.median_real:.3g}", "", ""),
        ("", f"copies (< q{config.copy_quantile:g})", f"{cop.copy_share:.1%}",
         f"{cop.real_copy_share:.1%}", f"<= {cop.max_copy_share:.1%}", _verdict(cop.passed)),
    ]  # fmt: skip
    header = ("check", "measure", "generated", "held-out", "limit", "result")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        f"carsynth validate: {'PASS' if result.passed else 'FAIL'}",
        f"frames: {result.num_train} train, {result.num_holdout} held-out real, "
        f"{result.num_fake} generated; {result.config.space} space; "
        f"{result.seconds.get('total', 0.0):.1f} s",
    ]
    for row in [header, *rows]:
        lines.append("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)))
    lines += [f"failed: {failure}" for failure in result.failures]
    return "\n".join(line.rstrip() for line in lines)


def _save_figure(fig: Any, path: Path) -> None:
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def plot_bins(ndb: NDBResult, baseline: NDBResult, path: Path) -> None:
    """Per-bin proportions (training, generated, held-out real), different bins marked in red."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, ndb.k * 0.12), 3.6), layout="constrained")
    ax = fig.add_subplot()
    bins = np.arange(ndb.k)
    ax.bar(bins, ndb.real_proportions, width=0.9, color="0.75", label="training")
    ax.plot(bins, ndb.fake_proportions, "o", ms=3, color="tab:blue", label="generated")
    ax.plot(bins, baseline.fake_proportions, "_", ms=6, color="tab:green", label="held-out real")
    ax.plot(
        bins[ndb.different], ndb.fake_proportions[ndb.different], "x", ms=7, color="tab:red",
        label=f"different ({ndb.num_different_bins})",
    )  # fmt: skip
    ax.set_xlabel("bin (sorted by training share)")
    ax.set_ylabel("share of frames")
    ax.set_title(
        f"NDB/K {ndb.score:.3f} (held-out real {baseline.score:.3f}), JS {ndb.js_divergence:.4f}"
    )
    ax.legend(fontsize="small")
    _save_figure(fig, path)


def plot_distances(collapse: CollapseResult, copying: CopyResult, path: Path) -> None:
    """Histograms of the two checks' nearest-neighbour distances, thresholds as dashed lines."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    panels = [
        (left, collapse.fake_distances, collapse.real_distances, collapse.duplicate_threshold,
         "collapse: distance to nearest other frame of the same set"),
        (right, copying.fake_distances, copying.real_distances, copying.copy_threshold,
         "copying: distance to nearest training frame"),
    ]  # fmt: skip
    for ax, fake, real, threshold, title in panels:
        edges = np.histogram_bin_edges(np.concatenate([fake, real]), bins=50)
        ax.hist(real, bins=edges, alpha=0.6, density=True, color="tab:green", label="held-out")
        ax.hist(fake, bins=edges, alpha=0.6, density=True, color="tab:blue", label="generated")
        ax.axvline(threshold, color="tab:red", ls="--", label="threshold")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("Euclidean distance")
        ax.legend(fontsize="small")
    _save_figure(fig, path)


def save_pairs(fake: np.ndarray, train: np.ndarray, path: Path, columns: int = 4) -> None:
    """A grid of (generated, nearest training frame) pairs side by side, nearest pairs first."""
    pairs = np.stack([fake, train], axis=1).reshape(-1, *fake.shape[1:])
    files.write_grid(pairs, path, columns=2 * columns)
