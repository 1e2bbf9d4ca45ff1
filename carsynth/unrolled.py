"""Unrolled GAN (Metz et al. 2017, "Unrolled Generative Adversarial Networks").

The generator trains against the discriminator as it will be K optimizer steps from now rather
than as it is: the surrogate objective is f_K(theta_G, theta_D) = f(theta_G, theta_D^K), with
theta_D^0 = theta_D and theta_D^{k+1} = theta_D^k + eta^k df(theta_G, theta_D^k)/dtheta_D^k
(section 2.1, eqs. 3-4), where eta^k is the discriminator's own optimizer. Each step is kept
differentiable (``create_graph=True``), so the generator's gradient also carries the term
df/dtheta_D^K . dtheta_D^K/dtheta_G (eq. 5): how the discriminator would react to the generator's
move. A generator that collapses onto one mode is punished by the discriminator's next steps,
which is why unrolling counters mode collapse (section 2.3).

As in the authors' reference code, the K steps are Adam steps that start from the discriminator
optimizer's current state (moments and step count) and use the same real and generated batch;
the real discriminator and its optimizer are left untouched: only the generator is updated from
the surrogate loss, the discriminator keeps its ordinary update (section 2.2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

# Adam's second moment is floored at this before the square root: where it is exactly zero, the
# derivative of sqrt would be infinite and turn the generator's gradient into NaN. The floor's
# square root (1e-15) is far below Adam's eps (1e-8), so the step itself does not change.
SECOND_MOMENT_FLOOR = 1e-30

Judge = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def lookahead(
    discriminator: nn.Module,
    optimizer: torch.optim.Adam,
    loss: Callable[[Judge], torch.Tensor],
    steps: int,
) -> Judge:
    """The discriminator after ``steps`` differentiable Adam steps on ``loss``, as a callable.

    ``loss(d)`` computes the discriminator's loss with ``d`` in place of the discriminator (d maps
    frames to (logits, features) like :class:`~carsynth.models.Discriminator`); pass generated
    frames still attached to the generator's graph, so that the returned discriminator depends on
    the generator's parameters. ``optimizer`` is the discriminator's Adam: its learning rate,
    betas, eps and per-parameter state are read, never written. Batch-norm running statistics
    are updated on copies, so ``discriminator`` is unchanged as well.
    """
    group = optimizer.param_groups[0]
    if len(optimizer.param_groups) > 1 or group["weight_decay"] or group["amsgrad"]:
        raise ValueError("lookahead unrolls plain Adam with one parameter group")
    lr, (beta1, beta2), eps = float(group["lr"]), group["betas"], group["eps"]
    names, params, exp_avg, exp_avg_sq, counts = [], [], [], [], []
    for name, p in discriminator.named_parameters():
        state = optimizer.state.get(p, {})
        names.append(name)
        params.append(p.detach().requires_grad_(True))
        if state:  # after the optimizer's first step
            exp_avg.append(state["exp_avg"].detach())
            exp_avg_sq.append(state["exp_avg_sq"].detach())
        else:
            exp_avg.append(torch.zeros_like(p))
            exp_avg_sq.append(torch.zeros_like(p))
        counts.append(float(state.get("step", 0)))
    buffers = {name: b.clone() for name, b in discriminator.named_buffers()}

    def judge_at(values: list[torch.Tensor]) -> Judge:
        weights = dict(zip(names, values, strict=True))
        return lambda x: functional_call(discriminator, (weights, buffers), (x,))

    for _ in range(steps):
        grads = torch.autograd.grad(loss(judge_at(params)), params, create_graph=True)
        updated = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            # torch.optim.Adam's update, written out so that autograd can differentiate it.
            counts[i] += 1
            exp_avg[i] = beta1 * exp_avg[i] + (1 - beta1) * g
            exp_avg_sq[i] = beta2 * exp_avg_sq[i] + (1 - beta2) * g * g
            correction1 = 1 - beta1 ** counts[i]
            correction2 = 1 - beta2 ** counts[i]
            denom = exp_avg_sq[i].clamp_min(SECOND_MOMENT_FLOOR).sqrt() / correction2**0.5 + eps
            updated.append(p - lr / correction1 * exp_avg[i] / denom)
        params = updated
    return judge_at(params)
