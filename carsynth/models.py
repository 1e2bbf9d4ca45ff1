"""The DCGAN-64 networks (Radford et al. 2015, "Unsupervised Representation Learning with Deep
Convolutional Generative Adversarial Networks"), shaped like pytorch/examples ``dcgan/main.py``.

The discriminator also returns an intermediate feature map, which the feature-matching generator
loss compares between real and generated batches (Salimans et al. 2016).
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_SIZE = 64  # the only frame size these networks produce and accept
FEATURE_LAYERS = (1, 2, 3, 4)  # discriminator blocks whose output ``fm_layer`` may name
LOWPASS = ("off", "last", "all")  # where Generator filters its upsamplings (see LowPass)


def init_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02); batch-norm scales N(1, 0.02), shifts 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class LowPass(nn.Module):
    """The separable binomial filter [1, 2, 1] x [1, 2, 1] / 16 on every channel, edges
    replicated (so a flat image stays flat up to its border).

    After a stride-2 transposed convolution it removes the checkerboard pattern that the uneven
    overlap of the kernel leaves (Odena et al. 2016, "Deconvolution and Checkerboard
    Artifacts"), the way StyleGAN filters every upsampling (Karras et al. 2019; Zhang 2019,
    "Making Convolutional Networks Shift-Invariant Again"). It has no weights.
    """

    def __init__(self) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("kernel", (taps[:, None] * taps[None, :] / 16)[None, None],
                             persistent=False)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        x = nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
        kernel = self.kernel.to(x.dtype).expand(channels, 1, 3, 3)
        return nn.functional.conv2d(x, kernel, groups=channels)


class Generator(nn.Module):
    """z (B, nz, 1, 1) -> image (B, 3, 64, 64) in [-1, 1].

    Transposed convolutions double the size 4 -> 8 -> 16 -> 32 -> 64 while halving the width
    ngf*8 -> ngf; batch norm and ReLU between them, tanh at the output (Radford et al. 2015).
    ``lowpass`` follows stride-2 transposed convolutions by :class:`LowPass`: "last" the final
    one (32x32 -> 64x64) only, "all" each of the four, "off" none.
    """

    def __init__(self, nz: int = 100, ngf: int = 64, lowpass: str = "off") -> None:
        super().__init__()
        if lowpass not in LOWPASS:
            raise ValueError(f"lowpass must be one of {LOWPASS}, got {lowpass!r}")
        self.nz, self.ngf, self.lowpass = nz, ngf, lowpass

        def upsample(cin: int, cout: int, last: bool = False) -> list[nn.Module]:
            conv = nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False)
            filtered = lowpass == "all" or (last and lowpass == "last")
            return [conv, LowPass()] if filtered else [conv]

        def up(cin: int, cout: int) -> list[nn.Module]:
            return [*upsample(cin, cout), nn.BatchNorm2d(cout), nn.ReLU(True)]

        self.net = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),  # 1x1 -> 4x4
            nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            *up(ngf * 8, ngf * 4),  # 8x8
            *up(ngf * 4, ngf * 2),  # 16x16
            *up(ngf * 2, ngf),  # 32x32
            *upsample(ngf, 3, last=True),  # 64x64
            nn.Tanh(),
        )
        self.apply(init_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class MinibatchDiscrimination(nn.Module):
    """Minibatch discrimination (Salimans et al. 2016, section 3.2).

    Features f (N, A) are projected by a learned tensor T (A, B x C) to M (N, B, C). For each of
    the B kernels, c_b(i, j) = exp(-|| M_i,b - M_j,b ||_1) and o(x_i)_b = sum_{j != i} c_b(i, j):
    how close sample i is to the others of its batch. A collapsed generator makes these closeness
    values large, which the discriminator then sees. The j = i term (always exp(0) = 1) is left out,
    as in the authors' code.
    """

    def __init__(self, in_features: int, kernels: int, kernel_dim: int) -> None:
        super().__init__()
        self.kernels, self.kernel_dim = kernels, kernel_dim
        self.T = nn.Parameter(torch.randn(in_features, kernels * kernel_dim) * 0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        m = (features @ self.T).view(-1, self.kernels, self.kernel_dim)  # (N, B, C)
        l1 = (m.unsqueeze(1) - m.unsqueeze(0)).abs().sum(-1)  # (N, N, B)
        return torch.exp(-l1).sum(1) - 1.0  # drop the j = i term


class Discriminator(nn.Module):
    """image (B, 3, 64, 64) -> (logits (B,), features of block ``fm_layer``).

    ``fm_layer`` may name several blocks (a tuple): the features are then their outputs,
    flattened and concatenated (B, sum of C*H*W), so that feature matching matches all of them.

    Four strided-convolution blocks halve the size 64 -> 32 -> 16 -> 8 -> 4 with LeakyReLU(0.2),
    batch norm on all but the first (Radford et al. 2015); a 4x4 convolution gives one logit. The
    default feature layer is block 4, the last one before the classifier.

    ``minibatch_kernels`` > 0 adds minibatch discrimination on the flattened block-4 output; its
    B closeness values enter the classifier as B extra constant 4x4 channels. ``norm=False``
    drops batch norm everywhere: the WGAN-GP critic (Gulrajani et al. 2017, section 4) penalises
    each sample's gradient, which batch statistics would couple across the batch.

    ``spectral_norm=True`` divides every convolution's weight by its largest singular value,
    estimated by one power iteration per training forward (Miyato et al. 2018, "Spectral
    Normalization for Generative Adversarial Networks"), which bounds the discriminator's
    Lipschitz constant; their discriminators have no batch norm, so it is dropped here too.
    """

    def __init__(
        self,
        ndf: int = 64,
        fm_layer: int | tuple[int, ...] = 4,
        minibatch_kernels: int = 0,
        minibatch_kernel_dim: int = 5,
        norm: bool = True,
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        layers = (fm_layer,) if isinstance(fm_layer, int) else tuple(fm_layer)
        if not layers or any(layer not in FEATURE_LAYERS for layer in layers):
            raise ValueError(f"fm_layer must be in {FEATURE_LAYERS}, got {fm_layer}")
        self.ndf, self.fm_layer = ndf, layers
        norm = norm and not spectral_norm

        def down(cin: int, cout: int, norm: bool) -> nn.Sequential:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 4, 2, 1, bias=False)]
            if norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            return nn.Sequential(*layers)

        self.blocks = nn.ModuleList(
            [
                down(3, ndf, norm=False),  # 32x32
                down(ndf, ndf * 2, norm=norm),  # 16x16
                down(ndf * 2, ndf * 4, norm=norm),  # 8x8
                down(ndf * 4, ndf * 8, norm=norm),  # 4x4
            ]
        )
        self.minibatch = (
            MinibatchDiscrimination(ndf * 8 * 4 * 4, minibatch_kernels, minibatch_kernel_dim)
            if minibatch_kernels
            else None
        )
        self.classifier = nn.Conv2d(ndf * 8 + minibatch_kernels, 1, 4, 1, 0, bias=False)
        self.apply(init_weights)
        if spectral_norm:
            for conv in [m for m in self.modules() if isinstance(m, nn.Conv2d)]:
                nn.utils.parametrizations.spectral_norm(conv)
        # Each sample's output depends on that sample alone (no batch norm, no minibatch
        # features): real and generated batches may then share one forward pass.
        self.per_sample = not norm and self.minibatch is None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = []
        for i, block in enumerate(self.blocks, start=1):
            x = block(x)
            if i in self.fm_layer:
                features.append(x)
        if len(features) > 1:
            features = [torch.cat([f.flatten(1) for f in features], 1)]
        if self.minibatch is not None:
            closeness = self.minibatch(x.flatten(1).float()).to(x.dtype)
            x = torch.cat([x, closeness[:, :, None, None].expand(-1, -1, *x.shape[2:])], 1)
        return self.classifier(x).flatten(), features[0]
