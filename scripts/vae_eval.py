"""A small World-Models convolutional VAE, the yardstick for "do synthetic frames help?".

Ha & Schmidhuber 2018 ("World Models", Appendix A.1) compress each 64x64x3 CarRacing frame into a
32-dimensional latent with this VAE (the "V" model); the recurrent model and controller then work
on the latents only. How well V reconstructs frames it has never seen is therefore a direct,
cheap measure of whether a training set (real, or real plus synthetic) covers the frame
distribution. ``scripts/pretrain_vae.py`` runs that comparison.

Architecture (as World Models): four stride-2 4x4 convolutions with 32, 64, 128, 256 channels and
ReLU (64 -> 31 -> 14 -> 6 -> 2 pixels, no padding), a linear layer to the mean and log-variance of
a 32-d Gaussian, and a decoder that maps z to a 1x1x1024 tensor followed by four stride-2
transposed convolutions (kernels 5, 5, 6, 6; 1 -> 5 -> 13 -> 30 -> 64 pixels) and a sigmoid.

Loss per image (Kingma & Welling 2014, with the World Models conventions):
``recon + max(KL, kl_tolerance * latent_dim)``, averaged over the batch, where ``recon`` is the
sum of squared errors over the image's pixels in [0, 1] (World Models) or the summed binary
cross-entropy (``recon="bce"``, the Bernoulli decoder of the VAE paper). The floor on the KL
term is World Models' "KL tolerance" (0.5 nats per latent dimension): once the posterior is that
close to the prior its gradient stops pulling further, which keeps the latents informative
(the idea of "free bits", Kingma et al. 2016, applied to the whole latent rather than per group).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from carsynth.devices import resolve_device
from carsynth.files import to_float

FRAME_SIZE = 64


@dataclass
class VAEConfig:
    """Every setting of :func:`train_vae`. Defaults are World Models' except where noted."""

    latent_dim: int = 32
    """Size of z (World Models: 32 for CarRacing)."""
    epochs: int = 10
    """Passes over the training frames (World Models: 10 over 10,000 rollouts)."""
    batch_size: int = 100
    """Frames per gradient step (World Models: 100)."""
    lr: float = 1e-3
    """Adam learning rate. World Models uses 1e-4 on millions of frames; the few thousand frames
    of a CPU run need the larger step to get anywhere in a few epochs."""
    recon: Literal["mse", "bce"] = "mse"
    """Reconstruction term per image: summed squared error (World Models) or summed binary
    cross-entropy (Bernoulli decoder, Kingma & Welling 2014)."""
    kl_tolerance: float = 0.5
    """Free nats per latent dimension: the KL term is max(KL, kl_tolerance * latent_dim).
    0 gives the plain VAE objective."""
    eval_batch_size: int = 500
    """Frames per forward pass when measuring held-out error (memory only, no effect on values)."""
    seed: int = 0
    """Seeds weight initialisation, shuffling and the reparameterisation noise."""
    device: str = "cpu"
    """Torch device for the model and the frames ("cpu", "cuda", "cuda:1", ...)."""


class ConvVAE(nn.Module):
    """The World Models V model: 64x64x3 frames in [0, 1] <-> a ``latent_dim`` Gaussian."""

    def __init__(self, latent_dim: int = 32):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 128, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(128, 256, 4, stride=2),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.to_mu = nn.Linear(256 * 2 * 2, latent_dim)
        self.to_logvar = nn.Linear(256 * 2 * 2, latent_dim)
        self.from_z = nn.Linear(latent_dim, 1024)
        self.decoder = nn.Sequential(
            nn.Unflatten(1, (1024, 1, 1)),
            nn.ConvTranspose2d(1024, 128, 5, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 5, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 6, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(32, 3, 6, stride=2),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z|x) for frames ``x`` (B, 3, 64, 64) in [0, 1]."""
        h = self.encoder(x)
        return self.to_mu(h), self.to_logvar(h)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid decoder output (B, 3, 64, 64); the losses work on logits for stability."""
        return self.decoder(self.from_z(z))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstructed frames (B, 3, 64, 64) in [0, 1]."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One stochastic pass: (decoder logits, mu, logvar)."""
        mu, logvar = self.encode(x)
        return self.decode_logits(reparameterize(mu, logvar)), mu, logvar


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """A sample z = mu + sigma * eps, eps ~ N(0, I), differentiable in mu and logvar.

    The reparameterisation trick of Kingma & Welling 2014 (section 2.4); sigma = exp(logvar / 2).
    """
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per row, in nats: shape (B,).

    Closed form of Kingma & Welling 2014, Appendix B:
    ``-1/2 * sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j))``.
    """
    return -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def vae_loss(
    x: torch.Tensor,
    logits: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    recon: Literal["mse", "bce"] = "mse",
    kl_tolerance: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, reconstruction term, KL term), each the batch mean of a per-image quantity.

    Reconstruction is summed over an image's pixels (see the module docstring for the two
    choices); the KL is floored at ``kl_tolerance * latent_dim`` per image (World Models), and
    the floored value is what is optimised and returned.
    """
    if recon == "mse":
        per_pixel = (torch.sigmoid(logits) - x).pow(2)
    elif recon == "bce":
        per_pixel = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    else:
        raise ValueError(f"recon must be 'mse' or 'bce', got {recon!r}")
    recon_term = per_pixel.flatten(1).sum(dim=1).mean()
    kl_term = kl_divergence(mu, logvar).clamp(min=kl_tolerance * mu.shape[1]).mean()
    return recon_term + kl_term, recon_term, kl_term


