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

if TYPE_CHECKING:
    from carsynth.metrics.neighbours import CollapseTest, CopyTest
    from carsynth.validation.checks import ValidationResult
    from carsynth.validation.gate import NDBTest


def write_json(data: dict[str, Any], path: Path) -> None:
    """``data`` as indented JSON, atomically."""
    files.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def _verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def _band(lo: float, hi: float) -> str:
    return f"[{'' if np.isinf(lo) else f'{lo:.3g}'}, {'' if np.isinf(hi) else f'{hi:.3g}'}]"


def summary_table(result: ValidationResult) -> str:
    """The verdict; per test its statistic, the null's median and acceptance band, the p-value;
    then the reported measures (NDB/K, JS, density, coverage) beside held-out real frames'."""
    gate = result.gate
    meaning = {
        "ndb": "mean z^2 over bins", "sharpness": "log median ratio",
        "collapse": "log NN-distance ratio", "copying": "share nearer than q",
    }  # fmt: skip
    rows = []
    for name, test in gate.tests.items():
        rows.append((name, meaning[name], f"{test.statistic:.3g}",
                     f"{np.median(test.null):.3g}", _band(*test.band), f"{test.p_value:.3g}",
                     _verdict(test.passed)))  # fmt: skip
    header = ("test", "statistic", "generated", "null median", "band", "p", "result")
    ndb, dc, dc_real = gate.ndb, gate.density_coverage, gate.density_coverage_real
    reported = [
        ("NDB/K", f"{float(ndb.stats.ndb_k):.3f}", f"{float(ndb.holdout.ndb_k):.3f}",
         _band(*np.quantile(ndb.null.ndb_k, [0.05, 0.95]))),
        ("JS divergence", f"{float(ndb.stats.js):.4f}", f"{float(ndb.holdout.js):.4f}",
         _band(*np.quantile(ndb.null.js, [0.05, 0.95]))),
        ("density", f"{dc.density:.3f}", f"{dc_real.density:.3f}", ""),
        ("coverage", f"{dc.coverage:.3f}", f"{dc_real.coverage:.3f}", ""),
    ]  # fmt: skip
    lines = [
        f"carsynth validate: {'PASS' if result.passed else 'FAIL'} (level "
        f"{result.config.level:g}, each test at {result.config.level / len(rows):.3g})",
        f"frames: {result.num_train} train, {result.num_holdout} held-out real, "
        f"{result.num_fake} generated (at least {ndb.min_frames}); design effect "
        f"{ndb.design_effect:.1f}; {result.config.space} space; "
        f"{result.seconds.get('total', 0.0):.1f} s",
    ]
    lines += _columns([header, *rows])
    lines += ["reported (not gated):"]
    lines += _columns([("measure", "generated", "held-out real", "null 5-95%"), *reported])
    lines += [f"failed: {failure}" for failure in result.failures]
    return "\n".join(line.rstrip() for line in lines)


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]


def _save_figure(fig: Any, path: Path) -> None:
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def plot_bins(ndb: NDBTest, alpha: float, path: Path) -> None:
    """Per-bin shares (training, generated, held-out real); bins with |z| beyond the two-sided
    ``alpha`` critical value marked in red."""
    from matplotlib.figure import Figure
    from scipy.stats import norm

    k = len(ndb.train_shares)
    fig = Figure(figsize=(max(6.0, k * 0.12), 3.6), layout="constrained")
    ax = fig.add_subplot()
    bins = np.arange(k)
    different = np.abs(ndb.stats.z) > norm.isf(alpha / 2)
    ax.bar(bins, ndb.train_shares, width=0.9, color="0.75", label="training")
    ax.plot(bins, ndb.fake_shares, "o", ms=3, color="tab:blue", label="generated")
    ax.plot(bins, ndb.holdout_shares, "_", ms=6, color="tab:green", label="held-out real")
    ax.plot(
        bins[different], ndb.fake_shares[different], "x", ms=7, color="tab:red",
        label=f"different ({int(different.sum())})",
    )  # fmt: skip
    ax.set_xlabel("bin (sorted by training share)")
    ax.set_ylabel("share of frames")
    ax.set_title(
        f"mean z^2 {ndb.test.statistic:.3g} (null median {np.median(ndb.test.null):.3g}, "
        f"p {ndb.test.p_value:.3g}); design effect {ndb.design_effect:.1f}"
    )
    ax.legend(fontsize="small")
    _save_figure(fig, path)


def plot_distances(collapse: CollapseTest, copying: CopyTest, path: Path) -> None:
    """Histograms of the two neighbour tests' distances, generated against real."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    panels = [
        (left, collapse.fake_distances, collapse.real_distances, None,
         f"collapse: nearest other frame, {collapse.num} per set", "one per real episode"),
        (right, copying.fake_distances, copying.real_distances, copying.threshold,
         "copying: nearest training frame", "new real frames"),
    ]  # fmt: skip
    for ax, fake, real, threshold, title, real_label in panels:
        edges = np.histogram_bin_edges(np.concatenate([fake, real]), bins=50)
        ax.hist(real, bins=edges, alpha=0.6, density=True, color="tab:green", label=real_label)
        ax.hist(fake, bins=edges, alpha=0.6, density=True, color="tab:blue", label="generated")
        if threshold is not None:
            ax.axvline(threshold, color="tab:red", ls="--", label=f"q{copying.quantile:g}")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("Euclidean distance")
        ax.legend(fontsize="small")
    _save_figure(fig, path)


def save_pairs(fake: np.ndarray, train: np.ndarray, path: Path, columns: int = 4) -> None:
    """A grid of (generated, nearest training frame) pairs side by side, nearest pairs first."""
    pairs = np.stack([fake, train], axis=1).reshape(-1, *fake.shape[1:])
    files.write_grid(pairs, path, columns=2 * columns)
