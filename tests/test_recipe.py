"""The recipe's levers: DiffAugment, spectral norm, TTUR, the learning-rate decay, EMA half-life,
second-moment and several-block feature matching, one discriminator pass over real and
generated frames; each formula against values worked out by hand or by an independent
computation."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from torch import nn

from carsynth import augment, losses
from carsynth.errors import UsageError
from carsynth.models import Discriminator
from carsynth.training import TrainConfig, discriminator_step, make_objective, train
from carsynth.training.config import check_config, resume_differences

torch.set_num_threads(1)


def config(**changes) -> TrainConfig:
    return replace(TrainConfig(data="x.h5", out="run"), **changes)


# ------------------------------------------------------------------------------ DiffAugment
def test_colour_formulas_by_hand() -> None:
    x = torch.tensor([0.2, -0.4, 0.5]).view(1, 3, 1, 1).repeat(1, 1, 2, 2)
    r = torch.full((1, 1, 1, 1), 0.75)
    assert torch.allclose(augment.brightness(x, r), x + 0.25)
    # channel mean 0.1 at every pixel: (x - 0.1) * 1.5 + 0.1
    expected = torch.tensor([0.25, -0.65, 0.7]).view(1, 3, 1, 1)
    assert torch.allclose(augment.saturation(x, r), expected.expand_as(x))
    # mean over C, H, W is 0.1 too; contrast factor r + 0.5 = 1.25
    expected = torch.tensor([0.225, -0.525, 0.6]).view(1, 3, 1, 1)
    assert torch.allclose(augment.contrast(x, r), expected.expand_as(x))


def test_translation_is_a_zero_filled_shift() -> None:
    x = torch.randn(3, 2, 8, 8)
    dy, dx = torch.tensor([1, -2, 0]), torch.tensor([0, 3, -1])
    out = augment.translate(x, dy, dx)
    for b in range(3):  # independent: a padded copy cut at the shifted window
        padded = torch.zeros(2, 8 + 6, 8 + 6)
        padded[:, 3:11, 3:11] = x[b]
        window = padded[:, 3 + dy[b] : 11 + dy[b], 3 + dx[b] : 11 + dx[b]]
        assert torch.equal(out[b], window)
    assert torch.equal(augment.translate(x, torch.zeros(3, dtype=int), torch.zeros(3, dtype=int)),
                       x)  # fmt: skip


def test_random_translation_stays_within_an_eighth() -> None:
    x = torch.ones(200, 1, 16, 16)
    out = augment.translation(x, torch.Generator().manual_seed(0))
    # a shift of s rows and t columns keeps (16 - |s|)(16 - |t|) ones; |s|, |t| <= 2
    kept = out.sum((1, 2, 3))
    assert kept.min() >= 14 * 14 and (kept < 256).any() and (kept == 256).any()


def test_cutout_zeroes_a_half_size_square() -> None:
    mask = augment.cutout_mask((2, 8, 8), torch.tensor([4, 0]), torch.tensor([4, 7]), (4, 4))
    assert mask.shape == (2, 1, 8, 8)
    assert (~mask[0, 0]).sum() == 16 and not mask[0, 0, 2:6, 2:6].any()
    # centre in the corner: rows -2..1, columns 5..8 -> 2 x 3 inside the image
    assert (~mask[1, 0]).sum() == 6 and not mask[1, 0, 0:2, 5:8].any()
    out = augment.cutout(torch.ones(50, 3, 8, 8), torch.Generator().manual_seed(1))
    zeros = (out == 0).all(1).sum((1, 2))
    assert zeros.max() == 16 and zeros.min() >= 4


def test_augmentation_is_differentiable_and_seeded() -> None:
    policy = augment.parse_policy("color,translation,cutout")
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    out = augment.diff_augment(x, policy, torch.Generator().manual_seed(3))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    again = augment.diff_augment(x.detach(), policy, torch.Generator().manual_seed(3))
    assert torch.equal(out.detach(), again)
    assert augment.diff_augment(x, ()) is x


def test_unknown_policy_is_a_usage_error() -> None:
    with pytest.raises(ValueError, match="blur"):
        augment.parse_policy("color,blur")
    with pytest.raises(UsageError, match="--diffaugment"):
        check_config(config(diffaugment="colour"))


# --------------------------------------------------------------- optimisation and averaging
def test_two_time_scale_learning_rates() -> None:
    assert config().learning_rates == (2e-4, 2e-4)
    assert config(lr=1e-3).learning_rates == (1e-3, 1e-3)
    assert config(lr_g=1e-4, lr_d=4e-4).learning_rates == (1e-4, 4e-4)
    assert config(lr_d=4e-4).resolved()["lr_g"] == 2e-4
    with pytest.raises(UsageError, match="--lr-g"):
        check_config(config(lr_g=0.0))


def test_old_run_configs_resume_with_the_shared_rate() -> None:
    saved = config().resolved()
    del saved["lr_g"], saved["lr_d"]
    assert resume_differences(saved, config()) == []
    assert resume_differences(saved, config(lr_d=4e-4)) == ["lr_d"]
    # a changed lr is reported once, not again as the rates that follow it
    assert resume_differences(config().resolved(), config(lr=1e-3)) == ["lr"]
    assert resume_differences(config(lr_g=1e-4).resolved(), config(lr=1e-3)) == ["lr", "lr_g"]


def test_linear_decay_to_zero_by_hand() -> None:
    # 10 updates, the last half decaying: 5/5, 4/5, ..., 1/5 of the rate
    scales = [config(lr_decay=0.5).lr_scale(step, 10) for step in range(10)]
    assert scales == pytest.approx([1, 1, 1, 1, 1, 1.0, 0.8, 0.6, 0.4, 0.2])
    assert [config(lr_decay=1.0).lr_scale(s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert {config().lr_scale(s, 4) for s in range(4)} == {1.0}
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(UsageError, match="--lr-decay"):
            check_config(config(lr_decay=bad))


def test_decayed_rates_reach_the_optimisers_and_survive_a_resume(
    fixture_file: Path, tmp_path: Path
) -> None:
    from carsynth.rundir import checkpoint_path

    tiny = dict(data=str(fixture_file), nz=8, ngf=8, ndf=8, batch_size=16, steps=8,
                lr_g=1e-4, lr_d=3e-4, lr_decay=0.5, checkpoint_interval=4, progress=False,
                device="cpu")  # fmt: skip
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **tiny))
    state = torch.load(checkpoint_path(whole, 8), weights_only=True)
    # the 8th update (the last of 4 decaying ones) ran at 1/4 of each rate
    assert state["opt_g"]["param_groups"][0]["lr"] == pytest.approx(1e-4 / 4)
    assert state["opt_d"]["param_groups"][0]["lr"] == pytest.approx(3e-4 / 4)
    # a run killed after its step-4 checkpoint resumes on the same schedule, bit for bit
    part = tmp_path / "part"
    shutil.copytree(whole, part)
    checkpoint_path(part, 8).unlink()
    train(TrainConfig(out=str(part), resume=True, **tiny))
    resumed = torch.load(checkpoint_path(part, 8), weights_only=True)
    for key in ("generator", "discriminator", "ema"):
        for name, value in state[key].items():
            assert torch.equal(value, resumed[key][name]), (key, name)


def test_ema_half_life_in_images() -> None:
    # after half_life / batch steps the old weights count half: beta ** (h / b) = 0.5
    c = config(ema_half_life=6400.0)
    beta = c.ema_beta(64, step=10**6)  # past the warm-up
    assert beta == pytest.approx(0.5 ** (1 / 100))
    assert beta**100 == pytest.approx(0.5)
    assert config(ema_decay=0.99).ema_beta(64, step=10**6) == 0.99
    with pytest.raises(UsageError, match="--ema-half-life"):
        check_config(config(ema_half_life=0.0))


def test_ema_warm_up_and_ramp_up_by_hand() -> None:
    # (1 + t) / (10 + t) caps any decay: at step 2999 it is 0.997, whatever the half-life, so a
    # 3,000-step run averages the same with the default decay and a half-life of 100,000 images
    for c in (config(), config(ema_half_life=100_000.0)):
        assert c.ema_beta(64, 0) == pytest.approx(0.1)
        assert c.ema_beta(64, 2999) == pytest.approx(3000 / 3009)
    # stylegan2-ada's ramp-up instead: half-life min(H, r * images seen)
    c = config(ema_half_life=100_000.0, ema_rampup=0.5)
    assert c.ema_beta(64, 99) == pytest.approx(0.5 ** (64 / (0.5 * 6400)))  # 3,200 images
    assert c.ema_beta(64, 2999) == pytest.approx(0.5 ** (64 / 96_000))
    assert c.ema_beta(64, 10**6) == pytest.approx(0.5 ** (64 / 100_000))
    for bad in (config(ema_rampup=0.5), config(ema_half_life=1e5, ema_rampup=0.0)):
        with pytest.raises(UsageError, match="--ema-rampup"):
            check_config(bad)


@pytest.mark.parametrize("changes, beta", [
    ({}, 0.1),  # the warm-up (1 + 0) / (10 + 0)
    ({"ema_half_life": 1e6, "ema_rampup": 0.25}, 0.5**4),  # half-life 0.25 x 16 images seen
])  # fmt: skip
def test_the_loop_averages_at_the_configured_decay(
    fixture_file: Path, tmp_path: Path, changes: dict, beta: float
) -> None:
    from carsynth.models import Generator

    run = train(TrainConfig(data=str(fixture_file), out=str(tmp_path / "r"), nz=8, ngf=8, ndf=8,
                            batch_size=16, steps=1, progress=False, device="cpu",
                            **changes))  # fmt: skip
    state = torch.load(run / "checkpoints" / "ckpt_0000001.pt", weights_only=True)
    torch.manual_seed(0)  # the seeded initialisation the EMA starts from (Networks.build)
    start = dict(Generator(8, 8).named_parameters())  # buffers are copied, not averaged
    for name, init in start.items():
        expected = init.detach() + (1 - beta) * (state["generator"][name] - init.detach())
        assert torch.allclose(state["ema"][name], expected, atol=1e-6), name


def test_optimisers_get_their_own_rates(fixture_file: Path, tmp_path: Path) -> None:
    run = train(TrainConfig(data=str(fixture_file), out=str(tmp_path / "r"), nz=8, ngf=8, ndf=8,
                            batch_size=16, steps=1, lr_g=1e-4, lr_d=3e-4, progress=False,
                            device="cpu"))  # fmt: skip
    state = torch.load(run / "checkpoints" / "ckpt_0000001.pt", weights_only=True)
    assert state["opt_g"]["param_groups"][0]["lr"] == 1e-4
    assert state["opt_d"]["param_groups"][0]["lr"] == 3e-4


# -------------------------------------------------------------------------- feature matching
def test_second_moment_feature_matching_by_hand() -> None:
    real = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # means (2, 0), stds (1, 0)
    fake = torch.tensor([[2.0, 1.0], [2.0, -1.0]])  # means (2, 0), stds (0, 1)
    assert losses.feature_matching_loss(real, fake) == 0.0
    # (1 - 0)^2 + (0 - 1)^2, up to the sqrt(1e-8) = 1e-4 floor on a zero spread
    assert losses.feature_matching_loss(real, fake, moments=2) == pytest.approx(2.0, abs=1e-3)
    fake = fake.requires_grad_(True)
    losses.feature_matching_loss(real, fake, moments=2).backward()
    assert torch.isfinite(fake.grad).all()


def test_several_feature_blocks_are_concatenated() -> None:
    torch.manual_seed(0)
    both = Discriminator(ndf=4, fm_layer=(1, 4))
    x = torch.randn(3, 3, 64, 64)
    logits, features = both(x)
    singles = []
    for layer in (1, 4):  # the same weights, one block each
        single = Discriminator(ndf=4, fm_layer=layer)
        single.load_state_dict(both.state_dict())
        single_logits, f = single(x)
        assert torch.equal(single_logits, logits)
        singles.append(f.flatten(1))
    assert features.shape == (3, 4 * 32 * 32 + 32 * 4 * 4)
    assert torch.equal(features, torch.cat(singles, 1))
    # the loss of both blocks is the sum of each block's loss
    real = torch.randn_like(features)
    total = losses.feature_matching_loss(real, features, moments=2)
    split = 4 * 32 * 32
    parts = [losses.feature_matching_loss(real[:, s], features[:, s], moments=2)
             for s in (slice(0, split), slice(split, None))]  # fmt: skip
    assert total.item() == pytest.approx(sum(p.item() for p in parts), rel=1e-6)


def test_fm_layer_lists_parse_and_old_runs_resume() -> None:
    assert config(fm_layer="4,1").fm_layers == (1, 4)
    assert config(fm_layer="2").resolved()["fm_layer"] == "2"
    for bad in ("5", "1,x", "", 7):
        with pytest.raises(UsageError, match="--fm-layer"):
            check_config(config(fm_layer=bad))
    saved = config().resolved()
    saved["fm_layer"] = 4  # runs before several blocks recorded the block as a number
    assert resume_differences(saved, config()) == []
    assert resume_differences(saved, config(fm_layer="1,4")) == ["fm_layer"]


def test_old_boolean_lowpass_runs_resume_unchanged() -> None:
    # runs from before --lowpass last recorded true (every upsampling) or false
    for old, same in ((False, "off"), (True, "all")):
        saved = {**config().resolved(), "lowpass": old}
        assert resume_differences(saved, config(lowpass=same)) == []
        assert resume_differences(saved, config(lowpass="last")) == ["lowpass"]


# ------------------------------------------------------------------------- spectral norm
def test_spectral_norm_bounds_every_convolution() -> None:
    torch.manual_seed(0)
    d = Discriminator(8, spectral_norm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in d.modules()) and d.per_sample
    for _ in range(30):  # power iterations run in training forwards
        d(torch.randn(4, 3, 64, 64))
    d.eval()
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5
    for conv in convs:
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2).item()
        assert sigma == pytest.approx(1.0, abs=0.02)
    assert not Discriminator(8).per_sample


def test_one_forward_over_both_batches_gives_the_same_update() -> None:
    torch.manual_seed(0)
    x, fake = torch.randn(6, 3, 64, 64), torch.randn(6, 3, 64, 64)
    objective = make_objective(config())
    results = []
    for joint in (False, True):
        torch.manual_seed(1)
        d = Discriminator(8, norm=False)
        opt = torch.optim.Adam(d.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        stats = discriminator_step(d, opt, scaler, x, fake, objective, joint=joint)
        results.append((stats, [p.detach().clone() for p in d.parameters()]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_cli_flags_train_and_refuse(fixture_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    common = ["train", "--data", str(fixture_file), "--out", str(out), "--nz", "8", "--ngf", "8",
              "--ndf", "8", "--batch-size", "16", "--steps", "2", "--fm", "--no-progress",
              "--device", "cpu"]  # fmt: skip
    bad = run_cli(*common, "--diffaugment", "color,blur")
    assert bad.returncode == 2 and "--diffaugment" in bad.stderr and not out.exists()
    done = run_cli(*common, "--diffaugment", "color,translation,cutout", "--spectral-norm",
                   "--fm-moments", "2", "--lr-g", "1e-4", "--lr-d", "4e-4",
                   "--ema-half-life", "1000", "--lr-decay", "0.5", "--fm-layer", "4,1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["diffaugment"] == "color,translation,cutout" and saved["spectral_norm"]
    assert (saved["lr_g"], saved["lr_d"], saved["fm_moments"]) == (1e-4, 4e-4, 2)
    assert (saved["lr_decay"], saved["fm_layer"]) == (0.5, "1,4")


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch) -> None:
    # bf16 on a CPU without AVX512-BF16/AMX is emulated and slower than float32: auto keeps it off
    from carsynth import devices

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert devices.autocast_dtype("auto", cuda) == torch.bfloat16
    assert devices.autocast_dtype("off", cuda) is None
    assert devices.autocast_dtype("fp16", cpu) == torch.float16
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda n=native: n)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert devices.autocast_dtype("auto", cpu) == (torch.bfloat16 if native else None)
        assert devices.autocast_dtype("bf16", cpu) == torch.bfloat16
    assert devices.autocast_dtype("auto", torch.device("mps")) is None


def test_lowpass_is_the_binomial_filter_by_hand() -> None:
    from carsynth.models import LowPass

    blur = LowPass()
    impulse = torch.zeros(1, 1, 5, 5)
    impulse[0, 0, 2, 2] = 16.0
    expected = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]])
    assert torch.equal(blur(impulse)[0, 0, 1:4, 1:4], expected)
    assert blur(impulse).sum() == 16.0  # the filter keeps the mean
    flat = torch.full((2, 3, 6, 6), 0.7)
    assert torch.allclose(blur(flat), flat)  # replicated edges: no dark border
    # a checkerboard (+1/-1 from pixel to pixel) has no energy left inside the frame
    checker = (torch.arange(6)[:, None] + torch.arange(6)[None, :]) % 2 * 2.0 - 1.0
    assert blur(checker[None, None])[0, 0, 1:-1, 1:-1].abs().max() == 0


def test_lowpass_runs_train_resume_and_export_with_their_filter(
    fixture_file: Path, tmp_path: Path
) -> None:
    from carsynth.models import Generator, LowPass
    from carsynth.rundir import load_generator

    config = TrainConfig(data=str(fixture_file), out=str(tmp_path / "run"), nz=8, ngf=8, ndf=8,
                         batch_size=16, steps=2, fm=True, lowpass="all", progress=False,
                         device="cpu")  # fmt: skip
    run = train(config)
    generator = load_generator(run)
    assert sum(isinstance(m, LowPass) for m in generator.modules()) == 4
    assert not any("kernel" in key for key in generator.state_dict())  # nothing new to save
    # the filter adds no weights
    plain = Generator(8, 8)
    assert [p.shape for p in generator.parameters()] == [p.shape for p in plain.parameters()]
    with pytest.raises(UsageError, match="differ from the run: \\['lowpass'\\]"):
        train(replace(config, steps=3, resume=True, lowpass="last"))
    resumed = load_generator(train(replace(config, steps=3, resume=True)))
    assert sum(isinstance(m, LowPass) for m in resumed.modules()) == 4


def test_lowpass_last_filters_only_the_output_and_old_runs_still_load(
    fixture_file: Path, tmp_path: Path
) -> None:
    from carsynth.models import Generator, LowPass
    from carsynth.rundir import load_generator

    filters = {mode: [i for i, m in enumerate(Generator(8, 8, mode).net) if isinstance(m, LowPass)]
               for mode in ("off", "last", "all")}  # fmt: skip
    net = Generator(8, 8, "last").net
    assert filters["off"] == [] and len(filters["all"]) == 4
    assert filters["last"] == [len(net) - 2]  # between the last transposed conv and the tanh
    with pytest.raises(ValueError, match="lowpass must be one of"):
        Generator(8, 8, "first")
    with pytest.raises(UsageError, match="--lowpass"):
        check_config(TrainConfig(data="d", out="o", lowpass="first"))
    # a run recorded by the version whose --lowpass was a switch (true: every upsampling)
    config = TrainConfig(data=str(fixture_file), out=str(tmp_path / "run"), nz=8, ngf=8, ndf=8,
                         batch_size=16, steps=1, fm=True, lowpass="all", progress=False,
                         device="cpu")  # fmt: skip
    run = train(config)
    record = json.loads((run / "config.json").read_text())
    record["config"]["lowpass"] = True
    (run / "config.json").write_text(json.dumps(record))
    assert sum(isinstance(m, LowPass) for m in load_generator(run).modules()) == 4
