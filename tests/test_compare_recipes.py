"""scripts/compare_recipes.py: recipes change only their settings, fresh sets are whole
episodes, the verdict is the fresh sets' 95th percentile, the outputs, bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script

from carsynth import storage
from carsynth.errors import UsageError
from carsynth.pipeline import PRESETS

torch.set_num_threads(1)

cr = load_script("compare_recipes")


def test_recipes_change_only_their_own_settings() -> None:
    c = cr.CompareConfig(data="real.h5", fresh="fresh.h5", out="cmp", steps=600, eval_every=200)
    base = dataclasses.asdict(cr.train_config(c, "fm", 3))
    quick = PRESETS["quick"].train
    assert {k: base[k] for k in ("ngf", "ndf", "batch_size", "fm")} == {
        k: quick[k] for k in ("ngf", "ndf", "batch_size", "fm")
    }
    assert base["steps"] == 600 and base["checkpoint_interval"] == 200 and base["seed"] == 3
    assert base["keep_checkpoints"] >= 3  # every judged checkpoint is kept
    for recipe, changes in cr.RECIPES.items():
        config = dataclasses.asdict(cr.train_config(c, recipe, 3))
        changed = {k: v for k, v in config.items() if base[k] != v and k != "out"}
        assert changed == {k: v for k, v in changes.items() if base[k] != v}


def test_fresh_sets_are_disjoint_whole_episodes(fixture_file: Path, monkeypatch) -> None:
    monkeypatch.setattr(cr, "MIN_SETS", 4)
    with storage.open_frame_file(fixture_file) as f:
        starts = [a for a, _ in f.frame_ranges("all")]  # 8 episodes of 200 frames
        frames = f.read()
        sets = cr.fresh_sets(f, 300, seed=0)
        assert len(cr.fresh_sets(f, 100, seed=0)) == 8  # an episode's rest is never reused
        with pytest.raises(UsageError, match="fresh sets of 900 frames; at least 4"):
            cr.fresh_sets(f, 900, seed=0)
    assert len(sets) == 4 and all(s.shape == (300, 64, 64, 3) for s in sets)
    # each set: one whole episode, then the first 100 frames of another
    for s in sets:
        first = int(np.flatnonzero((frames == s[0]).all((1, 2, 3)))[0])
        second = int(np.flatnonzero((frames == s[200]).all((1, 2, 3)))[0])
        assert first in starts and second in starts and first != second
        assert np.array_equal(s[:200], frames[first : first + 200])


def test_tiny_comparison_writes_table_json_curve(
    fixture_file: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(cr, "MIN_SETS", 4)
    out = tmp_path / "cmp"
    argv = ["--data", str(fixture_file), "--fresh", str(fixture_file), "--out", str(out),
            "--preset", "test", "--recipes", "fm", "fm+da+sn", "--steps", "2",
            "--eval-every", "1", "--samples", "100", "--gate-samples", "0"]  # fmt: skip
    assert cr.main(argv) == 0
    record = json.loads((out / "results.json").read_text())
    null = record["fresh_null"]["0"]
    assert null["sets"] == 8
    assert null["js_limit"] == pytest.approx(np.quantile(null["js"], 0.95))
    for row in record["results"]:
        assert [p["step"] for p in row["curve"]] == [1, 2]
        assert row["passed"] == (row["js"] <= null["js_limit"] and row["ndb"] <= null["ndb_limit"])
        assert row["collapse_ratio"] >= 0
    table = (out / "results.md").read_text()
    assert "| fm+da+sn | 0 | 2 |" in table and "95th pct" in table
    assert (out / "curve.png").stat().st_size > 1000


def test_bad_input_exit_2(fixture_file: Path, tmp_path: Path, capsys) -> None:
    base = ["--data", str(fixture_file), "--fresh", str(fixture_file), "--out", str(tmp_path)]
    assert cr.main([*base, "--recipes", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert cr.main([*base, "--steps", "3", "--eval-every", "2"]) == 2
    assert cr.main([*base[:3], str(tmp_path / "missing.h5"), *base[4:]]) == 2
