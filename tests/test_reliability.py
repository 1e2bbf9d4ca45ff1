"""Training runs a researcher can leave alone: signals, kills, damaged files, full disks, logs.

- Ctrl-C and SIGTERM save the step reached and resume bit-identically (in-process: the real
  signal handlers, a real signal; and one real subprocess for the printed command).
- SIGKILL at random moments of a real `carsynth train` (8 kills in a chain of resumes): every
  checkpoint loads with weights_only=True and the resumed run equals an uninterrupted one.
- A damaged latest checkpoint (7 kinds, a code-running pickle among them) falls back to the
  previous good one; none good is one line, exit 2, nothing rewritten.
- Torn metrics.jsonl, config.json that is not JSON, a run killed before config.json existed,
  divergence by magnitude, a full disk, logging off a terminal, --quiet.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_train import ENV, assert_same_state, load, tiny

from carsynth import cli, rundir
from carsynth.errors import UsageError
from carsynth.training import TrainConfig, TrainingDiverged, TrainingInterrupted, train
from carsynth.training import steps as training_steps
from carsynth.training.config import check_config

torch.set_num_threads(1)
STEPS = 16


def flags(config: TrainConfig) -> list[str]:
    """The command line of a `tiny` config."""
    return ["train", "--data", config.data, "--out", config.out, "--nz", "8", "--ngf", "8",
            "--ndf", "8", "--batch-size", "16", "--steps", str(config.steps), "--log-interval",
            str(config.log_interval), "--sample-interval", str(config.sample_interval),
            "--checkpoint-interval", str(config.checkpoint_interval), "--device", "cpu",
            "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def reference(fixture_file, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return train(tiny(fixture_file, out, steps=STEPS, checkpoint_interval=2))


@pytest.fixture(scope="module")
def fixture_file():
    return ROOT / "data" / "carracing_small.h5"


def same_run(a: Path, b: Path) -> None:
    assert_same_state(load(rundir.latest_checkpoint(a)), load(rundir.latest_checkpoint(b)))
    rows = [[json.loads(line)["d_loss"] for line in (run / "metrics.jsonl").open()]
            for run in (a, b)]  # fmt: skip
    assert rows[0] == rows[1]


def signal_at_step(monkeypatch, number: int, signum: int) -> None:
    """Send ``signum`` to this process during the generator update of step ``number``."""
    calls = []
    real = training_steps.generator_step

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr("carsynth.training.loop.generator_step", step)


# ------------------------------------------------------------------------------------ signals
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_the_step_reached_and_resumes_bit_identically(
    fixture_file, tmp_path, reference, monkeypatch, signum
):
    config = tiny(fixture_file, tmp_path / "run", steps=STEPS, checkpoint_interval=2)
    signal_at_step(monkeypatch, 5, signum)  # in step 5: steps 1..5 finish, step 6 never starts
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config)
    assert stopped.value.step == 5
    assert stopped.value.checkpoint == rundir.checkpoint_path(config.out, 5)
    assert load(stopped.value.checkpoint)["step"] == 5  # saved atomically, loads weights-only
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.undo()
    same_run(train(replace(config, resume=True)), reference)


def test_sigterm_to_a_real_train_prints_the_resume_command(fixture_file, tmp_path, reference):
    config = tiny(fixture_file, tmp_path / "run", steps=STEPS, checkpoint_interval=2)
    proc = subprocess.Popen([sys.executable, "-m", "carsynth", *flags(config), "--overwrite"],
                            cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = Path(config.out) / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 130
    last = proc.stderr.read().splitlines()[-1]
    assert last.startswith("carsynth: interrupted at step "), last
    command = last.split("; continue with: ")[1]
    assert command == shlex.join(["carsynth", *flags(config), "--resume"])
    assert cli.main(shlex.split(command)[1:]) == 0
    same_run(Path(config.out), reference)


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(
    fixture_file, tmp_path, reference
):
    """8 SIGKILLs of one run: one during start-up, seven at random moments of training (steps,
    metrics rows, checkpoint writes), each run resuming the one killed before it."""
    config = tiny(fixture_file, tmp_path / "run", steps=STEPS, checkpoint_interval=1)
    rng = random.Random(17)
    reached = [0]
    for i in range(8):
        proc = subprocess.Popen([sys.executable, "-m", "carsynth", *flags(config), "--resume"],
                                cwd=ROOT, env=ENV, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 120
        if i:  # train to a random step past the last kill (leaving steps for the kills still to
            # come, whatever the machine's speed), then kill within the next step or so
            low = reached[-1] + 1
            target = rng.randint(low, max(low, STEPS - 2 * (8 - i)))
            while (max([int(p.stem[5:]) for p in rundir.checkpoints(config.out)] or [0])
                   < target):  # fmt: skip
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.01) if i else rng.uniform(0.3, 1.0))
        proc.kill()
        proc.wait()
        for checkpoint in rundir.checkpoints(config.out):
            rundir.read_checkpoint(checkpoint)  # weights_only=True, every key present
        if (Path(config.out) / "config.json").exists():
            rundir.read_run_config(config.out)
        reached.append(max([load(p)["step"] for p in rundir.checkpoints(config.out)] or [0]))
    assert reached[-1] < STEPS, "the run finished before the last kill"
    same_run(train(replace(config, resume=True)), reference)


# -------------------------------------------------------------------------- damaged checkpoints
class CreatesAFile:
    """A pickle that would run code: it creates a file when unpickled without weights_only."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def damage(path: Path, kind: str, marker: Path) -> None:
    good = path.read_bytes()
    if kind == "random bytes":
        path.write_bytes(random.Random(0).randbytes(len(good)))
    elif kind == "0 bytes":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "missing keys":
        torch.save({"step": 4, "generator": {}}, path)
    elif kind == "wrong shapes":
        state = torch.load(path, weights_only=True)
        state["generator"] = {k: torch.zeros(1, 1) for k in state["generator"]}
        torch.save(state, path)
    elif kind == "plain pickle":
        path.write_bytes(pickle.dumps({"step": 4, "generator": {}}))
    elif kind == "malicious pickle":
        buffer = io.BytesIO()
        torch.save(CreatesAFile(marker), buffer)
        path.write_bytes(buffer.getvalue())


