"""GAN losses, each a small pure function of discriminator outputs.

Logits are cast to float32 before the losses so that mixed-precision forward passes do not lose
precision in the sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def d_bce_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's cross-entropy: -log D(x) - log(1 - D(G(z))), batch means.

    Goodfellow et al. 2014, "Generative Adversarial Nets", eq. 1 (the discriminator's side).
    """
    real = F.binary_cross_entropy_with_logits(real_logits.float(), torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits.float(), torch.zeros_like(fake_logits))
    return real + fake


def g_nonsaturating_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss -log D(G(z)), batch mean.

    Goodfellow et al. 2014, section 3: maximising log D(G(z)) instead of minimising
    log(1 - D(G(z))) keeps the gradient strong early in training.
    """
    return F.binary_cross_entropy_with_logits(fake_logits.float(), torch.ones_like(fake_logits))


def feature_matching_loss(real_features: torch.Tensor, fake_features: torch.Tensor) -> torch.Tensor:
    """|| mean_batch f(x) - mean_batch f(G(z)) ||_2^2 (Salimans et al. 2016, section 3.1).

    The squared distance between the batch means of the discriminator's intermediate features,
    so the generator matches the statistics of real data rather than any one real frame. The real
    features are detached: only the generator learns from this loss.
    """
    real_mean = real_features.detach().float().flatten(1).mean(0)
    fake_mean = fake_features.float().flatten(1).mean(0)
    return (real_mean - fake_mean).pow(2).sum()
