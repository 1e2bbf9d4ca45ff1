"""Metrics on plain arrays: NDB bins and nearest-neighbour checks. Arrays in, result objects out.

They know nothing of files or training, so the trainer's collapse monitor, ``carsynth validate``
and ``carsynth export`` all call the same functions.
"""

from carsynth.metrics.ndb import NDBBins, NDBResult, ndb
from carsynth.metrics.neighbours import (
    CollapseResult,
    collapse_check,
    neighbour_space,
)

__all__ = [
    "CollapseResult",
    "NDBBins",
    "NDBResult",
    "collapse_check",
    "ndb",
    "neighbour_space",
]
