"""Unrolled GAN on the 2-D ring of Gaussians: does ``carsynth.unrolled`` stop the mode collapse?

The toy experiment of Metz et al. 2017 (section 3.1, figure 2): real points come from 8 Gaussians
spaced evenly on a circle; a plain GAN's generator hops from mode to mode, an unrolled one covers
them all. This script trains the same small GAN with ``--unroll`` K = 0 (plain) and K > 0
(:func:`carsynth.unrolled.lookahead`) for each seed and counts the modes the generator covers. It
checks carsynth's unrolling end to end on a problem whose answer is known, in a few minutes on a
CPU.

Networks and optimisers follow the authors' demo notebook (github.com/poolio/unrolled_gan):
generator 256 -> 128 -> 128 -> 2 and discriminator 2 -> 128 -> 128 -> 1 with tanh, orthogonal
initialisation (gain 1.4), Adam with beta1 0.5, learning rates 1e-3 (generator) and 1e-4
(discriminator), batch 512, K = 5. The ring has radius 2 and standard deviation 0.02. Scoring, as
in the later mode-collapse literature (e.g. Srivastava et al. 2017, VEEGAN): a generated point is
high quality within 3 standard deviations of a mode's centre, and a mode is covered when at least
1% of the samples are high-quality points of it.

    python3 scripts/unrolled_mixture.py --out runs/unrolled_mixture --steps 5000 --seeds 0 1 2

Output in ``--out``: ``results.json`` (settings and one row per run), ``results.md`` (the table)
and ``samples.png`` (every run's samples over the ring: a row per seed, a column per K).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carsynth import files, losses, unrolled

MODES, RADIUS, STD = 8, 2.0, 0.02  # the ring of Gaussians


@dataclass
class MixtureConfig:
    """Every setting of the experiment; all are recorded in ``results.json``."""

    out: str  # output folder
    steps: int = 5000  # generator (and discriminator) updates per run
    unroll: list[int] = field(default_factory=lambda: [0, 5])  # K values compared
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    batch_size: int = 512
    nz: int = 256  # latent size
    hidden: int = 128  # units per hidden layer
    lr_g: float = 1e-3
    lr_d: float = 1e-4
    beta1: float = 0.5
    samples: int = 5000  # generated points scored per run
    eval_every: int = 1000  # steps between coverage counts (a plain GAN's modes come and go)
    covered_share: float = 0.01  # a mode is covered with this share of the samples near it


def centres() -> torch.Tensor:
    """The modes' centres on the circle, (MODES, 2)."""
    angle = torch.arange(MODES, dtype=torch.float32) * 2 * math.pi / MODES
    return RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], 1)


def real_points(n: int, rng: torch.Generator) -> torch.Tensor:
    """``n`` points of the mixture: a uniformly chosen mode plus N(0, STD^2) noise."""
    mode = torch.randint(0, MODES, (n,), generator=rng)
    return centres()[mode] + STD * torch.randn(n, 2, generator=rng)


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with tanh between them, orthogonally initialised (gain 1.4)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layer = nn.Linear(a, b)
        nn.init.orthogonal_(layer.weight, gain=1.4)
        nn.init.zeros_(layer.bias)
        layers += [layer, nn.Tanh()] if i < len(sizes) - 2 else [layer]
    return nn.Sequential(*layers)


class Discriminator(nn.Module):
    """Points -> (logits, last hidden features), the interface ``unrolled.lookahead`` expects."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.body, self.head = mlp([2, hidden, hidden]), nn.Linear(hidden, 1)
        nn.init.orthogonal_(self.head.weight, gain=1.4)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.tanh(self.body(x))
        return self.head(features).flatten(), features


def score(points: torch.Tensor, covered_share: float) -> dict[str, Any]:
    """Modes covered, the share of high-quality points, and each mode's share of the points."""
    distance, mode = torch.cdist(points, centres()).min(1)
    good = distance < 3 * STD
    shares = torch.bincount(mode[good], minlength=MODES).float() / len(points)
    return {
        "modes_covered": int((shares >= covered_share).sum()),
        "high_quality": float(good.float().mean()),
        "mode_shares": [round(float(s), 4) for s in shares],
    }


