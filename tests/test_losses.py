"""The GAN losses against their formulas, computed by hand on fixed tensors."""

import math

import torch

from carsynth import losses


def test_feature_matching_is_squared_distance_of_batch_means() -> None:
    real = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]], requires_grad=True)
    fake = torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]], requires_grad=True)
    # means: real (2, 3, 4), fake (1, 1, 1); difference (1, 2, 3); squared norm 1 + 4 + 9.
    loss = losses.feature_matching_loss(real, fake)
    assert loss.item() == 14.0
    loss.backward()
    # d/d fake_b = -2 (mean_real - mean_fake) / B for every sample b of the batch of 2.
    assert torch.equal(fake.grad, -torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]))
    assert real.grad is None  # real features are detached


def test_feature_matching_compares_statistics_not_samples() -> None:
    # Same batch means, different samples: the paper's objective is zero, per-sample MSE is not.
    real = torch.tensor([[0.0, 4.0], [2.0, 0.0]])
    fake = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    assert losses.feature_matching_loss(real, fake).item() == 0.0


def test_feature_matching_flattens_feature_maps() -> None:
    real = torch.arange(16.0).view(2, 2, 2, 2)  # sample 0: 0..7, sample 1: 8..15; means 4..11
    fake = torch.zeros(2, 2, 2, 2)
    expected = sum((4.0 + i) ** 2 for i in range(8))
    assert losses.feature_matching_loss(real, fake).item() == expected


def _softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def test_discriminator_bce() -> None:
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 3.0])
    # -log sigmoid(r) = softplus(-r); -log(1 - sigmoid(f)) = softplus(f); batch means.
    expected = (_softplus(-2.0) + _softplus(0.0)) / 2 + (_softplus(-1.0) + _softplus(3.0)) / 2
    assert math.isclose(losses.d_bce_loss(real, fake).item(), expected, rel_tol=1e-6)


def test_generator_non_saturating() -> None:
    fake = torch.tensor([0.0, -2.0, 1.0])
    expected = (math.log(2.0) + _softplus(2.0) + _softplus(-1.0)) / 3
    assert math.isclose(losses.g_nonsaturating_loss(fake).item(), expected, rel_tol=1e-6)


def test_one_sided_label_smoothing() -> None:
    real, fake = torch.tensor([1.0]), torch.tensor([-2.0])
    # BCE towards 0.9: -(0.9 log s(r) + 0.1 log(1 - s(r))) = 0.9 softplus(-r) + 0.1 softplus(r);
    # the fake target stays 0: softplus(f).
    expected = 0.9 * _softplus(-1.0) + 0.1 * _softplus(1.0) + _softplus(-2.0)
    got = losses.d_bce_loss(real, fake, real_target=0.9).item()
    assert math.isclose(got, expected, rel_tol=1e-6)


def test_historical_averaging_penalty() -> None:
    params = [
        torch.tensor([1.0, 2.0], requires_grad=True),
        torch.tensor([[3.0]], requires_grad=True),
    ]
    averages = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    penalty = losses.historical_averaging_penalty(params, averages)
    assert penalty.item() == 1.0 + 4.0 + 4.0
    penalty.backward()  # d/d theta = 2 (theta - mean)
    assert params[0].grad.tolist() == [2.0, 4.0] and params[1].grad.tolist() == [[4.0]]


class _Linear(torch.nn.Module):
    """A critic D(x) = <w, x> with the (scores, features) interface of the discriminator."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x.flatten(1) * self.w).sum(1), x


def test_gradient_penalty_of_a_linear_critic() -> None:
    # grad_x <w, x> = w everywhere, so the penalty is (||w|| - 1)^2 = (5 - 1)^2 for w = (3, 4).
    critic = _Linear(torch.tensor([3.0, 4.0]))
    real, fake = torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.tensor([[5.0, 5.0], [2.0, 0.0]])
    penalty = losses.gradient_penalty(critic, real, fake, torch.tensor([[0.3], [0.9]]))
    assert math.isclose(penalty.item(), 16.0, rel_tol=1e-6)
    penalty.backward()  # create_graph: d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w|| = 1.6 w
    assert torch.allclose(critic.w.grad, torch.tensor([4.8, 6.4]))


def test_gradient_penalty_is_taken_at_the_interpolates() -> None:
    # D(x) = sum x^2 / 2 has gradient x: the penalty is mean (||x^|| - 1)^2 at x^ = e r + (1 - e) f.
    class Square(torch.nn.Module):
        def forward(self, x):
            return x.pow(2).sum(1) / 2, x

    real, fake = torch.tensor([[4.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    eps = torch.tensor([[0.5], [0.25]])  # x^ = (2, 0) and (0, 1.5): norms 2 and 1.5
    expected = ((2 - 1) ** 2 + (1.5 - 1) ** 2) / 2
    got = losses.gradient_penalty(Square(), real, fake, eps).item()
    assert math.isclose(got, expected, rel_tol=1e-6)


def test_wasserstein_losses() -> None:
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    assert losses.d_wasserstein_loss(real, fake).item() == -0.5 - 2.0
    assert losses.g_wasserstein_loss(fake).item() == 0.5
