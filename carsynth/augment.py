"""Differentiable augmentation of the discriminator's inputs (DiffAugment).

Zhao, Liu, Lin, Zhu & Han 2020, "Differentiable Augmentation for Data-Efficient GAN Training":
with little data the discriminator memorises the real frames and stops teaching the generator.
Augmenting every frame the discriminator sees (real and generated, in the discriminator's AND
the generator's step) with transformations that are differentiable, so the generator learns
through them, keeps it from memorising without teaching the generator to produce augmented
frames. The three transformation families of the paper, on images in [-1, 1], each sample with
its own random draw:

- ``color``: brightness x + (r - 0.5), saturation (x - mean_c x) * 2r + mean_c x, contrast
  (x - mean_chw x) * (r + 0.5) + mean_chw x, with r ~ U[0, 1) drawn per sample for each;
- ``translation``: shift by up to 1/8 of the image size in each direction, zeros filling in;
- ``cutout``: zero a square of half the image size at a uniformly drawn centre (it may be cut by
  the border).

Draws come from the ``generator`` passed in, so a seeded run repeats them exactly.
"""

from __future__ import annotations

import torch

POLICIES = ("color", "translation", "cutout")
TRANSLATION_RATIO = 0.125  # the paper's default shift: 1/8 of the image size
CUTOUT_RATIO = 0.5  # the paper's default square: half the image size


def parse_policy(policy: str) -> tuple[str, ...]:
    """'color,translation' -> ('color', 'translation'); ValueError naming an unknown name."""
    names = tuple(p.strip() for p in policy.split(",") if p.strip())
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {unknown}; choose from {', '.join(POLICIES)}")
    return names


def _uniform(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One U[0, 1) draw per sample, shaped (B, 1, 1, 1) like ``x``'s dtype."""
    r = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=generator)
    return r.to(x.dtype)


def brightness(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x + (r - 0.5): a random brightness offset in [-0.5, 0.5) per sample."""
    return x + (r - 0.5)


def saturation(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(x - mean over channels) * 2r + mean over channels: saturation scaled by 2r in [0, 2)."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (r * 2) + mean


def contrast(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(x - mean over C, H, W) * (r + 0.5) + mean: contrast scaled by r + 0.5 in [0.5, 1.5)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (r + 0.5) + mean


def color(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Brightness, saturation and contrast, each with its own draw per sample."""
    x = brightness(x, _uniform(x, generator))
    x = saturation(x, _uniform(x, generator))
    return contrast(x, _uniform(x, generator))


def translate(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """out[b, :, i, j] = x[b, :, i + dy[b], j + dx[b]], zero where that falls outside the image.

    ``dy``, ``dx``: int64 (B,). A gather from the zero-padded image, so gradients flow to the
    pixels that were kept.
    """
    b, _, h, w = x.shape
    pad = int(max(dy.abs().max(), dx.abs().max(), 0))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = torch.arange(h, device=x.device)[None, :] + (dy[:, None] + pad)  # (B, H)
    cols = torch.arange(w, device=x.device)[None, :] + (dx[:, None] + pad)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


def translation(
    x: torch.Tensor, generator: torch.Generator | None = None, ratio: float = TRANSLATION_RATIO
) -> torch.Tensor:
    """A random shift of up to ``ratio`` of the size (integer pixels, both signs) per sample."""
    b, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sy, sy + 1, (b,), device=x.device, generator=generator)
    dx = torch.randint(-sx, sx + 1, (b,), device=x.device, generator=generator)
    return translate(x, dy, dx)


def cutout_mask(
    shape: tuple[int, int, int], cy: torch.Tensor, cx: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """(B, 1, H, W) mask: 0 inside the ``size`` square whose top-left is (cy - size//2,
    cx - size//2) per sample, 1 elsewhere (the square may be cut by the border)."""
    b, h, w = shape
    rows = torch.arange(h, device=cy.device)[None, :] - (cy[:, None] - size[0] // 2)
    cols = torch.arange(w, device=cx.device)[None, :] - (cx[:, None] - size[1] // 2)
    inside_r = (rows >= 0) & (rows < size[0])
    inside_c = (cols >= 0) & (cols < size[1])
    return (~(inside_r[:, :, None] & inside_c[:, None, :]))[:, None]


def cutout(
    x: torch.Tensor, generator: torch.Generator | None = None, ratio: float = CUTOUT_RATIO
) -> torch.Tensor:
    """Zero a square of ``ratio`` x the size, its centre uniform over the image, per sample."""
    b, _, h, w = x.shape
    size = (int(h * ratio + 0.5), int(w * ratio + 0.5))
    cy = torch.randint(0, h + (1 - size[0] % 2), (b,), device=x.device, generator=generator)
    cx = torch.randint(0, w + (1 - size[1] % 2), (b,), device=x.device, generator=generator)
    return x * cutout_mask((b, h, w), cy, cx, size).to(x.dtype)


AUGMENTS = {"color": color, "translation": translation, "cutout": cutout}


def diff_augment(
    x: torch.Tensor, policy: tuple[str, ...], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply the policy's transformations in order (the paper's order: color, translation,
    cutout); an empty policy returns ``x`` itself."""
    for name in policy:
        x = AUGMENTS[name](x, generator)
    return x
