"""scripts/compare_mitigations.py: the variants' settings, the outputs, resuming, bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import load_script

torch.set_num_threads(1)


cm = load_script("compare_mitigations")


def test_variants_change_only_their_own_flags() -> None:
    c = cm.CompareConfig(data="real.h5", out="cmp")
    base = dataclasses.asdict(cm.train_config(c, "bce", 0))
    for variant in cm.VARIANTS:
        config = dataclasses.asdict(cm.train_config(c, variant, 0))
        changed = {k: v for k, v in config.items() if base[k] != v and k != "out"}
        assert changed == cm.VARIANTS[variant]
        assert config["out"] == str(Path("cmp") / "runs" / f"{variant}_s0")
    # Gulrajani et al. 2017's settings; Salimans et al. 2016's one-sided smoothing at 0.9.
    assert cm.VARIANTS["wgan-gp"] == {"loss": "wgan-gp", "lr": 1e-4, "beta1": 0.0, "beta2": 0.9}
    assert cm.VARIANTS["bce+smooth"] == {"real_label": 0.9}
    assert base["steps"] == 500 and base["ngf"] == base["ndf"] == 32


def test_tiny_comparison_writes_table_json_figure_and_resumes(
    fixture_file: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "cmp"
    argv = ["--data", str(fixture_file), "--out", str(out), "--steps", "2", "--ngf", "8",
            "--ndf", "8", "--nz", "8", "--samples", "120", "--variants", "bce", "fm",
            "--no-progress"]  # fmt: skip
    assert cm.main(argv) == 0
    table = capsys.readouterr().out
    record = json.loads((out / "results.json").read_text())
    rows = record["results"]
    assert [(r["variant"], r["seed"]) for r in rows] == [("bce", 0), ("fm", 0)]
    assert record["config"]["preset"]["steps"] == 2
    for r in rows:
        assert 0 <= r["ndb"] <= 1 and 0 <= r["js"] <= 0.6932 and r["images_per_s"] > 0
        assert r["passed"] is None and r["failures"][0].startswith("the gate needs")  # 120 samples
        assert [m["step"] for m in r["monitor"]] == [2]  # monitor interval clipped to the steps
    lines = table.strip().splitlines()
    assert lines[0].startswith("| variant | seed | NDB/K | JS |") and len(lines) == 6
    assert lines[2].startswith("| bce | 0 | ") and lines[3].startswith("| fm | 0 | ")
    assert (out / "results.md").read_text() == table
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Repeating the command resumes the finished run: no training, the same numbers.
    checkpoint = out / "runs" / "fm_s0" / "checkpoints" / "ckpt_0000002.pt"
    before = checkpoint.stat().st_mtime_ns
    assert cm.main([*argv[:-3], "fm", "--no-progress"]) == 0
    assert checkpoint.stat().st_mtime_ns == before
    (again,) = json.loads((out / "results.json").read_text())["results"]
    assert again["ndb"] == rows[1]["ndb"] and again["collapse_ratio"] == rows[1]["collapse_ratio"]


def test_summary_over_seeds_gives_mean_and_range() -> None:
    def row(variant: str, seed: int, ndb: float, passed: bool) -> dict:
        return {"variant": variant, "seed": seed, "ndb": ndb, "js": ndb / 2,
                "collapse_ratio": 1.0 + seed, "duplicate_share": 0.0, "copy_share": 0.0,
                "passed": passed, "images_per_s": 10.0, "ndb_real_baseline": 0.1}  # fmt: skip

    rows = [row("bce", 0, 0.6, False), row("bce", 1, 0.8, True), row("fm", 0, 0.3, True),
            row("fm", 1, 0.4, True)]  # fmt: skip
    lines = cm.markdown(rows).splitlines()
    assert "| bce | 2 | 0.70 (0.60-0.80) | 0.350 (0.300-0.400) | 1.50 | 1/2 |" in lines
    assert "| fm | 2 | 0.35 (0.30-0.40) | 0.175 (0.150-0.200) | 1.50 | 2/2 |" in lines
    assert (
        "Held-out real frames against the same bins: NDB/K 0.10 (seed 0), 0.10 (seed 1)." in lines
    )
    # one seed per variant: no summary table
    assert not any(
        line.startswith("| variant | seeds |") for line in cm.markdown(rows[::2]).split("\n")
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variants", "bce", "dropout"], "--variants: unknown ['dropout']"),
        (["--data", "missing.h5"], "missing.h5: no such file"),
    ],
)
def test_bad_input_exit_2_nothing_written(
    fixture_file: Path, tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    argv = ["--data", str(fixture_file), "--out", str(tmp_path / "cmp"), *args]
    assert cm.main(argv) == 2
    assert capsys.readouterr().err.startswith(f"compare_mitigations: error: {message}")
    assert not (tmp_path / "cmp").exists()


def test_gpu_preset_runs_the_pipeline_recipe() -> None:
    from carsynth.pipeline import CANDIDATE, PRESETS, RECIPE

    c = cm.parse_args(["--data", "real.h5", "--out", "cmp", "--preset", "gpu"])
    assert c.variants == ["recipe", "fm+da+sn"]
    full = PRESETS["full"].train
    for variant, settings in (("recipe", RECIPE), ("fm+da+sn", CANDIDATE)):
        config = cm.train_config(c, variant, 0)
        assert {k: getattr(config, k) for k in settings} == settings
    recipe = cm.train_config(c, "recipe", 0)
    assert {k: getattr(recipe, k) for k in RECIPE} == {k: full[k] for k in RECIPE}
    assert (recipe.ngf, recipe.batch_size, recipe.steps) == (64, full["batch_size"], full["steps"])
    assert "recipe" not in cm.parse_args(["--data", "r.h5", "--out", "c"]).variants