KINDS = ["random bytes", "0 bytes", "truncated", "missing keys", "wrong shapes", "plain pickle",
         "malicious pickle"]  # fmt: skip


@pytest.fixture(scope="module")
def four_steps(fixture_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("four") / "run"
    return train(tiny(fixture_file, out, steps=4, checkpoint_interval=2))


@pytest.mark.parametrize("kind", KINDS)
def test_bad_latest_checkpoint_falls_back_to_the_previous(
    four_steps, tmp_path, capsys, kind, fixture_file
):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    marker = tmp_path / "code-ran"
    damage(run / "checkpoints" / "ckpt_0000004.pt", kind, marker)
    config = tiny(fixture_file, run, steps=6, checkpoint_interval=2)
    assert cli.main([*flags(config), "--resume"]) == 0
    err = capsys.readouterr().err
    (warning,) = [line for line in err.splitlines() if "previous good checkpoint" in line]
    assert "ckpt_0000004.pt" in warning and "previous good checkpoint ckpt_0000002.pt" in warning
    assert "weights_only=False" not in err
    assert not marker.exists()  # the malicious pickle never ran
    assert (run / "checkpoints" / "ckpt_0000004.pt.unreadable").exists()  # kept for a look
    fresh = train(tiny(fixture_file, tmp_path / "fresh", steps=6, checkpoint_interval=2))
    assert_same_state(load(rundir.latest_checkpoint(run)), load(rundir.latest_checkpoint(fresh)))


def test_no_good_checkpoint_is_one_line_and_rewrites_nothing(four_steps, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    marker = tmp_path / "code-ran"
    damage(run / "checkpoints" / "ckpt_0000004.pt", "malicious pickle", marker)
    damage(run / "checkpoints" / "ckpt_0000002.pt", "0 bytes", marker)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    config = tiny(ROOT / "data" / "carracing_small.h5", run, steps=6)
    assert cli.main([*flags(config), "--resume"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"carsynth: error: {run}: no checkpoint loads: "), line
    assert "refused by torch.load(weights_only=True)" in line and "empty file" in line
    assert "weights_only=False" not in line and not marker.exists()
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert after == before  # config.json, metrics, checkpoints: untouched


def test_export_uses_the_newest_loadable_checkpoint(four_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    damage(run / "checkpoints" / "ckpt_0000004.pt", "truncated", tmp_path / "x")
    assert rundir.generator_checkpoint(run).name == "ckpt_0000002.pt"
    rundir.load_generator(run)  # falls back too


# --------------------------------------------------------------- run directory files, partial runs
def test_config_json_that_is_not_json_is_one_line(four_steps, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    (run / "config.json").write_text('{"config": {"nz": 8')  # cut short
    config = tiny(ROOT / "data" / "carracing_small.h5", run, steps=6)
    assert cli.main([*flags(config), "--resume"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"carsynth: error: {run / 'config.json'}: not JSON"), line
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "s.h5")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "config.json: not JSON" in line


def test_torn_metrics_line_is_repaired_on_resume(fixture_file, tmp_path, reference, capsys):
    config = tiny(fixture_file, tmp_path / "run", steps=8, checkpoint_interval=2)
    train(config)
    metrics = Path(config.out) / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 10, "d_lo')  # a kill mid-write
    assert cli.main([*flags(replace(config, steps=STEPS)), "--resume"]) == 0
    assert "dropped 1 unreadable line(s)" in capsys.readouterr().err
    same_run(Path(config.out), reference)


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_run_killed_before_config_json_is_no_dead_end(fixture_file, tmp_path, flag):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "samples").mkdir()
    (out / ".config.json.123.tmp").write_text("{")
    assert cli.main([*flags(tiny(fixture_file, out, steps=2)), flag]) == 0
    assert load(rundir.latest_checkpoint(out))["step"] == 2


def test_a_folder_with_other_files_is_still_refused(fixture_file, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "thesis.tex").write_text("mine")
    assert cli.main([*flags(tiny(fixture_file, out, steps=2)), "--overwrite"]) == 2
    assert "not a carsynth run directory" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "mine"


# ------------------------------------------------------------------------------------ divergence
def test_exploding_loss_stops_with_one_line_and_keeps_the_good_checkpoint(
    fixture_file, tmp_path, monkeypatch, capsys
):
    calls = []
    real = training_steps.generator_step

    def exploding(*args, **kwargs):  # finite, but far beyond any GAN's loss from call 5 on
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * 1e9 if len(calls) >= 5 else loss

    monkeypatch.setattr("carsynth.training.loop.generator_step", exploding)
    config = tiny(fixture_file, tmp_path / "run", steps=10, log_interval=2, checkpoint_interval=2)
    assert cli.main([*flags(config), "--quiet"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("carsynth: error: g_loss = ") and "beyond +-1e+06" in line, line
    assert load(rundir.latest_checkpoint(config.out))["step"] == 4


def test_exploding_weights_stop_the_run(fixture_file, tmp_path, monkeypatch):
    calls = []
    real = training_steps.generator_step

    def blow_up(generator, *args, **kwargs):
        calls.append(1)
        loss = real(generator, *args, **kwargs)
        if len(calls) == 3:
            with torch.no_grad():
                next(generator.parameters()).mul_(1e7)
        return loss

    monkeypatch.setattr("carsynth.training.loop.generator_step", blow_up)
    config = tiny(fixture_file, tmp_path / "run", steps=10, log_interval=2, checkpoint_interval=2)
    with pytest.raises(TrainingDiverged, match=r"a weight reached .* by step 4, beyond 10000"):
        train(config)
    assert load(rundir.latest_checkpoint(config.out))["step"] == 2


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), 1e6, 1.5, 0.0, -1e-4])
def test_learning_rate_must_be_finite_and_in_range(lr):
    with pytest.raises(UsageError, match=r"--lr must be in \(0, 1\]"):
        check_config(TrainConfig(data="d", out="o", lr=lr))


# ------------------------------------------------------------------------------------ full disk
def test_full_disk_is_one_line_and_keeps_the_checkpoints(fixture_file, tmp_path, capsys):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        config = tiny(fixture_file, disk / "run", steps=400, log_interval=1, sample_interval=1,
                      checkpoint_interval=1, keep_checkpoints=2)  # fmt: skip
        code = cli.main([*flags(config), "--keep-checkpoints", "2", "--quiet"])
        (line,) = capsys.readouterr().err.splitlines()
        assert code == 2
        assert line.startswith(f"carsynth: error: {config.out}: no space left on device"), line
        assert "continue with --resume" in line
        for checkpoint in rundir.checkpoints(config.out):
            rundir.read_checkpoint(checkpoint)
        assert rundir.checkpoints(config.out)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# --------------------------------------------------------------------------------------- logging
def test_log_lines_off_a_terminal_and_quiet(fixture_file, tmp_path, capsys):
    config = tiny(fixture_file, tmp_path / "run", steps=4)
    assert cli.main(flags(config)) == 0  # --no-progress: lines, not silence
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if " carsynth: train: " in line]
    assert re.fullmatch(r"\d\d:\d\d:\d\d carsynth: train: 0/4 steps \(0%\)", lines[0]), lines
    assert "train: 4/4 steps (100%), " in lines[-1] and "ETA 0:00:00, d_loss=" in lines[-1]
    assert "g_loss=" in lines[-1] and "img/s=" in lines[-1]
    assert "\r" not in err
    assert cli.main([*flags(config), "--overwrite", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------- run
@pytest.mark.parametrize("where", ["collect", "train"])
def test_run_interrupted_says_how_to_continue(tmp_path, monkeypatch, capsys, where):
    from carsynth import pipeline

    def stop(config):
        if where == "train":
            raise TrainingInterrupted(3, Path(config.out) / "checkpoints" / "ckpt_0000003.pt")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "collect", stop)
    monkeypatch.setattr(pipeline, "_collection_finished", lambda *a: where == "train")
    monkeypatch.setattr("carsynth.training.loop.train", stop)
    argv = ["run", "--preset", "test", "--out", str(tmp_path / "p"), "--no-progress"]
    assert cli.main(argv) == 130
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith(
        f"what was finished is stored; continue with: {shlex.join(['carsynth', *argv])}"
    )
    if where == "train":
        assert line.startswith("carsynth: interrupted at step 3; checkpoint ")
