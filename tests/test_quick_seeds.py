"""scripts/quick_seeds.py: the preset is changed only in which checkpoints it keeps, and the
budget extrapolation is a power law fitted in log-log space."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import load_script

from carsynth import pipeline
from carsynth.errors import UsageError

qs = load_script("quick_seeds")


def test_only_the_kept_checkpoints_differ_from_the_preset(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "PRESETS", dict(pipeline.PRESETS))  # the script adds one
    config = qs.pipeline_config(tmp_path, "quick", seed=2, every=250)
    assert config.seed == 2 and config.out == str(tmp_path)
    quick, kept = pipeline.PRESETS["quick"], pipeline.PRESETS[config.preset]
    changed = {k: v for k, v in kept.train.items() if quick.train.get(k) != v}
    steps = quick.train["steps"]
    assert changed == {"checkpoint_interval": 250, "keep_checkpoints": steps // 250 + 1}
    assert dataclasses.replace(kept, train=quick.train) == quick
    with pytest.raises(UsageError, match="--every 7 must divide"):
        qs.pipeline_config(tmp_path, "quick", seed=0, every=7)


def test_power_law_extrapolation_by_hand() -> None:
    # statistic = 100 * images^-0.5 exactly: it reaches 1 at 1e4 images
    curve = [{"images": n, "ndb": 100 * n**-0.5} for n in (10, 100, 400, 900)]
    fit = qs.extrapolate(curve, "ndb", 1.0)
    assert fit["exponent"] == pytest.approx(-0.5)
    assert fit["images"] == pytest.approx(1e4)
    rising = [{"images": n, "ndb": float(n)} for n in (10, 100, 1000)]
    assert qs.extrapolate(rising, "ndb", 1.0)["images"] is None  # a rising law never gets there
    negative = [{"images": n, "ndb": v} for n, v in ((10, 1.0), (100, 0.5), (1000, -0.1))]
    assert qs.extrapolate(negative, "ndb", 0.01) == {"exponent": None, "images": None}
