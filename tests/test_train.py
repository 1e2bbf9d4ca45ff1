"""The training loop: steps, data, run directory, resume, divergence, bad inputs, DDP and CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT

from carsynth import losses, monitor, storage
from carsynth.errors import UsageError
from carsynth.models import Discriminator, Generator
from carsynth.rundir import (
    FINGERPRINT_BYTES,
    fingerprint,
    latest_checkpoint,
    load_generator,
    read_run_config,
    run_frames,
    same_data,
)
from carsynth.sampling import generate_frames
from carsynth.training import (
    StreamingFrames,
    TrainConfig,
    TrainingCollapsed,
    TrainingDiverged,
    discriminator_step,
    epoch_order,
    generator_step,
    make_objective,
    train,
)

torch.set_num_threads(1)  # tiny networks: threads only fight over the two shared cores
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def tiny(data: Path, out: Path, **changes) -> TrainConfig:
    """A config small enough for a test: 8-channel networks, batch 16, a few steps."""
    base = TrainConfig(
        data=str(data), out=str(out), nz=8, ngf=8, ndf=8, batch_size=16, steps=6,
        log_interval=2, sample_interval=3, checkpoint_interval=3, progress=False, device="cpu",
    )  # fmt: skip
    return replace(base, **changes)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "carsynth", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=ENV,
    )  # fmt: skip


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same_state(a, b) -> None:
    """Nested state dicts are exactly equal (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    else:
        assert a == b


# ------------------------------------------------------------------------------------ steps
@pytest.mark.parametrize("fm", [False, True])
def test_each_step_updates_only_its_network(fm: bool) -> None:
    torch.manual_seed(0)
    g, d = Generator(8, 8), Discriminator(8)
    opt_g = torch.optim.Adam(g.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(d.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, z = torch.rand(4, 3, 64, 64) * 2 - 1, torch.randn(4, 8, 1, 1)

    def snapshot(m):
        return [p.detach().clone() for p in m.parameters()]

    g0, d0 = snapshot(g), snapshot(d)
    config = TrainConfig(data="", out="", fm=fm)
    fake = g(z)
    stats = discriminator_step(d, opt_d, scaler, x, fake, make_objective(config))
    assert all(torch.equal(a, b) for a, b in zip(g0, g.parameters(), strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(d0, d.parameters(), strict=True))
    assert stats.shape == (4,) and 0 < stats[1] < 1 and 0 < stats[2] < 1

    d1 = snapshot(d)
    g_loss = generator_step(g, d, opt_g, scaler, x, fake, make_objective(config))
    assert all(torch.equal(a, b) for a, b in zip(d1, d.parameters(), strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(g0, g.parameters(), strict=True))
    assert all(p.requires_grad for p in d.parameters())  # unfrozen again
    with torch.no_grad():
        gen_logits, gen_features = d(fake)
        _, real_features = d(x)
    # The loss is computed before the generator's update, against the updated discriminator.
    if fm:
        expected = losses.feature_matching_loss(real_features, gen_features)
    else:
        expected = losses.g_nonsaturating_loss(gen_logits)
    assert torch.allclose(g_loss, expected, rtol=1e-4)


def test_wgan_gp_run(fixture_file: Path, tmp_path: Path) -> None:
    # 1400 frames / batch 16 = 87 batches an epoch, 5 critic batches per generator step.
    run = train(tiny(fixture_file, tmp_path / "run", loss="wgan-gp", lr=1e-4, beta1=0, beta2=0.9))
    record = read_run_config(run)
    assert record["critic_steps"] == 5 and record["steps_per_epoch"] == 87 / 5
    state = load(latest_checkpoint(run))
    assert not any("running_mean" in key for key in state["discriminator"])  # no batch norm
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["d_loss"]) and np.isfinite(r["g_loss"]) for r in rows)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize(
    "options",
    [
        {"loss": "wgan-gp", "critic_steps": 2, "minibatch_kernels": 3, "historical_weight": 0.1},
        {"unrolled_steps": 2, "minibatch_kernels": 3, "real_label": 0.9},
    ],
)
def test_mixed_precision_with_every_option(
    fixture_file: Path, tmp_path: Path, amp: str, options: dict
) -> None:
    # CPU autocast runs the same code path as CUDA's; fp16 adds the grad scaler, which must
    # cope with several critic steps per generator step and with the unrolled lookahead.
    config = tiny(fixture_file, tmp_path / "run", amp=amp, fm=True, adv_weight=0.1, steps=3,
                  **options)  # fmt: skip
    run = train(config)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(list(r.values())).all() for r in rows)
    scaler = load(latest_checkpoint(run))["scaler"]
    assert ("scale" in scaler) == (amp == "fp16")


# ------------------------------------------------------------------------------------- data
def test_epoch_order_is_a_seeded_permutation_in_blocks() -> None:
    plain = epoch_order(10, epoch=0, seed=1, block=None)
    assert sorted(plain) == list(range(10))
    assert np.array_equal(plain, epoch_order(10, 0, 1, None))
    assert not np.array_equal(plain, epoch_order(10, 1, 1, None))
    blocked = epoch_order(10, 0, 1, block=4)
    assert sorted(blocked) == list(range(10))
    # Visited block by block: positions of one block are consecutive in the order.
    runs = [b for i, b in enumerate(blocked // 4) if i == 0 or b != blocked[i - 1] // 4]
    assert sorted(runs) == [0, 1, 2]


def test_streaming_reader_returns_the_right_frames(fixture_file: Path) -> None:
    with storage.open_frame_file(fixture_file) as f:
        rows = np.concatenate([np.arange(a, b) for a, b in f.frame_ranges("train")])
        source = StreamingFrames(f, rows, block=100, device=torch.device("cpu"))
        order = epoch_order(len(rows), 0, 0, block=100)
        source.start_epoch(order)
        positions = order[90:130]  # crosses from one block into the next
        assert len(np.unique(positions // 100)) == 2
        expected = f.frames[:][rows[positions]]
        grouped = np.argsort(positions // 100, kind="stable")  # the reader groups by block
        assert np.array_equal(source.batch(90, 40).numpy(), expected[grouped])
        assert len(source.cache) <= 2


def test_streaming_run_trains(fixture_file: Path, tmp_path: Path) -> None:
    run = train(tiny(fixture_file, tmp_path / "run", max_memory_frames=64, steps=4))
    assert latest_checkpoint(run).name == "ckpt_0000004.pt"


# -------------------------------------------------------------------------------- run files
def test_run_directory_contents(fixture_file: Path, tmp_path: Path) -> None:
    run = train(tiny(fixture_file, tmp_path / "run", fm=True, keep_checkpoints=1))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt_0000006.pt"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step_0000003.png",
        "step_0000006.png",
    ]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for row in rows:
        assert row["images_per_s"] > 0 and row["sample_diversity"] > 0
        assert 0 < row["d_real"] < 1 and 0 < row["d_fake"] < 1
        assert row["g_loss"] > 0 and row["fm_distance"] > 0
    record = read_run_config(run)
    assert record["config"]["fm"] is True and record["config"]["lr"] == 2e-4
    assert record["data"]["holdout_seeds"] == [3]
    assert record["data"]["train_frames"] == 1400 and record["data"]["holdout_frames"] == 200
    assert record["data"]["fingerprint"]["size"] == fixture_file.stat().st_size
    assert record["versions"]["torch"] == torch.__version__
    state = load(latest_checkpoint(run))
    assert state["step"] == 6
    assert {"generator", "discriminator", "ema", "opt_g", "opt_d", "scaler", "rng_cpu"} <= set(
        state
    )
    g = load_generator(run)
    assert not g.training
    assert generate_frames(g, 0, 0, 2).shape == (2, 64, 64, 3)


def test_run_frames_are_the_split(fixture_file: Path, tmp_path: Path) -> None:
    run = train(tiny(fixture_file, tmp_path / "run", steps=1))
    with storage.open_frame_file(fixture_file) as f:
        assert np.array_equal(run_frames(run, "train"), f.read("train"))
        assert np.array_equal(run_frames(run, "holdout"), f.read("holdout"))
    run = train(tiny(fixture_file, tmp_path / "frac", steps=1, holdout=0.5))
    seeds = [s for s in range(8) if storage.is_holdout(s, 0.5)]
    assert read_run_config(run)["data"]["holdout_seeds"] == seeds
    assert len(run_frames(run, "holdout")) == 200 * len(seeds)


def test_epochs_budget(fixture_file: Path, tmp_path: Path) -> None:
    # 1400 training frames / batch 16 = 87 steps an epoch; 0.05 epochs -> ceil(4.35) = 5 steps.
    run = train(tiny(fixture_file, tmp_path / "run", steps=None, epochs=0.05))
    assert read_run_config(run)["steps"] == 5
    assert load(latest_checkpoint(run))["step"] == 5


def test_short_run_moves_sample_colour_towards_real(fixture_file: Path, tmp_path: Path) -> None:
    config = tiny(fixture_file, tmp_path / "run", nz=16, ngf=16, ndf=16, fm=True)
    run = train(replace(config, steps=100, lr=1e-3, ema_decay=0.9, log_interval=50))
    real = run_frames(run, "train").reshape(-1, 3).mean(0)  # about (89, 160, 89): grass green
    torch.manual_seed(1)
    before = generate_frames(Generator(16, 16).eval(), 0, 0, 256).reshape(-1, 3).mean(0)
    after = generate_frames(load_generator(run), 0, 0, 256).reshape(-1, 3).mean(0)
    assert np.abs(before - 127.5).max() < 3  # an untrained generator is mid-grey
    # Measured: distance 64 -> 33, green - red 0 -> 34.
    assert np.linalg.norm(after - real) < 0.7 * np.linalg.norm(before - real)
    assert after[1] - after[0] > 15


def test_historical_average_is_the_mean_of_all_parameter_sets(
    fixture_file: Path, tmp_path: Path
) -> None:
    config = tiny(fixture_file, tmp_path / "run", historical_weight=1.0)

    def flat(generator: Generator) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in generator.parameters()])

    torch.manual_seed(config.seed)  # the run's initial generator: the first draws after seeding
    snapshots = [flat(Generator(8, 8))]
    for steps in (1, 2, 3):
        run = train(replace(config, out=str(tmp_path / f"run{steps}"), steps=steps))
        state = load(latest_checkpoint(run))
        generator = Generator(8, 8)
        generator.load_state_dict(state["generator"])
        snapshots.append(flat(generator))
    # After 3 updates the running mean covers the initial parameters and the 3 updated sets.
    mean = torch.cat([h.flatten() for h in state["history_g"]])
    assert torch.allclose(mean, torch.stack(snapshots).mean(0), atol=1e-6)


def test_collapse_monitor_logs_and_stops(
    fixture_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Steps 2 and 4 draw near-identical grey frames, as every fresh generator does: the check
    # fails, but that is not yet a collapse. Once a check has passed (forced at step 6 here),
    # a later failure is, and --stop-on-collapse ends the run there.
    config = tiny(fixture_file, tmp_path / "run", steps=20, monitor_interval=2, monitor_samples=64,
                  monitor_k=5, checkpoint_interval=10)  # fmt: skip
    real_check = monitor.collapse_check
    calls = []

    def check(*args, **kwargs):
        result = real_check(*args, **kwargs)
        calls.append(result)
        if len(calls) == 3:
            result = replace(result, min_ratio=0.0, max_duplicate_share=1.0)  # a passing check
        return result

    monkeypatch.setattr(monitor, "collapse_check", check)
    with pytest.raises(TrainingCollapsed, match="stopped at step 8: collapse: generated frames"):
        train(replace(config, stop_on_collapse=True))
    assert latest_checkpoint(config.out).name == "ckpt_0000008.pt"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["collapse_passed"] for r in rows] == [False, False, True, False]
    assert [r["collapsed"] for r in rows] == [False, False, False, True]
    assert rows[0]["collapse_ratio"] < 0.5
    assert rows[0]["ndb"] == 1.0  # every frame in one bin: all 5 bins differ from the real shares

    run = train(replace(config, out=str(tmp_path / "watch"), steps=4))  # monitor only: no stop
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if "ndb" in r] == [2, 4]


# ----------------------------------------------------------------------------------- resume
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"real_label": 0.9, "minibatch_kernels": 4, "historical_weight": 0.5, "fm": True},
        {"unrolled_steps": 2},
        {"fm": True, "fm_moments": 2, "spectral_norm": True, "diffaugment": "color,translation,"
         "cutout", "lr_g": 1e-4, "lr_d": 4e-4, "ema_half_life": 500.0,
         "ema_rampup": 0.5, "fm_layer": "1,4"},
    ],
)  # fmt: skip
def test_resume_is_bit_identical(fixture_file: Path, tmp_path: Path, changes: dict) -> None:
    whole = train(tiny(fixture_file, tmp_path / "whole", steps=8, checkpoint_interval=4, **changes))
    part = train(tiny(fixture_file, tmp_path / "part", steps=4, checkpoint_interval=4, **changes))
    train(tiny(fixture_file, part, steps=8, checkpoint_interval=4, resume=True, **changes))
    assert_same_state(load(latest_checkpoint(whole)), load(latest_checkpoint(part)))
    rows = [
        [json.loads(line)["d_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (whole, part)
    ]
    assert rows[0] == rows[1] and len(rows[0]) == 4


def test_resume_after_sigkill(fixture_file: Path, tmp_path: Path) -> None:
    config = tiny(fixture_file, tmp_path / "killed", steps=16, checkpoint_interval=2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "carsynth", "train", "--data", str(fixture_file),
         "--out", config.out, "--nz", "8", "--ngf", "8", "--ndf", "8", "--batch-size", "16",
         "--steps", "1000", "--log-interval", "2", "--sample-interval", "3",
         "--checkpoint-interval", "2", "--device", "cpu", "--no-progress"],
        cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(Path(config.out).glob("checkpoints/ckpt_*.pt")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert load(latest_checkpoint(config.out))["step"] < 16
    resumed = train(replace(config, resume=True))
    whole = train(replace(config, out=str(tmp_path / "whole")))
    assert_same_state(load(latest_checkpoint(whole)), load(latest_checkpoint(resumed)))


def test_resume_refuses_changed_settings_and_overwrite_replaces(
    fixture_file: Path, tmp_path: Path
) -> None:
    run = train(tiny(fixture_file, tmp_path / "run", steps=2))
    with pytest.raises(UsageError, match=r"differ from the run: \['lr', 'nz'\]"):
        train(tiny(fixture_file, run, steps=4, nz=4, lr=1e-3, resume=True))
    assert load(latest_checkpoint(run))["step"] == 2
    train(tiny(fixture_file, run, steps=1, overwrite=True))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["ckpt_0000001.pt"]


def test_resume_accepts_a_touched_data_file_and_refuses_a_changed_one(
    fixture_file: Path, tmp_path: Path
) -> None:
    data = tmp_path / "real.h5"
    shutil.copy(fixture_file, data)
    run = train(tiny(data, tmp_path / "run", steps=2))
    # Copied or touched (rsync without -t, a fresh clone): the same frames, so resume works.
    os.utime(data, ns=(1, 1))
    train(tiny(data, run, steps=4, resume=True))
    assert load(latest_checkpoint(run))["step"] == 4
    # Changed contents: refused, the run untouched.
    with h5py.File(data, "a") as f:
        f.attrs["policy"] = "something else"
    with pytest.raises(UsageError, match="the data file changed since the run started"):
        train(tiny(data, run, steps=6, resume=True))
    assert load(latest_checkpoint(run))["step"] == 4


def test_resume_accepts_the_same_paths_spelled_differently(
    fixture_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bug: "./runs/x" or an absolute path for "runs/x" was refused as a changed setting.
    monkeypatch.chdir(tmp_path)
    shutil.copy(fixture_file, tmp_path / "real.h5")
    train(tiny(Path("real.h5"), Path("runs/x"), steps=2))
    train(tiny(Path("./real.h5"), Path("./runs/x"), steps=3, resume=True))
    train(tiny(tmp_path / "real.h5", tmp_path / "runs" / "x", steps=4, resume=True))
    assert load(latest_checkpoint(tmp_path / "runs" / "x"))["step"] == 4


def test_loss_dependent_defaults_live_in_the_api(fixture_file: Path, tmp_path: Path) -> None:
    assert TrainConfig(data="d", out="o").adam == (2e-4, 0.5, 0.999)
    assert TrainConfig(data="d", out="o", loss="wgan-gp").adam == (1e-4, 0.0, 0.9)
    assert TrainConfig(data="d", out="o", loss="wgan-gp", lr=3e-4).adam == (3e-4, 0.0, 0.9)
    assert TrainConfig(data="d", out="o", loss="wgan-gp").critic_updates == 5
    run = train(tiny(fixture_file, tmp_path / "run", loss="wgan-gp", steps=1))
    recorded = read_run_config(run)["config"]
    assert (recorded["lr"], recorded["beta1"], recorded["beta2"]) == (1e-4, 0.0, 0.9)
    betas = load(latest_checkpoint(run))["opt_g"]["param_groups"][0]["betas"]
    assert tuple(betas) == (0.0, 0.9)


def test_feature_layers_agree_with_the_model() -> None:
    from carsynth.models import FEATURE_LAYERS, LOWPASS
    from carsynth.training import config

    assert config.FEATURE_LAYERS == FEATURE_LAYERS
    assert config.LOWPASS == LOWPASS


def test_fingerprint_hashes_head_and_tail(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    blob = bytearray(b"x" * (FINGERPRINT_BYTES * 3))
    path.write_bytes(blob)
    before = fingerprint(path)
    blob[FINGERPRINT_BYTES + 1] = ord("y")  # the middle is not hashed: cheap for huge files
    path.write_bytes(blob)
    assert fingerprint(path) == before
    for at in (0, len(blob) - 1):
        changed = bytearray(blob)
        changed[at] = ord("z")
        path.write_bytes(changed)
        assert not same_data(before, fingerprint(path))
    # A run recorded before the tail hash (size, mtime, head) is compared on size and head.
    old = {"size": before["size"], "mtime_ns": 123, "sha256_head": before["sha256_head"]}
    path.write_bytes(blob)
    assert same_data(old, fingerprint(path))


def test_nan_stops_and_keeps_last_good_checkpoint(
    fixture_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_loss = losses.d_bce_loss

    def poisoned(*args):
        calls.append(1)
        loss = real_loss(*args)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(losses, "d_bce_loss", poisoned)
    config = tiny(fixture_file, tmp_path / "run", steps=10, log_interval=2, checkpoint_interval=2)
    with pytest.raises(TrainingDiverged, match="NaN/Inf by step 6"):
        train(config)
    state = load(latest_checkpoint(config.out))
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["generator"].values())


# ------------------------------------------------------------------------------- bad inputs
def _synthetic(path: Path, size: int, count: int) -> Path:
    storage.create_frame_file(path, kind="synthetic", frame_size=(size, size), action_dim=None,
                              attrs={})  # fmt: skip
    if count:
        storage.append_frames(path, np.zeros((count, size, size, 3), np.uint8))
    return path


@pytest.mark.parametrize(
    "make, changes, message",
    [
        (lambda d: d / "missing.h5", {}, "no such file"),
        (lambda d: h5py.File(d / "plain.h5", "w").close() or d / "plain.h5", {},
         "not a carsynth frame file"),
        (lambda d: _synthetic(d / "small.h5", 32, 20), {}, "frames are 32x32"),
        (lambda d: _synthetic(d / "empty.h5", 64, 0), {}, "no training frames"),
        (lambda d: _synthetic(d / "few.h5", 64, 20), {"batch_size": 32}, "larger than the 20"),
        (lambda d: _synthetic(d / "ok.h5", 64, 20), {"fm_layer": 7}, "--fm-layer"),
        (lambda d: _synthetic(d / "ok.h5", 64, 20), {"holdout": 0.5}, "--holdout needs"),
        (lambda d: _synthetic(d / "ok.h5", 64, 20), {"monitor_interval": 2},
         "--monitor-interval needs held-out"),
        (lambda d: _synthetic(d / "ok.h5", 64, 20), {"monitor_interval": 3},
         "multiple of --log-interval"),
        (lambda d: _synthetic(d / "ok.h5", 64, 20), {"unrolled_steps": 2, "loss": "wgan-gp"},
         "--unrolled-steps works with --loss bce only"),
    ],
)  # fmt: skip
def test_bad_input_writes_nothing(tmp_path: Path, make, changes: dict, message: str) -> None:
    data = make(tmp_path)
    out = tmp_path / "run"
    with pytest.raises(UsageError, match=message):
        train(tiny(data, out, **changes))
    assert not out.exists()


def test_existing_run_is_not_replaced(fixture_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="--overwrite"):
        train(tiny(fixture_file, out))
    with pytest.raises(UsageError, match="not a carsynth run directory"):
        train(tiny(fixture_file, out, overwrite=True))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# -------------------------------------------------------------------------------- CLI, DDP
def test_cli_bad_input_exit_2(fixture_file: Path, tmp_path: Path) -> None:
    result = cli("train", "--data", str(fixture_file), "--out", str(tmp_path / "run"),
                 "--batch-size", "5000")  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"carsynth: error: --batch-size 5000 x 1 processes is larger than the 1400 training "
        f"frames of {fixture_file}"
    ]
    assert not (tmp_path / "run").exists()


def test_cli_unrolled_steps(fixture_file: Path, tmp_path: Path) -> None:
    base = ["train", "--data", str(fixture_file), "--nz", "8", "--ngf", "8", "--ndf", "8",
            "--batch-size", "8", "--steps", "2", "--no-progress", "--device", "cpu"]  # fmt: skip
    bad = cli(*base, "--out", str(tmp_path / "bad"), "--unrolled-steps", "3", "--loss", "wgan-gp")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "carsynth: error: --unrolled-steps works with --loss bce only (Metz et al. unroll the GAN "
        "loss)"
    ]
    assert not (tmp_path / "bad").exists()
    good = cli(*base, "--out", str(tmp_path / "run"), "--unrolled-steps", "3")
    assert good.returncode == 0, good.stderr
    assert read_run_config(tmp_path / "run")["config"]["unrolled_steps"] == 3


@pytest.mark.parametrize("mode", [["--fm"], ["--loss", "wgan-gp", "--critic-steps", "2"]])
def test_ddp_two_cpu_processes(fixture_file: Path, tmp_path: Path, mode: list[str]) -> None:
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--standalone", "-m", "carsynth", "train", "--data", str(fixture_file),
         "--out", str(out), "--nz", "8", "--ngf", "8", "--ndf", "8", "--batch-size", "8",
         "--steps", "3", "--log-interval", "1", "--device", "cpu", "--no-progress", *mode],
        capture_output=True, text=True, timeout=180, cwd=ROOT, env=ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    record = read_run_config(out)
    assert record["world_size"] == 2
    # Each batch takes 2 processes x 8 frames: 1400 // 16 = 87 batches an epoch.
    critic_steps = 2 if "wgan-gp" in mode else 1
    assert record["critic_steps"] == critic_steps
    assert record["steps_per_epoch"] == 87 / critic_steps
    adam = [record["config"][k] for k in ("lr", "beta1", "beta2")]
    assert adam == ([1e-4, 0.0, 0.9] if "wgan-gp" in mode else [2e-4, 0.5, 0.999])
    assert load(latest_checkpoint(out))["step"] == 3
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]
