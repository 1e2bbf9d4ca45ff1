"""Seeded latents and frame generation: frame i of a seed is the same frame however it is made.

Latents come in blocks of ``LATENT_BLOCK`` rows; block b is drawn from a generator seeded from
(seed, b), so frame i's latent depends only on (seed, i): any frame (or shard of frames) can be
regenerated alone, in any batch size, on any machine.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from carsynth.devices import resolve_device
from carsynth.files import to_uint8
from carsynth.models import IMAGE_SIZE

LATENT_BLOCK = 1024


def mix_seed(*keys: int) -> int:
    """A 63-bit torch seed from several integers, decorrelated by NumPy's SeedSequence hashing."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0]
    return int(state) & (2**63 - 1)


def latents(seed: int, start: int, count: int, nz: int) -> torch.Tensor:
    """Latents of frames ``start`` .. ``start + count - 1``: float32 (count, nz, 1, 1), N(0, 1)."""
    if start < 0 or count < 0:
        raise ValueError(f"start and count must be >= 0, got {start}, {count}")
    parts = []
    end = start + count
    for block in range(start // LATENT_BLOCK, (end - 1) // LATENT_BLOCK + 1 if count else 0):
        generator = torch.Generator().manual_seed(mix_seed(seed, block))
        rows = torch.randn(LATENT_BLOCK, nz, generator=generator)
        lo = max(start, block * LATENT_BLOCK) - block * LATENT_BLOCK
        hi = min(end, (block + 1) * LATENT_BLOCK) - block * LATENT_BLOCK
        parts.append(rows[lo:hi])
    if not parts:
        return torch.zeros(0, nz, 1, 1)
    return torch.cat(parts).view(count, nz, 1, 1)


@torch.no_grad()
def generate_frames(
    generator: nn.Module,
    seed: int,
    start: int,
    count: int,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Frames ``start`` .. ``start + count - 1`` of ``seed``: uint8 (count, H, W, 3).

    ``generator`` should be in eval mode (``rundir.load_generator`` returns it so), which makes
    each frame independent of the others in its batch.
    """
    device = resolve_device(device)
    nz = generator.nz
    out = []
    with tqdm(total=count, disable=not progress, unit="frame", desc="generate") as bar:
        for at in range(start, start + count, batch_size):
            n = min(batch_size, start + count - at)
            z = latents(seed, at, n, nz).to(device)
            out.append(to_uint8(generator(z)).cpu().numpy())
            bar.update(n)
    if not out:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return np.concatenate(out)
