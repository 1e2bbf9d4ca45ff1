"""DCGAN-64 shapes and initialisation, and the seeded latents/frames contract export relies on."""

import numpy as np
import pytest
import torch
from torch import nn

from carsynth.files import to_uint8
from carsynth.models import Discriminator, Generator, MinibatchDiscrimination
from carsynth.sampling import LATENT_BLOCK, generate_frames, latents

torch.set_num_threads(1)  # tiny networks: threads only fight over the two shared cores


def test_generator_shape_and_range() -> None:
    torch.manual_seed(0)
    images = Generator(nz=8, ngf=4)(torch.randn(5, 8, 1, 1))
    assert images.shape == (5, 3, 64, 64)
    assert images.min() >= -1 and images.max() <= 1


@pytest.mark.parametrize("layer, channels, size", [(1, 4, 32), (2, 8, 16), (3, 16, 8), (4, 32, 4)])
def test_discriminator_logits_and_features(layer: int, channels: int, size: int) -> None:
    logits, features = Discriminator(ndf=4, fm_layer=layer)(torch.randn(3, 3, 64, 64))
    assert logits.shape == (3,)
    assert features.shape == (3, channels, size, size)


def test_discriminator_rejects_unknown_layer() -> None:
    with pytest.raises(ValueError, match="fm_layer"):
        Discriminator(ndf=4, fm_layer=5)


def test_dcgan_initialisation() -> None:
    torch.manual_seed(0)
    g, d = Generator(), Discriminator()
    first = g.net[0].weight  # 100 x 512 x 4 x 4 = 819,200 draws
    assert abs(first.mean().item()) < 1e-3 and abs(first.std().item() - 0.02) < 1e-3
    bn = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    scales = torch.cat([m.weight for m in bn])
    assert abs(scales.mean().item() - 1) < 0.01 and abs(scales.std().item() - 0.02) < 0.005
    assert all(torch.all(m.bias == 0) for m in bn)
    # Batch norm in every discriminator block except the first (Radford et al. 2015).
    has_bn = [any(isinstance(m, nn.BatchNorm2d) for m in b) for b in d.blocks]
    assert has_bn == [False, True, True, True]


def test_latents_depend_only_on_seed_and_index() -> None:
    whole = latents(7, 0, LATENT_BLOCK + 50, nz=6)
    assert whole.shape == (LATENT_BLOCK + 50, 6, 1, 1) and whole.dtype == torch.float32
    assert torch.equal(latents(7, LATENT_BLOCK - 3, 10, nz=6), whole[LATENT_BLOCK - 3 :][:10])
    assert torch.equal(latents(7, 5, 1, nz=6), whole[5:6])
    assert not torch.equal(latents(8, 0, 10, nz=6), whole[:10])
    assert abs(whole.mean().item()) < 0.05 and abs(whole.std().item() - 1) < 0.05
    assert latents(7, 3, 0, nz=6).shape == (0, 6, 1, 1)


def test_to_uint8_rounds_tanh_range() -> None:
    images = torch.tensor([-1.0, 0.0, 1.0, -0.5]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    pixels = to_uint8(images)
    assert pixels.shape == (1, 2, 2, 3) and pixels.dtype == torch.uint8
    # (v + 1) * 127.5: 0, 127.5 -> 128 (round half to even), 255, 63.75 -> 64.
    assert pixels[0, :, :, 0].tolist() == [[0, 128], [255, 64]]


def test_generate_frames_is_independent_of_batching() -> None:
    torch.manual_seed(0)
    g = Generator(nz=8, ngf=4).eval()
    frames = generate_frames(g, seed=3, start=0, count=12, batch_size=5)
    assert frames.shape == (12, 64, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(generate_frames(g, 3, 7, 4, batch_size=64), frames[7:11])
    expected = to_uint8(g(latents(3, 0, 12, 8))).numpy()
    np.testing.assert_array_equal(frames, expected)


def test_minibatch_discrimination_formula() -> None:
    layer = MinibatchDiscrimination(in_features=2, kernels=1, kernel_dim=2)
    with torch.no_grad():
        layer.T.copy_(torch.eye(2))  # M = f
    f = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    # L1 distances: d01 = 1, d02 = 2, d12 = 3; o_i = sum over j != i of exp(-d_ij).
    e = np.exp
    expected = [[e(-1) + e(-2)], [e(-1) + e(-3)], [e(-2) + e(-3)]]
    np.testing.assert_allclose(layer(f).detach().numpy(), expected, rtol=1e-6)


def test_minibatch_discrimination_lets_samples_see_their_batch() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    changed = x.clone()
    changed[3] = torch.randn(3, 64, 64)
    for kernels, coupled in ((0, False), (6, True)):
        d = Discriminator(ndf=4, minibatch_kernels=kernels, minibatch_kernel_dim=3).eval()
        with torch.no_grad():
            logits, _ = d(x)
            other, _ = d(changed)
        assert logits.shape == (4,)
        # Sample 0's logit depends on sample 3 only through the minibatch features.
        assert (not torch.equal(logits[0], other[0])) == coupled
