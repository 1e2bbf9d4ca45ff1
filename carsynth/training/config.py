"""The settings of a training run (:class:`TrainConfig`) and their checks.

Every field carries its help text; the CLI makes one flag per field from it. Settings whose good
value depends on the loss (Adam's learning rate and betas, the critic steps) default to ``None``
and are resolved in one place (:attr:`TrainConfig.adam`, :attr:`TrainConfig.critic_updates`):
DCGAN's Adam (Radford et al. 2015) for "bce", WGAN-GP's (Gulrajani et al. 2017) for "wgan-gp".
config.json records the resolved values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from carsynth.errors import UsageError
from carsynth.flags import option, required

FEATURE_LAYERS = (1, 2, 3, 4)  # carsynth.models.FEATURE_LAYERS, checked equal in the tests
LOSSES = ("bce", "wgan-gp")
AMP = ("auto", "bf16", "fp16", "off")
LOWPASS = ("off", "last", "all")  # carsynth.models.LOWPASS, checked equal in the tests
# Adam (lr, beta1, beta2) per loss: DCGAN's (Radford et al. 2015), WGAN-GP's (Gulrajani et al. 2017)
ADAM = {"bce": (2e-4, 0.5, 0.999), "wgan-gp": (1e-4, 0.0, 0.9)}
CRITIC_STEPS = {"bce": 1, "wgan-gp": 5}
DEFAULT_STEPS = 5000
# Bounds that keep a typo from allocating the machine away: DCGAN-64 at width 1024 already has
# about 0.7e9 generator parameters (Radford et al. use 64 and 128).
MAX_WIDTH = 1024
MAX_NZ = 4096
MAX_LR = 1.0  # Adam steps move each weight by about lr: above 1 a GAN cannot but diverge


@dataclass
class TrainConfig:
    """Every setting of a training run; all of them are recorded in ``config.json``."""

    data: str = required("carsynth frame file to train on")
    out: str = required("run directory to create (or to continue with --resume)")
    # networks (Radford et al. 2015)
    nz: int = option(100, "latent size")
    ngf: int = option(64, "generator width (channels of its last hidden layer)")
    ndf: int = option(64, "discriminator width (channels of its first layer)")
    lowpass: Literal["off", "last", "all"] = option(
        "off", "a [1,2,1] binomial filter in G (no checkerboard; Odena et al. 2016, as StyleGAN): "
        "off, last (after the final upsampling) or all (after each)",
        choices=LOWPASS,
    )  # fmt: skip
    # generator objective
    fm: bool = option(False, "feature-matching generator loss (Salimans et al. 2016)")
    fm_layer: str = option(
        "4", "discriminator block(s) 1..4 whose features are matched, a comma list: 4 = the "
        "last, 1,4 = the first and the last together",
    )  # fmt: skip
    adv_weight: float = option(0.0, "with --fm: weight of an added non-saturating term")
    fm_moments: int = option(
        1, "with --fm: 1 matches feature means (Salimans et al. 2016), 2 also their std devs"
    )
    # the discriminator's inputs and weights
    diffaugment: str = option(
        "", "DiffAugment of every D input, real and fake, in both steps (Zhao et al. 2020): "
        "comma list of color, translation, cutout ('' off)",
    )  # fmt: skip
    spectral_norm: bool = option(
        False, "spectral normalisation of every D convolution, no batch norm in D (Miyato 2018)"
    )
    # mode-collapse mitigations (Salimans et al. 2016)
    real_label: float = option(1.0, "D target for real frames (0.9: one-sided label smoothing)")
    minibatch_kernels: int = option(0, "minibatch discrimination kernels B (0: off)")
    minibatch_kernel_dim: int = option(5, "dimension C of each minibatch-discrimination kernel")
    historical_weight: float = option(0.0, "historical-averaging penalty weight (0: off)")
    # WGAN-GP (Gulrajani et al. 2017)
    loss: Literal["bce", "wgan-gp"] = option(
        "bce", "bce (DCGAN) or wgan-gp (critic without batch norm, gradient penalty)",
        choices=LOSSES,
    )  # fmt: skip
    gp_weight: float = option(10.0, "WGAN-GP gradient-penalty weight lambda")
    critic_steps: int | None = option(None, "D steps per G step (default 5 for wgan-gp, else 1)")
    # unrolled GAN (Metz et al. 2017)
    unrolled_steps: int = option(
        0, "unrolled GAN: G trains against D this many Adam steps ahead (bce only; 0: off)"
    )
    # optimisation: None takes the loss's Adam settings (ADAM)
    lr: float | None = option(None, "Adam learning rate (default 2e-4; wgan-gp: 1e-4)")
    lr_g: float | None = option(None, "generator learning rate (default --lr; TTUR, Heusel 2017)")
    lr_d: float | None = option(None, "discriminator learning rate (default --lr; TTUR)")
    lr_decay: float = option(
        0.0, "fraction of the run, at its end, over which both learning rates fall linearly to "
        "0 (0: constant; CycleGAN's schedule, Zhu et al. 2017)",
    )  # fmt: skip
    beta1: float | None = option(None, "Adam beta1 (default 0.5; wgan-gp: 0)")
    beta2: float | None = option(None, "Adam beta2 (default 0.999; wgan-gp: 0.9)")
    batch_size: int = option(64, "frames per step and process")
    steps: int | None = option(None, "generator updates (default 5000, or from --epochs)")
    epochs: float | None = option(None, "passes over the training frames (instead of --steps)")
    seed: int = option(0, "seeds weights, noise, frame order and the fixed sample batch")
    # data
    holdout: float | None = option(
        None, "hold out episodes with storage.is_holdout at this fraction (default: the file's)"
    )
    max_memory_frames: int = option(500_000, "stream the file in chunks above this many frames")
    # hardware
    device: str = option("auto", "auto (cuda, then mps, then cpu), cuda, mps or cpu")
    amp: Literal["auto", "bf16", "fp16", "off"] = option(
        "auto", "mixed precision: auto (bf16 on CUDA and on CPUs with native bf16), bf16, "
        "fp16 or off",
    )  # fmt: skip
    channels_last: bool = option(True, "NHWC memory layout (faster convolutions)")
    compile: bool = option(False, "torch.compile both networks (slow start, faster steps)")
    # EMA generator, used for samples and export
    ema_decay: float = option(0.999, "EMA generator decay, warmed up as min(d, (1+t)/(10+t))")
    ema_half_life: float | None = option(
        None, "EMA half-life in images (Karras et al.): decay 0.5 ** (batch / it); "
        "replaces --ema-decay",
    )  # fmt: skip
    ema_rampup: float | None = option(
        None, "with --ema-half-life: cap the half-life at this fraction of the images seen "
        "(stylegan2-ada's ema_rampup) instead of the (1+t)/(10+t) warm-up, which below ~9,000 "
        "steps sets the average whatever the half-life",
    )  # fmt: skip
    # collapse monitor (carsynth.monitor)
    monitor_interval: int = option(0, "steps between collapse checks (NDB + collapse; 0: off)")
    monitor_samples: int = option(500, "EMA samples per collapse check")
    monitor_k: int = option(20, "NDB bins of the monitor")
    stop_on_collapse: bool = option(False, "end the run when the collapse check fails")
    # bookkeeping
    log_interval: int = option(50, "steps between metrics rows (and the only host syncs)")
    sample_interval: int = option(500, "steps between sample grids")
    checkpoint_interval: int = option(1000, "steps between checkpoints (and one at the end)")
    keep_checkpoints: int = option(3, "how many recent checkpoints to keep")
    resume: bool = option(False, "continue the run in --out from its latest checkpoint")
    overwrite: bool = option(False, "replace an existing run directory")
    progress: bool = option(True, "a progress bar on a terminal (--no-progress: plain log lines)")

    @property
    def adam(self) -> tuple[float, float, float]:
        """Adam's (lr, beta1, beta2): those given, else the loss's (``ADAM``)."""
        given = (self.lr, self.beta1, self.beta2)
        return tuple(  # type: ignore[return-value]
            float(v if v is not None else d) for v, d in zip(given, ADAM[self.loss], strict=True)
        )

    @property
    def learning_rates(self) -> tuple[float, float]:
        """(generator's, discriminator's) learning rate: ``lr_g``/``lr_d``, else Adam's lr.

        Two time-scale update rule (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update
        Rule Converge to a Local Nash Equilibrium"): separate step sizes for the two networks.
        """
        lr = self.adam[0]
        return (
            float(self.lr_g if self.lr_g is not None else lr),
            float(self.lr_d if self.lr_d is not None else lr),
        )

    def lr_scale(self, step: int, total: int) -> float:
        """The factor on both learning rates for update ``step`` (0-based) of ``total``.

        1 until the last ``lr_decay * total`` updates, then falling linearly so that the last
        update is taken at 1/n of the rate, n = the number of decaying updates: the linear decay
        to zero of CycleGAN (Zhu et al. 2017, section 4: "keep the same learning rate for the
        first 100 epochs and linearly decay the rate to zero over the next 100 epochs"). The
        weights settle instead of jittering at the full step, which the EMA alone only averages.
        """
        decaying = round(self.lr_decay * total)
        left = total - step  # updates left, this one included
        return 1.0 if left > decaying else left / decaying

    def ema_beta(self, global_batch: int, step: int) -> float:
        """The EMA generator's decay after update ``step`` (0-based), warm-up included.

        ``ema_decay`` d, or with ``ema_half_life`` H the decay after which an update's weight has
        halved once H images have passed, 0.5 ** (global_batch / H) (Karras et al. 2020,
        stylegan2-ada's ema_kimg). The warm-up keeps short runs from being dominated by the
        initialisation: min(d, (1 + t) / (10 + t)) (TensorFlow's ExponentialMovingAverage with
        num_updates), which caps the average at about the last tenth of the run, so that below
        about 9,000 updates it, not d or H, sets the decay; or with ``ema_rampup`` r, the
        half-life is capped at r times the images seen so far instead (stylegan2-ada's
        ema_rampup), so that r = 0.5 averages over about the later half of the run.
        """
        if self.ema_half_life is not None and self.ema_rampup is not None:
            half_life = min(self.ema_half_life, self.ema_rampup * global_batch * (step + 1))
            return 0.5 ** (global_batch / half_life)
        beta = self.ema_decay
        if self.ema_half_life is not None:
            beta = 0.5 ** (global_batch / self.ema_half_life)
        return min(beta, (1 + step) / (10 + step))

    @property
    def fm_layers(self) -> tuple[int, ...]:
        """The discriminator blocks whose features are matched (``fm_layer`` parsed, sorted)."""
        try:
            layers = tuple(sorted({int(part) for part in str(self.fm_layer).split(",")}))
        except ValueError:
            layers = ()
        if not layers or any(layer not in FEATURE_LAYERS for layer in layers):
            raise UsageError(
                f"--fm-layer must be a comma list of {FEATURE_LAYERS}, got {self.fm_layer!r}"
            )
        return layers

    @property
    def augment_policy(self) -> tuple[str, ...]:
        """The DiffAugment transformations in order (``diffaugment`` parsed)."""
        from carsynth.augment import parse_policy

        try:
            return parse_policy(self.diffaugment)
        except ValueError as error:
            raise UsageError(f"--diffaugment: {error}") from None

    @property
    def critic_updates(self) -> int:
        """D updates per G update: ``critic_steps``, else the loss's default."""
        return self.critic_steps or CRITIC_STEPS[self.loss]

    def resolved(self) -> dict[str, Any]:
        """Every setting with the loss-dependent defaults filled in: what config.json records."""
        values = dataclasses.asdict(self)
        values["lr"], values["beta1"], values["beta2"] = self.adam
        values["lr_g"], values["lr_d"] = self.learning_rates
        values["fm_layer"] = ",".join(map(str, self.fm_layers))
        return values


# Settings that may change when a run is resumed (the budget, and bookkeeping that does not touch
# the weights); every other one must match config.json. ``data`` and ``out`` are compared as
# files: the data by its fingerprint, the run directory by its resolved path.
RESUMABLE = {
    "steps", "epochs", "resume", "overwrite", "progress", "device", "max_memory_frames",
    "log_interval", "sample_interval", "checkpoint_interval", "keep_checkpoints",
    "monitor_interval", "monitor_samples", "monitor_k", "stop_on_collapse", "data", "out",
}  # fmt: skip


def parameter_count(nz: int, ngf: int, ndf: int, kernels: int = 0, kernel_dim: int = 0) -> int:
    """About how many weights the DCGAN-64 pair has (the 4x4 convolutions of
    :mod:`carsynth.models`, minibatch discrimination's tensor; norms and biases left out)."""
    generator = 16 * (8 * nz * ngf + 42 * ngf * ngf + 3 * ngf)
    discriminator = 16 * (42 * ndf * ndf + 11 * ndf + kernels) + 128 * ndf * kernels * kernel_dim
    return generator + discriminator


def _finite(flag: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, got {value}")


def _positive(c: TrainConfig) -> None:
    positive = {
        "--nz": c.nz, "--ngf": c.ngf, "--ndf": c.ndf, "--batch-size": c.batch_size,
        "--log-interval": c.log_interval, "--sample-interval": c.sample_interval,
        "--checkpoint-interval": c.checkpoint_interval, "--keep-checkpoints": c.keep_checkpoints,
        "--max-memory-frames": c.max_memory_frames,
    }  # fmt: skip
    for flag, value in positive.items():
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if c.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {c.seed}")
    if c.steps is not None and c.epochs is not None:
        raise UsageError("give --steps or --epochs, not both")
    if c.steps is not None and c.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {c.steps}")
    _finite("--epochs", c.epochs)
    if c.epochs is not None and not c.epochs > 0:
        raise UsageError(f"--epochs must be > 0, got {c.epochs}")


def _size(c: TrainConfig) -> None:
    """Widths and latent size within bounds; the message says how big the networks would be."""
    for flag, value, most in (("--ngf", c.ngf, MAX_WIDTH), ("--ndf", c.ndf, MAX_WIDTH),
                              ("--nz", c.nz, MAX_NZ)):  # fmt: skip
        if value > most:
            count = parameter_count(c.nz, c.ngf, c.ndf, c.minibatch_kernels,
                                    c.minibatch_kernel_dim)  # fmt: skip
            # weights, gradients and Adam's two moments, in float32
            raise UsageError(
                f"{flag} {value} is above the most, {most}: the networks would have about "
                f"{count:.2g} parameters ({count * 16 / 2**30:.3g} GiB of float32 weights, "
                f"gradients and Adam moments)"
            )


def _objective(c: TrainConfig) -> None:
    if c.loss not in LOSSES:
        raise UsageError(f"--loss must be bce or wgan-gp, got {c.loss!r}")
    c.fm_layers  # noqa: B018 (parses --fm-layer: a UsageError naming it)
    if c.minibatch_kernels < 0 or c.minibatch_kernel_dim < 1:
        raise UsageError("--minibatch-kernels must be >= 0 and --minibatch-kernel-dim >= 1")
    if not 0.0 < c.real_label <= 1.0:
        raise UsageError(f"--real-label must be in (0, 1], got {c.real_label}")
    if c.critic_steps is not None and c.critic_steps < 1:
        raise UsageError(f"--critic-steps must be >= 1, got {c.critic_steps}")
    if c.unrolled_steps < 0:
        raise UsageError(f"--unrolled-steps must be >= 0, got {c.unrolled_steps}")
    if c.unrolled_steps and c.loss != "bce":
        raise UsageError(
            "--unrolled-steps works with --loss bce only (Metz et al. unroll the GAN loss)"
        )
    for flag, value in (("--gp-weight", c.gp_weight), ("--historical-weight",
                        c.historical_weight), ("--adv-weight", c.adv_weight)):  # fmt: skip
        _finite(flag, value)
        if value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    lr, beta1, beta2 = c.adam
    if not 0 < lr <= MAX_LR:  # also false for NaN
        raise UsageError(f"--lr must be in (0, {MAX_LR:g}], got {lr}")
    for flag, beta in (("--beta1", beta1), ("--beta2", beta2)):
        if not 0 <= beta < 1:
            raise UsageError(f"{flag} must be in [0, 1), got {beta}")
    if not 0.0 <= c.ema_decay < 1.0:
        raise UsageError(f"--ema-decay must be in [0, 1), got {c.ema_decay}")
    if c.ema_half_life is not None and not c.ema_half_life > 0:
        raise UsageError(f"--ema-half-life must be > 0 images, got {c.ema_half_life}")
    if c.ema_rampup is not None:
        _finite("--ema-rampup", c.ema_rampup)
        if c.ema_half_life is None or not c.ema_rampup > 0:
            raise UsageError(
                f"--ema-rampup needs --ema-half-life and must be > 0, got {c.ema_rampup}"
            )
    _finite("--lr-decay", c.lr_decay)
    if not 0.0 <= c.lr_decay <= 1.0:
        raise UsageError(f"--lr-decay must be in [0, 1], got {c.lr_decay}")
    if min(c.learning_rates) <= 0:
        raise UsageError("--lr-g and --lr-d must be > 0")
    if c.fm_moments not in (1, 2):
        raise UsageError(f"--fm-moments must be 1 or 2, got {c.fm_moments}")
    if c.diffaugment and not c.augment_policy:
        raise UsageError(f"--diffaugment: no transformation named in {c.diffaugment!r}")


def _bookkeeping(c: TrainConfig) -> None:
    if c.holdout is not None and not 0.0 <= c.holdout < 1.0:
        raise UsageError(f"--holdout must be in [0, 1), got {c.holdout}")
    if c.monitor_interval < 0 or c.monitor_interval % c.log_interval:
        raise UsageError(
            f"--monitor-interval must be a multiple of --log-interval {c.log_interval} (or 0), "
            f"got {c.monitor_interval}"
        )
    if c.monitor_interval and (c.monitor_samples < 2 or c.monitor_k < 2):
        raise UsageError("--monitor-samples and --monitor-k must be >= 2")
    if c.stop_on_collapse and not c.monitor_interval:
        raise UsageError("--stop-on-collapse needs --monitor-interval")
    if c.amp not in AMP:
        raise UsageError(f"--amp must be auto, bf16, fp16 or off, got {c.amp!r}")
    if c.lowpass not in LOWPASS:
        raise UsageError(f"--lowpass must be off, last or all, got {c.lowpass!r}")


def check_config(c: TrainConfig) -> None:
    """UsageError naming the flag for any setting out of range (nothing is written before)."""
    _positive(c)
    _size(c)
    _objective(c)
    _bookkeeping(c)


def lowpass_setting(recorded: Any) -> str:
    """A run's recorded ``lowpass`` as today's setting: runs from before "last" recorded it as
    true (a filter after every upsampling: "all") or false ("off")."""
    return {True: "all", False: "off"}.get(recorded, recorded)


def resume_differences(saved: dict[str, Any], mine: TrainConfig) -> list[str]:
    """The settings of ``mine`` that differ from a run's recorded ones and may not change on
    ``--resume`` (a setting missing from an older config.json had its default value then)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    # runs from before lr_g/lr_d existed trained both networks at lr
    saved = {"lr_g": saved.get("lr"), "lr_d": saved.get("lr"), **saved}
    # runs from before several feature layers recorded one block as a number
    saved["fm_layer"] = str(saved.get("fm_layer", defaults["fm_layer"]))
    saved["lowpass"] = lowpass_setting(saved.get("lowpass", defaults["lowpass"]))
    values = mine.resolved()
    differ = {k for k in values if k not in RESUMABLE and saved.get(k, defaults[k]) != values[k]}
    # a network's rate that follows lr on both sides is reported as lr alone
    for k in ("lr_g", "lr_d"):
        if getattr(mine, k) is None and saved[k] == saved.get("lr"):
            differ.discard(k)
    return sorted(differ)
