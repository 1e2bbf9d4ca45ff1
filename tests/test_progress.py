"""Progress reports: plain log lines off a terminal, a bar on one, nothing with --quiet."""

from __future__ import annotations

import logging

from conftest import run_cli

from carsynth.progress import Progress


def test_log_lines_count_rate_and_eta(caplog, monkeypatch):
    now = [100.0]
    monkeypatch.setattr("carsynth.progress.time.monotonic", lambda: now[0])
    caplog.set_level(logging.INFO, logger="carsynth")
    with Progress(10, desc="collect", unit="ep", initial=2, mode="log", interval=0) as progress:
        now[0] += 10
        progress.update(2, frames=40)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == "collect: 2/10 ep (20%)"
    # 2 episodes in the 10 s since the start: 0.2 ep/s, 6 left: 30 s
    assert lines[1] == "collect: 4/10 ep (40%), 0.2 ep/s, ETA 0:00:30, frames=40"
    assert len(lines) == 2  # nothing new at close: no repeated line


def test_log_lines_only_every_interval(caplog):
    caplog.set_level(logging.INFO, logger="carsynth")
    with Progress(100, desc="collect", unit="ep", mode="log", interval=3600) as progress:
        for _ in range(100):
            progress.update()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("collect: 0/100") and "100/100" in lines[1]


def test_off_reports_nothing(caplog, capsys):
    caplog.set_level(logging.INFO, logger="carsynth")
    with Progress(5, desc="collect", unit="ep", mode="off") as progress:
        progress.update(5)
    assert not caplog.records and capsys.readouterr().err == ""


def test_collect_in_a_log_file_writes_plain_lines_and_quiet_writes_none(tmp_path):
    # stderr is a pipe here, as in a cluster job's log: no tqdm redraws joined by carriage returns
    args = ["collect", "--episodes", "2", "--workers", "1", "--max-steps", "60"]
    result = run_cli(*args, "--out", str(tmp_path / "a.h5"))
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].endswith("carsynth: collect: 0/2 ep (0%)")
    assert "carsynth: collect: 2/2 ep (100%)" in lines[-1] and "frames=20" in lines[-1]
    quiet = run_cli(*args, "--out", str(tmp_path / "b.h5"), "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout == f"wrote {tmp_path / 'b.h5'}\n"
