"""Unrolled GAN (Metz et al. 2017): the lookahead discriminator and the gradient through it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carsynth import losses, unrolled
from carsynth.models import Discriminator, Generator
from carsynth.training import TrainConfig, generator_step, make_objective


def warm_adam(
    d: nn.Module, x: torch.Tensor, fake: torch.Tensor, lr: float, taken: int = 2
) -> torch.optim.Adam:
    """An Adam for ``d`` that has taken ``taken`` steps (moments and count not zero)."""
    opt = torch.optim.Adam(d.parameters(), lr=lr, betas=(0.5, 0.999))
    for _ in range(taken):
        opt.zero_grad()
        losses.d_bce_loss(d(x)[0], d(fake)[0]).backward()
        opt.step()
    return opt


@pytest.mark.parametrize(("steps", "taken"), [(0, 2), (1, 2), (3, 2), (2, 0)])
def test_lookahead_equals_torch_adam_steps_and_changes_nothing(steps: int, taken: int) -> None:
    # The lookahead, written out by hand, must land where torch.optim.Adam lands from the same
    # state on the same loss, and leave the real discriminator and optimizer as they were.
    torch.manual_seed(0)
    d = Discriminator(8, minibatch_kernels=3)
    x, fake = torch.rand(6, 3, 64, 64) * 2 - 1, torch.rand(6, 3, 64, 64) * 2 - 1
    opt = warm_adam(d, x, fake, lr=1e-3, taken=taken)  # taken=0: a fresh optimizer
    before = copy.deepcopy(d.state_dict()), copy.deepcopy(opt.state_dict())

    def loss(judge):
        return losses.d_bce_loss(judge(x)[0], judge(fake)[0], 0.9)

    judge = unrolled.lookahead(d, opt, loss, steps)

    reference = copy.deepcopy(d)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-3, betas=(0.5, 0.999))
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # it would share the moments
    for _ in range(steps):
        ref_opt.zero_grad()
        loss(reference).backward()
        ref_opt.step()
    for got, want in zip(judge(x), reference(x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d.state_dict(), before[0], rtol=0, atol=0)
    torch.testing.assert_close(opt.state_dict(), before[1], rtol=0, atol=0)


class TinyDiscriminator(nn.Module):
    """Two linear layers on 4 numbers; returns (logits, features) like the real one."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(4, 3), nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.hidden(x))
        return self.out(h).flatten(), h


def test_generator_gradient_through_the_unrolled_steps_matches_finite_differences() -> None:
    # The surrogate f_K(theta_G) of eq. 4 differentiated by autograd through K Adam steps
    # (eq. 5), checked against central finite differences. The cross-entropies are written here
    # in double precision (carsynth's losses work in float32, too coarse for the differences).
    torch.manual_seed(1)
    d = TinyDiscriminator().double()
    x, z = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    opt = warm_adam(d, x, z, lr=0.05)

    def d_loss(judge, fake):  # -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z))))
        return F.softplus(-judge(x)[0]).mean() + F.softplus(judge(fake)[0]).mean()

    def surrogate(theta: torch.Tensor, steps: int = 3) -> torch.Tensor:
        fake = z * theta  # a generator with four parameters
        judge = unrolled.lookahead(d, opt, lambda j: d_loss(j, fake), steps)
        return F.softplus(-judge(fake)[0]).mean()  # the non-saturating generator loss

    theta = torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(surrogate, (theta,), eps=1e-6, atol=1e-7, rtol=1e-4)

    # The unrolled gradient is not the plain one: the discriminator's response (eq. 5's second
    # term, and its moved weights) changes it.
    (plain,) = torch.autograd.grad(surrogate(theta, steps=0), theta)
    (ahead,) = torch.autograd.grad(surrogate(theta), theta)
    assert (plain - ahead).abs().max() > 1e-3


def test_generator_step_with_unrolling_updates_only_the_generator() -> None:
    torch.manual_seed(0)
    g, d = Generator(8, 8), Discriminator(8)
    x, z = torch.rand(4, 3, 64, 64) * 2 - 1, torch.randn(4, 8, 1, 1)
    opt_g = torch.optim.Adam(g.parameters(), lr=1e-3)
    opt_d = warm_adam(d, x, g(z).detach(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    d_before, opt_before = copy.deepcopy(d.state_dict()), copy.deepcopy(opt_d.state_dict())
    g_before = [p.detach().clone() for p in g.parameters()]

    config = TrainConfig(data="", out="", fm=True, unrolled_steps=2)
    g_loss = generator_step(g, d, opt_g, scaler, x, g(z), make_objective(config), opt_d=opt_d)

    assert torch.isfinite(g_loss)
    assert all(not torch.equal(a, b) for a, b in zip(g_before, g.parameters(), strict=True))
    torch.testing.assert_close(d.state_dict(), d_before, rtol=0, atol=0)
    torch.testing.assert_close(opt_d.state_dict(), opt_before, rtol=0, atol=0)