def run(c: MixtureConfig, k: int, seed: int) -> tuple[dict[str, Any], torch.Tensor]:
    """Train one GAN with ``k`` unrolled steps; its result row and its scored samples."""
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)  # training batches and noise
    eval_rng = torch.Generator().manual_seed(2**32 + seed)  # scoring: independent of eval_every
    generator = mlp([c.nz, c.hidden, c.hidden, 2])
    discriminator = Discriminator(c.hidden)
    opt_g = torch.optim.Adam(generator.parameters(), lr=c.lr_g, betas=(c.beta1, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=c.lr_d, betas=(c.beta1, 0.999))
    start = time.perf_counter()
    timeline = []  # modes covered every eval_every steps
    for step in range(1, c.steps + 1):
        x = real_points(c.batch_size, rng)
        fake = generator(torch.randn(c.batch_size, c.nz, generator=rng))
        d_loss = losses.d_bce_loss(discriminator(x)[0], discriminator(fake.detach())[0])
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        judge = discriminator
        if k:
            judge = unrolled.lookahead(
                discriminator,
                opt_d,
                lambda d, x=x, fake=fake: losses.d_bce_loss(d(x)[0], d(fake)[0]),
                k,
            )
        g_loss = losses.g_nonsaturating_loss(judge(fake)[0])
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
        if step % c.eval_every == 0 or step == c.steps:
            with torch.no_grad():
                points = generator(torch.randn(c.samples, c.nz, generator=eval_rng))
            timeline.append(score(points, c.covered_share)["modes_covered"])
    row = {"unroll": k, "seed": seed, **score(points, c.covered_share), "timeline": timeline}
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row, points


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table row per run."""
    lines = ["| K (unrolled steps) | seed | modes covered | high-quality points "
             "| modes covered during the run | seconds |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['unroll']} | {r['seed']} | {r['modes_covered']}/{MODES} "
            f"| {r['high_quality']:.1%} | {' '.join(map(str, r['timeline']))} "
            f"| {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot(samples: dict[tuple[int, int], torch.Tensor], path: Path) -> None:
    """Each run's generated points (blue) over the modes' centres (red): a row per seed, a
    column per K."""
    from matplotlib.figure import Figure

    ks = sorted({k for k, _ in samples})
    seeds = sorted({seed for _, seed in samples})
    fig = Figure(figsize=(2.4 * len(ks), 2.5 * len(seeds)), layout="constrained")
    axes = fig.subplots(len(seeds), len(ks), squeeze=False)
    for (k, seed), points in samples.items():
        ax = axes[seeds.index(seed), ks.index(k)]
        ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.3)
        ax.scatter(*centres().T, s=10, c="red")
        ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal", title=f"K = {k}, seed {seed}")
        ax.set_xticks([])
        ax.set_yticks([])
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=72, format="png"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=5000, help="updates per run")
    p.add_argument("--unroll", type=int, nargs="+", default=[0, 5], help="K values")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-every", type=int, default=1000, help="steps between coverage counts")
    args = p.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1 or min(args.unroll) < 0:
        print(
            "unrolled_mixture: error: --steps and --eval-every must be >= 1, --unroll >= 0",
            file=sys.stderr,
        )
        return 2
    c = MixtureConfig(out=args.out, steps=args.steps, unroll=args.unroll, seeds=args.seeds,
                      eval_every=args.eval_every)  # fmt: skip
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, samples = [], {}
    for k in c.unroll:
        for seed in c.seeds:
            row, points = run(c, k, seed)
            rows.append(row)
            samples[k, seed] = points
            print(markdown([row]).splitlines()[-1], flush=True)
    table = markdown(rows)
    record = {"config": asdict(c), "results": rows}
    for name, text in (("results.json", json.dumps(record, indent=2) + "\n"),
                       ("results.md", table + "\n")):  # fmt: skip
        files.atomic_write(out / name, lambda tmp, text=text: tmp.write_text(text))
    plot(samples, out / "samples.png")
    print(table)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)  # small networks: one thread is fastest
    sys.exit(main())
