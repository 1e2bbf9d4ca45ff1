"""The collapse monitor: logged values, --stop-on-collapse, and that it leaves training alone."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURE

from carsynth import monitor as monitor_module
from carsynth import storage
from carsynth.cli import main
from carsynth.errors import UsageError
from carsynth.metrics import NDBBins, collapse_check, ndb, neighbour_space
from carsynth.monitor import KEYS, CollapseMonitor, latent_seed
from carsynth.sampling import generate_frames
from carsynth.train import TrainConfig, latest_checkpoint, load_generator, run_frames, train

torch.set_num_threads(1)
HOLDOUT = 200  # the fixture's one held-out episode; monitor_samples = HOLDOUT uses all of it


def tiny(data: Path, out: Path, **changes) -> TrainConfig:
    base = TrainConfig(
        data=str(data), out=str(out), nz=8, ngf=8, ndf=8, batch_size=16, steps=4,
        log_interval=2, sample_interval=2, checkpoint_interval=2, keep_checkpoints=10,
        progress=False, device="cpu", monitor_interval=2, monitor_samples=HOLDOUT,
    )  # fmt: skip
    return replace(base, **changes)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step run measured by the monitor at steps 2 and 4 (shared by two tests)."""
    return train(tiny(FIXTURE, tmp_path_factory.mktemp("monitor") / "run"))


def test_logged_values_equal_the_metrics_computed_directly(watched: Path) -> None:
    run = watched
    logged = rows(run)
    assert [r["step"] for r in logged] == [2, 4]
    assert (run / "monitor.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train_frames, holdout = run_frames(run, "train"), run_frames(run, "holdout")
    assert len(holdout) == HOLDOUT and len(train_frames) < 10_000  # no subsampling in the monitor
    space = neighbour_space(train_frames)
    bins = NDBBins.fit(train_frames)  # what ndb(train_frames, x) fits: same defaults
    baseline = ndb(train_frames, holdout).score
    for row in logged:
        assert set(KEYS) <= set(row) and "stopped" not in row
        # The EMA generator the monitor measured is the one checkpointed at that step.
        g = load_generator(run, checkpoint=run / "checkpoints" / f"ckpt_{row['step']:07d}.pt")
        fake = generate_frames(g, latent_seed(0), 0, HOLDOUT)
        expected = bins.compare(fake)
        collapse = collapse_check(fake, holdout, space)
        assert row["monitor_ndb"] == pytest.approx(expected.score, abs=1e-12)
        assert row["monitor_js"] == pytest.approx(expected.js_divergence, rel=1e-9)
        assert row["monitor_ndb_baseline"] == pytest.approx(baseline, abs=1e-12)
        assert row["monitor_collapse_ratio"] == pytest.approx(collapse.ratio, rel=1e-6)
        assert row["monitor_duplicate_share"] == pytest.approx(collapse.duplicate_share, abs=1e-12)
        assert row["monitor_collapsed"] is (not collapse.passed)
    # Fixed latents of their own: not the sample grid's, and the same at every measurement.
    assert latent_seed(0) != 0 and latent_seed(0) != latent_seed(1)


def test_monitor_off_logs_nothing_and_on_does_not_change_training(
    watched: Path, fixture_file: Path, tmp_path: Path
) -> None:
    plain = train(tiny(fixture_file, tmp_path / "off", monitor_interval=0))
    assert not any(key.startswith("monitor") for r in rows(plain) for key in r)
    assert not (plain / "monitor.png").exists()
    a = torch.load(latest_checkpoint(watched), weights_only=True)
    b = torch.load(latest_checkpoint(plain), weights_only=True)
    for key in ("generator", "discriminator", "ema"):  # the monitor takes no training randomness
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)


def fake_generate(passing: int):
    """A stand-in for ``generate_frames``: distinct real frames (every 7th training frame) for
    the first ``passing`` calls, then one constant frame repeated (a fully collapsed generator)."""
    with storage.open_frame_file(FIXTURE) as f:
        diverse = f.read("train")[::7]
    calls = []

    def generate(generator, seed, start, count, **kwargs) -> np.ndarray:
        calls.append(count)
        if len(calls) <= passing:
            return diverse[:count]
        return np.full((count, 64, 64, 3), 107, np.uint8)

    return generate


def test_stop_on_collapse_ends_the_run_with_a_checkpoint(
    fixture_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(monitor_module, "generate_frames", fake_generate(passing=1))
    run = train(tiny(fixture_file, tmp_path / "run", steps=10, stop_on_collapse=True))
    logged = rows(run)
    assert [r["step"] for r in logged] == [2, 4]
    assert logged[0]["monitor_collapsed"] is False and "stopped" not in logged[0]
    assert logged[1]["monitor_collapsed"] is True and logged[1]["stopped"] == "collapse"
    assert logged[1]["monitor_collapse_ratio"] < 0.01  # 0 up to float error in the PCA space
    assert logged[1]["monitor_duplicate_share"] == 1.0
    assert latest_checkpoint(run).name == "ckpt_0000004.pt"
    assert load_generator(run).nz == 8
    assert (run / "samples" / "step_0000004.png").is_file()
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("stopped at step 4 (--stop-on-collapse): collapse: generated frames")
    assert line.endswith("as held-out real frames are (minimum 0.50)")


def test_a_generator_collapsed_from_the_start_is_not_stopped(
    fixture_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh DCGAN's outputs are nearly constant: that is "not started", not "collapsed".
    monkeypatch.setattr(monitor_module, "generate_frames", fake_generate(passing=0))
    run = train(tiny(fixture_file, tmp_path / "run", stop_on_collapse=True))
    assert [(r["step"], r["monitor_collapsed"]) for r in rows(run)] == [(2, True), (4, True)]
    assert latest_checkpoint(run).name == "ckpt_0000004.pt"


def test_restore_takes_up_the_history() -> None:
    blank = object.__new__(CollapseMonitor)  # restore needs none of the fitted state
    blank.restore([{"step": 2}, {"step": 4, "monitor_collapsed": True}])
    assert blank.passed_before is False
    blank.restore([{"step": 2, "monitor_collapsed": False}, {"step": 4, "monitor_collapsed": True}])
    assert blank.passed_before is True


def test_bad_settings(fixture_file: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(UsageError, match="--stop-on-collapse needs --monitor-interval"):
        train(tiny(fixture_file, tmp_path / "a", monitor_interval=0, stop_on_collapse=True))
    with pytest.raises(UsageError, match="--monitor-samples must be >= 2"):
        train(tiny(fixture_file, tmp_path / "b", monitor_samples=1))
    frames = np.zeros((120, 64, 64, 3), np.uint8)
    with pytest.raises(UsageError, match="needs held-out frames, got 1"):
        CollapseMonitor(frames, frames[:1])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    code = main(
        ["train", "--data", str(fixture_file), "--out", str(tmp_path / "c"),
         "--log-interval", "2", "--monitor-interval", "3"]
    )  # fmt: skip
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "carsynth: error: --monitor-interval 3 must be a multiple of --log-interval 2 "
        "(the monitor's values go into the metrics rows)"
    )
    assert not (tmp_path / "c").exists()
