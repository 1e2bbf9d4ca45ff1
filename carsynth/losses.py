"""GAN losses, each a small pure function of discriminator outputs.

Logits are cast to float32 before the losses so that mixed-precision forward passes do not lose
precision in the sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def d_bce_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, real_target: float = 1.0
) -> torch.Tensor:
    """The discriminator's cross-entropy: -log D(x) - log(1 - D(G(z))), batch means.

    Goodfellow et al. 2014, "Generative Adversarial Nets", eq. 1 (the discriminator's side).
    ``real_target`` < 1 is one-sided label smoothing (Salimans et al. 2016, section 3.4): real
    frames are pushed towards e.g. 0.9 instead of 1, generated ones still towards 0, which keeps
    the discriminator from becoming over-confident on the real data.
    """
    real_targets = torch.full_like(real_logits, real_target, dtype=torch.float32)
    real = F.binary_cross_entropy_with_logits(real_logits.float(), real_targets)
    fake = F.binary_cross_entropy_with_logits(fake_logits.float(), torch.zeros_like(fake_logits))
    return real + fake


def g_nonsaturating_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss -log D(G(z)), batch mean.

    Goodfellow et al. 2014, section 3: maximising log D(G(z)) instead of minimising
    log(1 - D(G(z))) keeps the gradient strong early in training.
    """
    return F.binary_cross_entropy_with_logits(fake_logits.float(), torch.ones_like(fake_logits))


def feature_matching_loss(
    real_features: torch.Tensor, fake_features: torch.Tensor, moments: int = 1
) -> torch.Tensor:
    """|| mean_batch f(x) - mean_batch f(G(z)) ||_2^2 (Salimans et al. 2016, section 3.1).

    The squared distance between the batch means of the discriminator's intermediate features,
    so the generator matches the statistics of real data rather than any one real frame. The real
    features are detached: only the generator learns from this loss.

    ``moments=2`` adds || std_batch f(x) - std_batch f(G(z)) ||_2^2 (per-feature population
    standard deviations): the mean alone is met by a generator whose frames all sit at the mean,
    the spread is not (the diagonal of the covariance matching of Mroueh et al. 2017, McGAN).
    """
    real = real_features.detach().float().flatten(1)
    fake = fake_features.float().flatten(1)
    loss = (real.mean(0) - fake.mean(0)).pow(2).sum()
    if moments >= 2:
        loss = loss + (_std(real) - _std(fake)).pow(2).sum()
    return loss


def _std(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-column population standard deviation, with ``eps`` under the root (finite gradient at
    zero spread)."""
    return (x.var(0, unbiased=False) + eps).sqrt()


def historical_averaging_penalty(
    params: list[torch.Tensor], averages: list[torch.Tensor]
) -> torch.Tensor:
    """sum_i || theta_i - mean_past(theta_i) ||_2^2 (Salimans et al. 2016, section 3.3).

    ``averages`` holds the running mean of each parameter over all past updates (kept by the
    trainer); the penalty pulls the parameters back towards it, damping the oscillations that
    gradient descent shows in GAN games.
    """
    return torch.stack(
        [(p - a).float().pow(2).sum() for p, a in zip(params, averages, strict=True)]
    ).sum()


def d_wasserstein_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """The critic's loss mean D(G(z)) - mean D(x) (Arjovsky et al. 2017; Gulrajani et al. 2017)."""
    return fake_scores.float().mean() - real_scores.float().mean()


def g_wasserstein_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """The WGAN generator loss -mean D(G(z))."""
    return -fake_scores.float().mean()


def gradient_penalty(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """E[(|| grad D(x^) ||_2 - 1)^2], x^ = eps x + (1 - eps) G(z) (Gulrajani et al. 2017, eq. 3).

    ``eps`` (B, 1, 1, 1) holds one U[0, 1] draw per sample. The gradient is taken with
    ``create_graph=True`` so that the penalty itself trains the critic. ``critic`` returns
    (scores, features) like :class:`~carsynth.models.Discriminator`.
    """
    mixed = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    scores, _ = critic(mixed)
    (grad,) = torch.autograd.grad(scores.float().sum(), mixed, create_graph=True)
    return (grad.float().flatten(1).norm(dim=1) - 1).pow(2).mean()
