"""The loss curves of a run (``loss.png``)."""

from __future__ import annotations

import json
from pathlib import Path

from carsynth import files


def plot_losses(metrics_path: Path, out: Path) -> None:
    """Draw the losses of ``metrics.jsonl`` (absolute values, log scale: WGAN losses go negative)
    into a PNG, with the collapse monitor's statistics in a second panel when it ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    checked = [r for r in rows if "ndb" in r]
    fig, axes = plt.subplots(
        1 + bool(checked), 1, figsize=(7, 4 + 3 * bool(checked)), squeeze=False
    )
    steps = [r["step"] for r in rows]
    for key in ("d_loss", "g_loss", "fm_distance"):
        axes[0, 0].plot(steps, [abs(r[key]) for r in rows], label=key)
    axes[0, 0].set_yscale("log")
    if checked:  # the collapse monitor's rows
        for key in ("ndb", "collapse_ratio", "duplicate_share"):
            axes[1, 0].plot([r["step"] for r in checked], [r[key] for r in checked], label=key)
    for ax in axes[:, 0]:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    files.atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
