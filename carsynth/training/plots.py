"""The figure of a run (``loss.png``): losses, the discriminator's outputs, diversity, the monitor.

Panels, each against the generator step: the D and G losses as signed values on a linear axis
(WGAN losses are negative; a log axis of |loss| hides that), the feature-matching distance on
its own axis, D's mean output on real and generated frames (D(x), D(G(z)): probabilities for
bce, critic values for wgan-gp), the mean pairwise distance of the fixed-noise samples (falls
towards 0 when the generator collapses), and, when the collapse monitor ran, its statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from carsynth import files
from carsynth.training.tracking import read_rows


def _panel(ax: Any, rows: list[dict], keys: dict[str, str], title: str, ylabel: str) -> None:
    for key, label in keys.items():
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), label=label)
    ax.set_title(title)
    ax.set_xlabel("generator step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)


def plot_losses(metrics_path: Path, out: Path, title: str | None = None) -> None:
    """Draw the rows of ``metrics.jsonl`` into ``out`` (PNG, atomically); see the module doc."""
    from matplotlib.figure import Figure

    rows, _ = read_rows(metrics_path)
    checked = [r for r in rows if "ndb" in r]
    fig = Figure(figsize=(11, 7 + 3.2 * bool(checked)))
    axes = fig.subplots(2 + bool(checked), 2, squeeze=False)
    # D and G losses on axes of their own (feature matching's G loss is hundreds, D's about 1)
    _panel(axes[0, 0], rows, {"d_loss": "D loss"}, "Losses (signed)", "D loss")
    g_axis = axes[0, 0].twinx()
    points = [(r["step"], r["g_loss"]) for r in rows if "g_loss" in r]
    if points:
        g_axis.plot(*zip(*points, strict=True), color="tab:orange", label="G loss")
        g_axis.legend(fontsize=8, loc="upper right")
    g_axis.set_ylabel("G loss", color="tab:orange")
    axes[0, 0].axhline(0, color="0.5", lw=0.6)
    if axes[0, 0].lines:
        axes[0, 0].legend(fontsize=8, loc="upper left")
    _panel(axes[0, 1], rows, {"fm_distance": "||E f(x) - E f(G(z))||^2"},
           "Feature-matching distance (Salimans et al. 2016)", "squared distance")  # fmt: skip
    _panel(axes[1, 0], rows, {"d_real": "D(x), real", "d_fake": "D(G(z)), generated"},
           "Discriminator outputs", "mean D output")  # fmt: skip
    _panel(axes[1, 1], rows, {"sample_diversity": "mean pairwise L2"},
           "Diversity of the fixed-noise samples", "distance ([-1, 1] pixels)")  # fmt: skip
    if checked:
        _panel(axes[2, 0], checked, {"ndb": "NDB/K", "duplicate_share": "near-duplicate share"},
               "Collapse monitor: bins and duplicates", "share")  # fmt: skip
        _panel(axes[2, 1], checked, {"collapse_ratio": "median NN distance, generated/held-out"},
               "Collapse monitor: spread", "ratio")  # fmt: skip
        axes[2, 1].axhline(1.0, color="0.5", lw=0.6)
    fig.suptitle(title or f"Training run {Path(metrics_path).parent.name}")
    fig.tight_layout()
    files.atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
