"""One discriminator update and one generator update, with the run's loss chosen once.

:func:`make_objective` turns the config into an :class:`Objective` (DCGAN's cross-entropy or
WGAN-GP's critic loss, feature matching or not, the penalties' weights); the two steps below
call it and hold no if/else on the loss themselves. A new loss is a new Objective subclass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from carsynth import losses, unrolled
from carsynth.training.config import TrainConfig

Augment = Callable[[torch.Tensor], torch.Tensor]  # DiffAugment of a batch (carsynth.augment)


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Mixed precision in ``dtype`` on ``device``; ``None``: full precision."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@dataclass
class Objective:
    """What the two networks minimise. Subclasses give the adversarial part of each."""

    fm: bool = False  # feature matching (Salimans et al. 2016) for the generator
    fm_moments: int = 1  # 1: feature means; 2: means and standard deviations
    adv_weight: float = 0.0  # with fm: weight of the added adversarial term
    historical_weight: float = 0.0  # historical-averaging penalty weight
    real_label: float = 1.0  # the cross-entropy's target for real frames
    gp_weight: float = 10.0  # WGAN-GP's lambda
    unrolled_steps: int = 0  # Metz et al. 2017: G is judged by D this many steps ahead

    def d_adversarial(
        self, real: torch.Tensor, fake: torch.Tensor, critic: nn.Module, x: torch.Tensor,
        fake_x: torch.Tensor, eps: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        raise NotImplementedError

    def g_adversarial(self, fake: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """D's output as logged (``d_real``, ``d_fake``)."""
        raise NotImplementedError

    def generator_loss(
        self, real_features: torch.Tensor | None, fake_logits: torch.Tensor,
        fake_features: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """Feature matching (plus ``adv_weight`` x the adversarial term), or the adversarial one."""
        if not self.fm:
            return self.g_adversarial(fake_logits)
        loss = losses.feature_matching_loss(real_features, fake_features, self.fm_moments)
        if self.adv_weight:
            loss = loss + self.adv_weight * self.g_adversarial(fake_logits)
        return loss

    def with_history(
        self, loss: torch.Tensor, net: nn.Module, history: list[torch.Tensor] | None
    ) -> torch.Tensor:
        """``loss`` plus the historical-averaging penalty of ``net`` (when tracked)."""
        if history is None:
            return loss
        penalty = losses.historical_averaging_penalty(list(net.parameters()), history)
        return loss + self.historical_weight * penalty


class CrossEntropy(Objective):
    """DCGAN (Radford et al. 2015): D's cross-entropy, G's non-saturating loss."""

    def d_adversarial(self, real, fake, critic, x, fake_x, eps):  # noqa: D102
        return losses.d_bce_loss(real, fake, self.real_label)

    def g_adversarial(self, fake):  # noqa: D102
        return losses.g_nonsaturating_loss(fake)

    def score(self, logits):  # noqa: D102
        return torch.sigmoid(logits)


class WassersteinGP(Objective):
    """WGAN-GP (Gulrajani et al. 2017): the critic loss plus lambda x the gradient penalty at
    ``eps * x + (1 - eps) * fake``, through the bare network (DDP does not double-backward)."""

    def d_adversarial(self, real, fake, critic, x, fake_x, eps):  # noqa: D102
        loss = losses.d_wasserstein_loss(real, fake)
        return loss + self.gp_weight * losses.gradient_penalty(critic, x, fake_x, eps)

    def g_adversarial(self, fake):  # noqa: D102
        return losses.g_wasserstein_loss(fake)

    def score(self, logits):  # noqa: D102
        return torch.clone(logits)


OBJECTIVES: dict[str, type[Objective]] = {"bce": CrossEntropy, "wgan-gp": WassersteinGP}


def make_objective(config: TrainConfig) -> Objective:
    """The run's loss, chosen once from ``config.loss`` and the objective's settings."""
    return OBJECTIVES[config.loss](
        fm=config.fm, fm_moments=config.fm_moments, adv_weight=config.adv_weight,
        historical_weight=config.historical_weight, real_label=config.real_label,
        gp_weight=config.gp_weight, unrolled_steps=config.unrolled_steps,
    )  # fmt: skip


def discriminator_step(
    discriminator: nn.Module,
    opt_d: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x: torch.Tensor,
    fake: torch.Tensor,
    objective: Objective,
    amp_dtype: torch.dtype | None = None,
    history: list[torch.Tensor] | None = None,
    critic: nn.Module | None = None,
    eps: torch.Tensor | None = None,
    augment: Augment | None = None,
    joint: bool = False,
) -> torch.Tensor:
    """One discriminator update on a real batch ``x`` and a generated batch ``fake``.

    ``critic`` is the bare network for the gradient penalty (default ``discriminator``);
    ``history`` (running means of the discriminator's parameters) adds the historical-averaging
    penalty; ``augment`` (DiffAugment) transforms both batches before the discriminator sees
    them. ``joint``: one forward pass over both batches, for a discriminator whose output for a
    sample depends on that sample alone (``Discriminator.per_sample``). Returns, detached,
    [d_loss, mean D(x), mean D(G(z)), feature-matching distance]: D(.) as ``objective.score``
    gives it. The distance is monitored in every mode.
    """
    fake = fake.detach()
    with autocast(x.device, amp_dtype):
        if augment is not None:
            x, fake = augment(x), augment(fake)
        real_logits, fake_logits, real_features, fake_features = _judge_both(
            discriminator, x, fake, joint
        )
        d_loss = objective.d_adversarial(
            real_logits, fake_logits, critic or discriminator, x, fake, eps
        )
        d_loss = objective.with_history(d_loss, discriminator, history)
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(d_loss).backward()
    scaler.step(opt_d)
    scaler.update()  # per optimizer step: critic steps may repeat this one
    with torch.no_grad():
        return torch.stack(
            [
                d_loss.float(),
                objective.score(real_logits.float()).mean(),
                objective.score(fake_logits.float()).mean(),
                losses.feature_matching_loss(real_features, fake_features),
            ]
        )


def _judge_both(
    discriminator: nn.Module, x: torch.Tensor, fake: torch.Tensor, joint: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(real logits, fake logits, real features, fake features): two forward passes, or one
    over the concatenated batch (``joint``)."""
    if not joint:
        real_logits, real_features = discriminator(x)
        fake_logits, fake_features = discriminator(fake)
        return real_logits, fake_logits, real_features, fake_features
    logits, features = discriminator(torch.cat([x, fake]))
    n = len(x)
    return logits[:n], logits[n:], features[:n], features[n:]


def _judge(
    discriminator: nn.Module,
    opt_d: torch.optim.Optimizer | None,
    objective: Objective,
    x: torch.Tensor,
    fake: torch.Tensor,
) -> nn.Module:
    """The discriminator, or (unrolled) its copy ``unrolled_steps`` differentiable Adam steps on
    its cross-entropy ahead (Metz et al. 2017), without the historical-averaging penalty."""
    if not objective.unrolled_steps:
        return discriminator
    if opt_d is None:
        raise ValueError("unrolled_steps needs the discriminator's optimizer opt_d")
    return unrolled.lookahead(
        discriminator,
        opt_d,
        lambda d: losses.d_bce_loss(d(x)[0], d(fake)[0], objective.real_label),
        objective.unrolled_steps,
    )


def generator_step(
    generator: nn.Module,
    discriminator: nn.Module,
    opt_g: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x: torch.Tensor,
    fake: torch.Tensor,
    objective: Objective,
    amp_dtype: torch.dtype | None = None,
    history: list[torch.Tensor] | None = None,
    opt_d: torch.optim.Optimizer | None = None,
    augment: Augment | None = None,
) -> torch.Tensor:
    """One generator update against the (just updated) discriminator; returns the loss.

    ``fake`` is ``generator``'s output, still attached to its graph. With feature matching the
    real batch's features come from the same judge (the discriminator, or its unrolled copy).
    The discriminator's weights are frozen for the step; ``history`` adds the
    historical-averaging penalty; ``augment`` (DiffAugment) transforms what the judge sees, and
    the generator learns through it.
    """
    discriminator.requires_grad_(False)
    augment = augment or (lambda t: t)
    try:
        with autocast(x.device, amp_dtype):
            judge = _judge(discriminator, opt_d, objective, x, fake)
            gen_logits, gen_features = judge(augment(fake))
            real_features = None
            if objective.fm:
                with torch.no_grad():
                    _, real_features = judge(augment(x))
            g_loss = objective.generator_loss(real_features, gen_logits, gen_features)
            g_loss = objective.with_history(g_loss, generator, history)
        opt_g.zero_grad(set_to_none=True)
        scaler.scale(g_loss).backward()
        scaler.step(opt_g)
        scaler.update()
    finally:
        discriminator.requires_grad_(True)
    return g_loss
