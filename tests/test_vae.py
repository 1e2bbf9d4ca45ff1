"""The World Models VAE (scripts/vae_eval.py) and its experiment (scripts/pretrain_vae.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script

from carsynth import storage
from carsynth.files import to_float

vae = load_script("vae_eval")
pretrain = load_script("pretrain_vae")
dev_synthetic = load_script("make_dev_synthetic")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny batches run several times faster on one thread than on two contended cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/pretrain_vae.py"), *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )  # fmt: skip


@pytest.fixture
def synthetic_file(tmp_path: Path) -> Path:
    """A synthetic frame file of 300 seeded random frames."""
    path = tmp_path / "synthetic.h5"
    storage.create_frame_file(
        path, kind="synthetic", frame_size=(64, 64), action_dim=None, attrs={}
    )
    frames = np.random.default_rng(0).integers(0, 256, size=(300, 64, 64, 3), dtype=np.uint8)
    storage.append_frames(path, frames)
    return path


# ------------------------------------------------------------------------------------------ model
def test_shapes_and_ranges() -> None:
    torch.manual_seed(0)
    model = vae.ConvVAE(latent_dim=32)
    x = torch.rand(5, 3, 64, 64)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        recon = model.decode(mu)
        logits, mu2, _ = model(x)
    assert mu.shape == logvar.shape == (5, 32)
    assert recon.shape == (5, 3, 64, 64)
    assert float(recon.min()) >= 0.0 and float(recon.max()) <= 1.0
    assert logits.shape == (5, 3, 64, 64)
    assert torch.equal(mu, mu2)
    # World Models' layer widths: 4 convs 32-64-128-256 down to 2x2, a 1024-wide decoder input.
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256]
    assert all(c.stride == (2, 2) for c in convs)
    assert model.to_mu.in_features == 1024 and model.from_z.out_features == 1024


def test_to_tensor_layout_and_scale() -> None:
    frames = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
    frames[0, 2, 5, 1] = 255
    x = to_float(frames, signed=False)
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.float32
    assert x[0, 1, 2, 5] == 1.0 and float(x.sum()) == 1.0


def test_kl_matches_closed_form_by_hand() -> None:
    mu = torch.tensor([[0.0, 0.0], [1.0, -2.0]])
    logvar = torch.tensor([[0.0, 0.0], [math.log(2.0), math.log(0.5)]])
    # Row 2, per dim 0.5 * (var + mu^2 - 1 - ln var):
    # 0.5 * (2 + 1 - 1 - ln 2) + 0.5 * (0.5 + 4 - 1 + ln 2) = 1 + 1.75 = 2.75 (the logs cancel).
    kl = vae.kl_divergence(mu, logvar)
    torch.testing.assert_close(kl, torch.tensor([0.0, 2.75]))
    std = torch.exp(0.5 * logvar)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, std), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=1)
    torch.testing.assert_close(kl, reference)


def test_loss_terms_known_values_and_kl_floor() -> None:
    x = torch.zeros(2, 3, 4, 4)
    logits = torch.zeros(2, 3, 4, 4)  # sigmoid(0) = 0.5 everywhere
    mu = torch.tensor([[1.0, -2.0], [1.0, -2.0]], requires_grad=True)
    logvar = torch.tensor([[math.log(2.0), math.log(0.5)]] * 2, requires_grad=True)
    loss, recon, kl = vae.vae_loss(x, logits, mu, logvar, "mse", kl_tolerance=0.0)
    assert recon.item() == pytest.approx(48 * 0.25)  # 48 pixels of squared error 0.25
    assert kl.item() == pytest.approx(2.75)
    assert loss.item() == pytest.approx(12.0 + 2.75)
    _, recon_bce, _ = vae.vae_loss(x, logits, mu, logvar, "bce", kl_tolerance=0.0)
    assert recon_bce.item() == pytest.approx(48 * math.log(2.0), rel=1e-6)
    # 2 dims x 2.0 free nats = 4.0 > 2.75: the floor is what is optimised, and it has no gradient.
    loss, _, kl = vae.vae_loss(x, logits, mu, logvar, "mse", kl_tolerance=2.0)
    assert kl.item() == pytest.approx(4.0)
    loss.backward()
    assert torch.count_nonzero(mu.grad) == 0 and torch.count_nonzero(logvar.grad) == 0


def test_reparameterisation_statistics_and_gradient() -> None:
    torch.manual_seed(0)
    mu = torch.full((200_000, 1), 2.0, requires_grad=True)
    logvar = torch.full((200_000, 1), math.log(0.25), requires_grad=True)
    z = vae.reparameterize(mu, logvar)
    assert z.mean().item() == pytest.approx(2.0, abs=0.005)  # std error 0.5 / sqrt(2e5) = 0.0011
    assert z.std().item() == pytest.approx(0.5, abs=0.005)
    z.sum().backward()
    assert torch.all(mu.grad == 1.0)
    # dz/dlogvar = 0.5 * sigma * eps = 0.5 * (z - mu)
    torch.testing.assert_close(logvar.grad, 0.5 * (z - mu).detach())


def test_reconstruction_mse_matches_direct_computation() -> None:
    torch.manual_seed(0)
    model = vae.ConvVAE()
    frames = torch.randint(0, 256, (10, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        x = frames.permute(0, 3, 1, 2).double() / 255
        direct = float(((model.decode(model.encode(x.float())[0]).double() - x) ** 2).mean())
    assert vae.reconstruction_mse(model, frames, batch_size=3) == pytest.approx(direct, rel=1e-5)


# --------------------------------------------------------------------------------------- training
def test_training_reduces_loss_on_fixture(fixture_file: Path) -> None:
    with storage.open_frame_file(fixture_file) as f:
        train, held_out = f.read("train", limit=128), f.read("holdout", limit=64)
    config = vae.VAEConfig(epochs=3, batch_size=32, seed=0)
    result = vae.train_vae(train, held_out, config)
    assert result.steps == 3 * 4
    assert len(result.train_loss) == len(result.eval_mse_curve) == 3
    assert result.train_loss[-1] < 0.7 * result.train_loss[0]
    assert result.eval_mse < result.eval_mse_curve[0]
    assert result.eval_mse < 0.05  # an untrained decoder outputs ~0.5 grey: MSE ~ 0.1
    record = json.loads(json.dumps(result.to_dict()))
    assert record["eval_mse"] == result.eval_mse and record["config"]["epochs"] == 3
    for a, b in zip(result.train_loss, result.train_recon, strict=True):
        assert a >= b  # the loss includes the non-negative (floored) KL term


def test_training_is_deterministic_given_seed(fixture_file: Path) -> None:
    with storage.open_frame_file(fixture_file) as f:
        frames = f.read("train", limit=64)
    config = vae.VAEConfig(epochs=1, batch_size=32, seed=7)
    first = vae.train_vae(frames, frames[:16], config)
    second = vae.train_vae(frames, frames[:16], config)
    assert first.train_loss == second.train_loss and first.eval_mse == second.eval_mse


def test_training_rejects_wrong_frames() -> None:
    good = np.zeros((4, 64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="frames_train must be uint8"):
        vae.train_vae(good.astype(np.float32), good, vae.VAEConfig(epochs=1))
    with pytest.raises(ValueError, match="frames_eval must be uint8"):
        vae.train_vae(good, np.zeros((4, 96, 96, 3), np.uint8), vae.VAEConfig(epochs=1))
    with pytest.raises(ValueError, match="epochs and batch_size must be >= 1"):
        vae.train_vae(good, good, vae.VAEConfig(epochs=0))


# ------------------------------------------------------------------------------------- experiment
def test_training_sets_are_as_specified() -> None:
    real = np.arange(10)[:, None, None, None] * np.ones((1, 64, 64, 3), np.uint8)
    synth = np.full((4, 64, 64, 3), 200, np.uint8)
    sets = pretrain.training_sets(real, synth, small=3)
    a, b, c = sets["a"][0], sets["b"][0], sets["c"][0]
    assert len(a) == 3 and len(b) == 3 + 4 and len(c) == len(b)
    assert np.array_equal(a, real[:3])
    assert np.array_equal(b, np.concatenate([real[:3], synth]))
    assert np.array_equal(c, real[:7])
    assert [sets[k][1:] for k in "abc"] == [(3, 0), (3, 4), (7, 0)]


def test_epoch_budget() -> None:
    assert pretrain.epochs_for(1000, 2000, 5, "steps") == 10
    assert pretrain.epochs_for(2000, 2000, 5, "steps") == 5
    assert pretrain.epochs_for(1000, 2000, 5, "epochs") == 5
    assert pretrain.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert pretrain.mean_std([4.0]) == (4.0, 0.0)


def test_experiment_feeds_each_arm_and_one_held_out_set(
    fixture_file: Path, synthetic_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_train(frames_train, frames_eval, config):
        calls.append((frames_train, frames_eval, config))
        return vae.VAEResult(
            asdict(config), [1.0], [1.0], [0.0], [0.01 * config.seed], 1, 0.0, None
        )

    monkeypatch.setattr(pretrain, "train_vae", fake_train)
    config = pretrain.ExperimentConfig(
        real=str(fixture_file), synthetic=str(synthetic_file), out=str(tmp_path / "r.json"),
        small=400, synthetic_frames=250, seeds=[1, 3], vae=vae.VAEConfig(epochs=2),
    )  # fmt: skip
    result = pretrain.run_experiment(config, progress=False)
    with storage.open_frame_file(fixture_file) as f:
        real_train, held_out = f.read("train"), f.read("holdout")
    with storage.open_frame_file(synthetic_file) as f:
        synth = f.read()[:250]
    assert len(calls) == 6
    assert [c[2].seed for c in calls] == [1, 3, 1, 3, 1, 3]
    for _, frames_eval, _ in calls:
        assert np.array_equal(frames_eval, held_out)  # the fixture's holdout episode, 200 frames
    assert np.array_equal(calls[0][0], real_train[:400])
    assert np.array_equal(calls[2][0], np.concatenate([real_train[:400], synth]))
    assert np.array_equal(calls[4][0], real_train[:650])
    assert [calls[i][2].epochs for i in (0, 2, 4)] == [round(2 * 650 / 400), 2, 2]
    arms = result["arms"]
    assert [arms[k]["train_frames"] for k in "abc"] == [400, 650, 650]
    assert arms["a"]["eval_mse"] == [0.01, 0.03]
    assert arms["a"]["eval_mse_mean"] == pytest.approx(0.02)
    assert arms["a"]["eval_mse_std"] == pytest.approx(0.02 / math.sqrt(2))
    assert result["eval_frames"] == 200


def test_script_end_to_end_writes_json_and_markdown(
    fixture_file: Path, synthetic_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "vae.json"
    result = _run_script(
        "--real", str(fixture_file), "--synthetic", str(synthetic_file), "--out", str(out),
        "--small", "40", "--synthetic-frames", "40", "--batch-size", "40", "--epochs", "1",
        "--seeds", "0", "1", "--eval-frames", "20", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["eval_frames"] == 20
    assert [data["arms"][k]["train_frames"] for k in "abc"] == [40, 80, 80]
    assert [data["arms"][k]["steps"] for k in "abc"] == [2, 2, 2]
    for row in data["arms"].values():
        assert len(row["eval_mse"]) == 2 and all(0 < v < 0.2 for v in row["eval_mse"])
        assert row["eval_mse_mean"] == pytest.approx(np.mean(row["eval_mse"]))
        assert row["eval_mse_std"] == pytest.approx(np.std(row["eval_mse"], ddof=1))
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| (") == 3 and "small real + synthetic" in table
    assert table in result.stdout


def _main(fixture_file: Path, synthetic_file: Path, out: Path, *extra: str) -> int:
    args = ["--real", str(fixture_file), "--synthetic", str(synthetic_file), "--out", str(out)]
    return pretrain.main([*args, *extra, "--no-progress"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--small", "1400"], "arm (c) needs 2800 real train frames"),
        (["--synthetic-frames", "301"], "--synthetic-frames 301 but the file has 300"),
        (["--device", "nonsense"], "--device must be auto, cuda, mps or cpu, got 'nonsense'"),
        (["--epochs", "0"], "--epochs and --batch-size must be >= 1, got 0, 32"),
    ],
)
def test_script_usage_errors(
    fixture_file: Path,
    synthetic_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "vae.json"
    assert _main(fixture_file, synthetic_file, out, *extra) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("pretrain_vae.py: error: ") and message in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists() and not out.with_suffix(".md").exists()


def test_script_refuses_to_overwrite(
    fixture_file: Path, synthetic_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "vae.json"
    out.write_text("earlier result")
    assert _main(fixture_file, synthetic_file, out) == 2
    expected = f"pretrain_vae.py: error: {out} exists; pass --overwrite to replace it\n"
    assert capsys.readouterr().err == expected
    assert out.read_text() == "earlier result" and not out.with_suffix(".md").exists()


# -------------------------------------------------------------------------- development stand-in
def test_dev_synthetic_perturbations() -> None:
    frames = np.random.default_rng(1).integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    assert np.array_equal(dev_synthetic.perturb(frames, rng, 0, 0.0, 0.0), frames)
    shifted = dev_synthetic.perturb(frames, rng, 2, 0.0, 0.0)
    for source, out in zip(frames, shifted, strict=True):
        padded = np.pad(source, ((2, 2), (2, 2), (0, 0)), mode="edge")
        windows = [padded[y : y + 64, x : x + 64] for y in range(5) for x in range(5)]
        assert any(np.array_equal(out, w) for w in windows)


def test_dev_synthetic_writes_a_synthetic_file(fixture_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "dev.h5"
    args = ["--real", str(fixture_file), "--out", str(out), "--source", "30", "--count", "50"]
    assert dev_synthetic.main(args) == 0
    with storage.open_frame_file(out) as f:
        assert f.kind == "synthetic" and f.count() == 50
        assert f.attrs["description"].endswith("not GAN output") and f.attrs["source"] == 30
    assert dev_synthetic.main(args) == 2  # exists, no --overwrite
