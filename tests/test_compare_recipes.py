"""scripts/compare_recipes.py and carsynth.validation.curve: recipes change only their settings,
every checkpoint is judged by the calibrated gate exactly as export judges it, the outputs, bad
input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import load_script

from carsynth.export import ExportConfig, export
from carsynth.pipeline import PRESETS
from carsynth.validation import ValidationConfig

torch.set_num_threads(1)

cr = load_script("compare_recipes")


def test_recipes_change_only_their_own_settings() -> None:
    c = cr.CompareConfig(data="real.h5", out="cmp", steps=600, eval_every=200)
    base = dataclasses.asdict(cr.train_config(c, "fm", 3))
    quick = PRESETS["quick"].train
    assert {k: base[k] for k in ("ngf", "ndf", "batch_size", "fm")} == {
        k: quick[k] for k in ("ngf", "ndf", "batch_size", "fm")
    }
    assert base["steps"] == 600 and base["checkpoint_interval"] == 200 and base["seed"] == 3
    assert base["keep_checkpoints"] >= 3  # every judged checkpoint is kept
    assert base["device"] == "auto" and cr.parse_args(
        ["--data", "d", "--out", "o", "--device", "cpu"]).device == "cpu"  # fmt: skip
    for recipe, changes in cr.RECIPES.items():
        config = dataclasses.asdict(cr.train_config(c, recipe, 3))
        changed = {k: v for k, v in config.items() if base[k] != v and k != "out"}
        assert changed == {k: v for k, v in changes.items() if base[k] != v}


def test_tiny_comparison_judges_every_checkpoint_as_export_does(
    fixture_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cmp"
    argv = ["--data", str(fixture_file), "--out", str(out), "--preset", "test",
            "--recipes", "fm", "fm+da+sn", "--steps", "2", "--eval-every", "1",
            "--samples", "800"]  # fmt: skip
    assert cr.main(argv) == 0
    record = json.loads((out / "results.json").read_text())
    assert [r["recipe"] for r in record["results"]] == ["fm", "fm+da+sn"]
    for row in record["results"]:
        assert [p["step"] for p in row["curve"]] == [1, 2]
        assert [p["images"] for p in row["curve"]] == [16, 32]  # the test preset's batch 16
        assert row["passed"] == (not row["failed"])
    table = (out / "results.md").read_text()
    assert "| fm+da+sn | 0 | 2 |" in table and "Real-data bands" in table
    assert (out / "curve.png").stat().st_size > 1000
    # the last point is the verdict carsynth export gives the same run, seed and frame count
    run = Path(record["results"][0]["run"])
    result = export(ExportConfig(run=str(run), out=str(tmp_path / "syn.h5"), num=800, seed=0,
                                 force=True, progress=False,
                                 validation=ValidationConfig(seed=0)))  # fmt: skip
    last = record["results"][0]["curve"][-1]
    tests = result.validation.to_dict()["tests"]
    assert last["passed"] == result.validation.passed
    assert last["ndb"] == pytest.approx(tests["ndb"]["statistic"])
    assert last["sharpness"] == pytest.approx(tests["sharpness"]["statistic"])


def test_bad_input_exit_2(fixture_file: Path, tmp_path: Path, capsys) -> None:
    base = ["--data", str(fixture_file), "--out", str(tmp_path)]
    assert cr.main([*base, "--recipes", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert cr.main([*base, "--steps", "3", "--eval-every", "2"]) == 2
    assert cr.main(["--data", str(tmp_path / "missing.h5"), "--out", str(tmp_path)]) == 2
    assert "missing.h5: no such file" in capsys.readouterr().err


def test_the_screens_recipe_arm_is_the_pipelines_recipe() -> None:
    # scripts/gpu_check.sh and the README's screens name this arm for carsynth.pipeline.RECIPE
    from carsynth.pipeline import RECIPE

    assert {"fm": True, **cr.RECIPES["fm2+lr5e-4"]} == RECIPE
