"""The networks of a run and everything that is checkpointed with them.

The generator, the discriminator, the EMA generator (used for samples and export), both Adam
optimisers (Radford et al. 2015), the mixed-precision scaler and, with historical averaging, the
running means of every parameter (Salimans et al. 2016).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from carsynth.devices import autocast_dtype
from carsynth.files import to_float
from carsynth.models import Discriminator, Generator
from carsynth.training.config import TrainConfig


@dataclass
class Networks:
    generator: Generator
    discriminator: Discriminator
    ema: Generator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    channels_last: bool
    history: dict[str, list[torch.Tensor]] | None  # running parameter means, "g" and "d"

    @classmethod
    def build(cls, c: TrainConfig, device: torch.device) -> Networks:
        """Fresh networks seeded by ``c.seed`` (DCGAN init), optimisers and precision settings."""
        torch.manual_seed(c.seed)
        generator = Generator(c.nz, c.ngf, c.lowpass).to(device)
        discriminator = Discriminator(
            c.ndf,
            c.fm_layers,
            c.minibatch_kernels,
            c.minibatch_kernel_dim,
            norm=c.loss == "bce",
            spectral_norm=c.spectral_norm,
        ).to(device)
        channels_last = c.channels_last
        if channels_last:
            generator.to(memory_format=torch.channels_last)
            discriminator.to(memory_format=torch.channels_last)
        ema = copy.deepcopy(generator).eval().requires_grad_(False)
        _, beta1, beta2 = c.adam
        lr_g, lr_d = c.learning_rates
        opt_g = torch.optim.Adam(generator.parameters(), lr=lr_g, betas=(beta1, beta2))
        opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr_d, betas=(beta1, beta2))
        amp_dtype = autocast_dtype(c.amp, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        history = None
        if c.historical_weight:
            history = {
                "g": [p.detach().clone() for p in generator.parameters()],
                "d": [p.detach().clone() for p in discriminator.parameters()],
            }
        return cls(generator, discriminator, ema, opt_g, opt_d, scaler, amp_dtype, channels_last,
                   history)  # fmt: skip

    def scale_learning_rates(self, c: TrainConfig, step: int, total: int) -> None:
        """Both optimisers at their configured rate times ``c.lr_scale`` for update ``step``
        (set every step, so a resumed run continues the schedule where it stopped)."""
        scale = c.lr_scale(step, total)
        for opt, lr in zip((self.opt_g, self.opt_d), c.learning_rates, strict=True):
            for group in opt.param_groups:
                group["lr"] = lr * scale

    def history_of(self, net: str) -> list[torch.Tensor] | None:
        return self.history[net] if self.history is not None else None

    def for_steps(
        self, c: TrainConfig, device: torch.device, world: int
    ) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(generator, discriminator, bare discriminator) as the steps call them.

        The discriminator step goes through DDP (its gradients are averaged over processes); the
        generator step calls the bare discriminator, whose weights it does not update, so no
        gradient of it is exchanged.
        """
        g_step, d_step, d_plain = self.generator, self.discriminator, self.discriminator
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            g_step = nn.parallel.DistributedDataParallel(
                self.generator, device_ids=ids, broadcast_buffers=False
            )
            d_step = nn.parallel.DistributedDataParallel(
                self.discriminator, device_ids=ids, broadcast_buffers=False
            )
        if c.compile:
            g_step, d_step, d_plain = (torch.compile(m) for m in (g_step, d_step, d_plain))
        return g_step, d_step, d_plain

    def to_input(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames (B, H, W, 3) -> the networks' input (B, 3, H, W) in [-1, 1]."""
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return to_float(frames).contiguous(memory_format=layout)

    @torch.no_grad()
    def average(self, step: int, decay: float) -> None:
        """After update ``step``: the historical means, then the EMA generator at ``decay``
        (:meth:`TrainConfig.ema_beta`, its warm-up included)."""
        g_params = list(self.generator.parameters())
        if self.history is not None:  # the mean of the step + 2 parameter sets seen so far
            torch._foreach_lerp_(self.history["g"], g_params, 1.0 / (step + 2))
            torch._foreach_lerp_(self.history["d"], list(self.discriminator.parameters()),
                                 1.0 / (step + 2))  # fmt: skip
        torch._foreach_lerp_(list(self.ema.parameters()), g_params, 1.0 - decay)
        for e, g in zip(self.ema.buffers(), self.generator.buffers(), strict=True):
            e.copy_(g)

    def state(self, step: int, device: torch.device) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit."""
        history = self.history or {}
        return {
            "step": step,
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "ema": self.ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "scaler": self.scaler.state_dict(),
            **{f"history_{k}": v for k, v in history.items()},
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }

    def load(self, state: dict[str, Any], device: torch.device) -> int:
        """Restore a checkpoint's ``state`` (:func:`carsynth.rundir.read_checkpoint`): networks,
        optimisers, RNG; returns its step."""
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.ema.load_state_dict(state["ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.scaler.load_state_dict(state["scaler"])
        if self.history is not None:
            for key, means in self.history.items():
                for mean, saved in zip(means, state[f"history_{key}"], strict=True):
                    mean.copy_(saved)
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state["rng_cuda"] is not None:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), device)
        return int(state["step"])
