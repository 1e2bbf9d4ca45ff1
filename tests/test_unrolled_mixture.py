"""scripts/unrolled_mixture.py: the scoring of generated points, the outputs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_script

um = load_script("unrolled_mixture")


def test_score_counts_covered_modes_and_high_quality_points() -> None:
    centres = um.centres()
    assert torch.allclose(centres.norm(dim=1), torch.full((8,), 2.0))
    # 300 points on mode 0, 100 on mode 3 just inside 3 std, 100 just outside, 500 far away.
    inside = centres[3] + torch.tensor([2.9 * um.STD, 0.0])
    outside = centres[3] + torch.tensor([3.1 * um.STD, 0.0])
    points = torch.cat([centres[0].expand(300, 2), inside.expand(100, 2),
                        outside.expand(100, 2), torch.zeros(500, 2)])  # fmt: skip
    result = um.score(points, covered_share=0.05)
    assert result["modes_covered"] == 2 and result["high_quality"] == pytest.approx(0.4)
    assert result["mode_shares"] == [0.3, 0, 0, 0.1, 0, 0, 0, 0]
    assert um.score(points, covered_share=0.2)["modes_covered"] == 1


def test_real_points_are_the_mixture() -> None:
    points = um.real_points(8000, torch.Generator().manual_seed(0))
    result = um.score(points, covered_share=0.1)
    assert result["modes_covered"] == 8 and result["high_quality"] > 0.98


def test_tiny_run_writes_table_json_and_figure(tmp_path: Path, capsys) -> None:
    out = tmp_path / "mix"
    argv = ["--out", str(out), "--steps", "3", "--unroll", "0", "2", "--seeds", "0",
            "--eval-every", "2"]  # fmt: skip
    assert um.main(argv) == 0
    record = json.loads((out / "results.json").read_text())
    assert [(r["unroll"], r["seed"]) for r in record["results"]] == [(0, 0), (2, 0)]
    assert record["config"]["steps"] == 3
    assert [len(r["timeline"]) for r in record["results"]] == [2, 2]  # steps 2 and 3
    table = (out / "results.md").read_text()
    assert table.startswith("| K (unrolled steps) |") and len(table.splitlines()) == 4
    assert capsys.readouterr().out.endswith(table)  # printed last
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_exit_2(tmp_path: Path, capsys) -> None:
    assert um.main(["--out", str(tmp_path / "mix"), "--steps", "0"]) == 2
    assert capsys.readouterr().err.startswith(
        "unrolled_mixture: error: --steps and --eval-every must be >= 1"
    )
    assert not (tmp_path / "mix").exists()