def _check_frames(frames: np.ndarray, name: str) -> None:
    if frames.dtype != np.uint8 or frames.shape[1:] != (FRAME_SIZE, FRAME_SIZE, 3):
        raise ValueError(
            f"{name} must be uint8 (N, {FRAME_SIZE}, {FRAME_SIZE}, 3), "
            f"got {frames.dtype} {frames.shape}"
        )
    if len(frames) == 0:
        raise ValueError(f"{name} is empty")


@torch.no_grad()
def reconstruction_mse(model: ConvVAE, frames: torch.Tensor, batch_size: int = 500) -> float:
    """Mean squared error per pixel (values in [0, 1]) of reconstructing uint8 ``frames``.

    Uses z = mu, the encoder's best guess, so the number is deterministic for a given model: it
    measures what the model has learnt, not the sampling noise.
    """
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(frames), batch_size):
        x = to_float(frames[start : start + batch_size], signed=False)
        mu, _ = model.encode(x)
        total += float((model.decode(mu) - x).pow(2).sum())
    model.train(was_training)
    return total / (frames.numel())


@dataclass
class VAEResult:
    """What :func:`train_vae` measured. Losses are per image, averaged over an epoch."""

    config: dict
    """The :class:`VAEConfig` that produced this result, as a dict."""
    train_loss: list[float]
    """Loss as optimised (reconstruction + floored KL) per epoch."""
    train_recon: list[float]
    """Reconstruction term per epoch (summed over an image's pixels)."""
    train_kl: list[float]
    """KL term per epoch, after the ``kl_tolerance`` floor, in nats."""
    eval_mse_curve: list[float]
    """Held-out reconstruction MSE per pixel after each epoch."""
    steps: int
    """Gradient steps taken."""
    seconds: float
    """Wall time of the training loop, evaluation included."""
    model: ConvVAE = field(repr=False)
    """The trained model (on ``config.device``)."""

    @property
    def eval_mse(self) -> float:
        """Held-out reconstruction MSE per pixel of the final model."""
        return self.eval_mse_curve[-1]

    def to_dict(self) -> dict:
        """The numbers as plain JSON-ready values (the model is left out)."""
        # Not dataclasses.asdict: it would deep-copy the model only to drop it.
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        out["eval_mse"] = self.eval_mse
        return out


def train_vae(frames_train: np.ndarray, frames_eval: np.ndarray, config: VAEConfig) -> VAEResult:
    """Train a :class:`ConvVAE` on ``frames_train`` and measure it on ``frames_eval``.

    Both are uint8 arrays (N, 64, 64, 3). The frames are moved to ``config.device`` once as uint8
    (12 KiB a frame, so tens of thousands fit any GPU) and batches are cut from a seeded random
    permutation there: no DataLoader workers, no host-to-device copy per step. Everything random
    follows from ``config.seed``.
    """
    _check_frames(frames_train, "frames_train")
    _check_frames(frames_eval, "frames_eval")
    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError(
            f"epochs and batch_size must be >= 1, got {config.epochs}, {config.batch_size}"
        )
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = ConvVAE(config.latent_dim).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    train = torch.from_numpy(frames_train).to(device)
    held_out = torch.from_numpy(frames_eval).to(device)

    losses: dict[str, list[float]] = {"loss": [], "recon": [], "kl": []}
    eval_curve: list[float] = []
    steps = 0
    started = time.perf_counter()
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(train), generator=generator).to(device)
        sums = torch.zeros(3, device=device)
        for start in range(0, len(train), config.batch_size):
            x = to_float(train[order[start : start + config.batch_size]], signed=False)
            logits, mu, logvar = model(x)
            loss, recon, kl = vae_loss(x, logits, mu, logvar, config.recon, config.kl_tolerance)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # Summed on the device and read once per epoch: a .item() per step would make the
            # GPU wait for the host every step.
            sums += torch.stack([loss, recon, kl]).detach() * len(x)
            steps += 1
        for key, value in zip(losses, (sums / len(train)).tolist(), strict=True):
            if not math.isfinite(value):
                raise FloatingPointError(f"VAE {key} became {value} (lower --lr?)")
            losses[key].append(value)
        eval_curve.append(reconstruction_mse(model, held_out, config.eval_batch_size))
    return VAEResult(
        config=asdict(config),
        train_loss=losses["loss"],
        train_recon=losses["recon"],
        train_kl=losses["kl"],
        eval_mse_curve=eval_curve,
        steps=steps,
        seconds=time.perf_counter() - started,
        model=model,
    )
