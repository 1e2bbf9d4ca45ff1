"""Where a run's numbers go: ``metrics.jsonl`` always, TensorBoard when it is installed.

``metrics.jsonl`` holds one JSON object per logging step. A run killed while appending leaves
half a line at the end: :class:`MetricsLog` drops it (with a warning) when the run resumes, along
with the rows past the checkpoint being resumed, which the run writes again.

TensorBoard (``pip install carsynth[tensorboard]``, then ``tensorboard --logdir RUN/tensorboard``)
gets the same numbers under the names its users expect: ``loss/d``, ``loss/g``, ``D/real``,
``D/fake``, ``fm/distance``, ``samples/diversity``, ``speed/images_per_s``, ``monitor/ndb``,
... and the fixed-noise sample grid as the image ``samples``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from carsynth import files, rundir
from carsynth.progress import log

TENSORBOARD = "tensorboard"
# metrics.jsonl key -> TensorBoard tag
TAGS = {
    "d_loss": "loss/d",
    "g_loss": "loss/g",
    "d_real": "D/real",
    "d_fake": "D/fake",
    "fm_distance": "fm/distance",
    "sample_diversity": "samples/diversity",
    "images_per_s": "speed/images_per_s",
    "epoch": "progress/epoch",
    "ndb": "monitor/ndb",
    "ndb_js": "monitor/ndb_js",
    "collapse_ratio": "monitor/collapse_ratio",
    "duplicate_share": "monitor/duplicate_share",
}


def read_rows(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The whole rows of a ``metrics.jsonl`` and how many lines were not (a torn last line)."""
    rows, torn = [], 0
    if not path.exists():
        return rows, torn
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            torn += 1
    return rows, torn


class MetricsLog:
    """``metrics.jsonl`` (and TensorBoard when installed): one row per logging step."""

    def __init__(self, out: Path, start: int) -> None:
        self.path = rundir.metrics_path(out)
        rows, torn = read_rows(self.path)
        if torn:
            log.warning(f"{self.path}: dropped {torn} unreadable line(s) (a run killed mid-write)")
        # Rows past the checkpoint being resumed will be written again.
        text = "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= start)
        files.atomic_write(self.path, lambda tmp: tmp.write_text(text))
        self.writer = _tensorboard(out / TENSORBOARD, start)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as m:
            m.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if number and key != "step":
                    self.writer.add_scalar(TAGS.get(key, f"other/{key}"), value, row["step"])

    def images(self, step: int, grid: torch.Tensor) -> None:
        """The fixed-noise sample grid (float images in [-1, 1]) as TensorBoard's ``samples``."""
        if self.writer is not None:
            from torchvision.utils import make_grid

            picture = make_grid(grid.detach().cpu(), nrow=8, normalize=True, value_range=(-1, 1))
            self.writer.add_image("samples", picture, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard(folder: Path, start: int) -> Any:
    """A SummaryWriter when tensorboard is installed (events past ``start`` purged), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder), purge_step=start or None)
