"""The SIGKILL battery of scripts/reliability_battery.py, on a small size (README: full counts)."""

from __future__ import annotations

import json

from conftest import load_script


def test_killed_collects_leave_whole_episodes_and_resume_to_the_same_bytes(tmp_path):
    battery = load_script("reliability_battery")
    out = tmp_path / "battery.json"
    result = battery.main(["--runs", "2", "--episodes", "3", "--seed", "1",
                           "--folder", str(tmp_path / "runs"), "--out", str(out)])  # fmt: skip
    totals = result["totals"]
    assert totals["runs"] == 2 and totals["passed"] == 2, result["rows"]
    assert totals["reader_polls"] > 0 and totals["reader_errors"] == 0
    assert totals["orphan_processes"] == 0
    assert json.loads(out.read_text())["totals"] == totals
