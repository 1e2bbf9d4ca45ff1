"""Training throughput: ``carsynth train`` against the PyTorch DCGAN example's loop.

The reference is the loop of pytorch/examples ``dcgan/main.py``: a torch DataLoader over the
HDF5 file (one h5py read per frame, ToTensor-style scaling in the workers), the same networks and
batch size, the non-saturating loss, and ``.item()`` on the losses every step as the example
prints them. Both run the same number of generator steps in this process, timed end to end
(setup included); the ratio is carsynth's images/s over the reference's.

A second table (``--cpu-levers``) times the training step itself (one D update, one G update,
the EMA) under the CPU throughput levers, each against the plain fp32 step of the same run:
torch threads, channels_last, bf16 autocast, ``torch.compile``, the recipe's spectral-norm
discriminator (one forward over real and generated frames) and DiffAugment's cost.

    python -m scripts.bench_train --steps 20 --threads 1
    python -m scripts.bench_train --cpu-levers --ngf 32 --ndf 32 --steps 30 [--compile]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from carsynth import storage
from carsynth.augment import diff_augment, parse_policy
from carsynth.devices import resolve_device
from carsynth.files import to_float
from carsynth.models import Discriminator, Generator
from carsynth.training import Networks, TrainConfig, make_objective, train
from carsynth.training.steps import discriminator_step, generator_step

ROOT = Path(__file__).resolve().parents[1]


class H5Frames(Dataset):
    """The training frames of a carsynth file, one h5py read per item (opened per worker)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with storage.open_frame_file(path) as f:
            self.rows = np.concatenate([np.arange(a, b) for a, b in f.frame_ranges("train")])
            self.name = f.frames.name  # "frames" or, in a schema-2 real file, "observations"
        self.h5: h5py.File | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.h5 is None:
            self.h5 = h5py.File(self.path, "r")
        frame = torch.from_numpy(self.h5[self.name][int(self.rows[i])])
        return to_float(frame)


def reference(args: argparse.Namespace, device: torch.device) -> float:
    """The DCGAN example's loop for ``args.steps`` steps; returns images/s."""
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    loader = DataLoader(
        H5Frames(args.data), batch_size=args.batch_size, shuffle=True, drop_last=True,
        num_workers=args.workers, persistent_workers=args.workers > 0,
    )  # fmt: skip
    net_g = Generator(args.nz, args.ngf).to(device)
    net_d = Discriminator(args.ndf).to(device)
    criterion = nn.BCEWithLogitsLoss()
    opt_d = torch.optim.Adam(net_d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(net_g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    step = 0
    while step < args.steps:
        for real in loader:
            real = real.to(device)
            b = real.size(0)
            net_d.zero_grad()
            err_real = criterion(net_d(real)[0], torch.ones(b, device=device))
            err_real.backward()
            fake = net_g(torch.randn(b, args.nz, 1, 1, device=device))
            err_fake = criterion(net_d(fake.detach())[0], torch.zeros(b, device=device))
            err_fake.backward()
            opt_d.step()
            net_g.zero_grad()
            err_g = criterion(net_d(fake)[0], torch.ones(b, device=device))
            err_g.backward()
            opt_g.step()
            (err_real + err_fake).item(), err_g.item()  # the example prints both every step
            step += 1
            if step == args.steps:
                break
    return args.steps * args.batch_size / (time.perf_counter() - start)


def ours(args: argparse.Namespace, fm: bool) -> float:
    """``carsynth train`` for ``args.steps`` steps (one checkpoint and grid at the end)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            data=str(args.data), out=str(Path(tmp) / "run"), nz=args.nz, ngf=args.ngf,
            ndf=args.ndf, fm=fm, batch_size=args.batch_size, steps=args.steps, seed=args.seed,
            device=args.device, log_interval=50, progress=False,
        )  # fmt: skip
        start = time.perf_counter()
        train(config)
        return args.steps * args.batch_size / (time.perf_counter() - start)


# The CPU levers: TrainConfig changes, and the step's layout/precision/compile/threads.
LEVERS: dict[str, dict] = {
    "fp32 (baseline)": {},
    "1 thread": {"threads": 1},
    "channels_last": {"channels_last": True},
    "bf16 autocast": {"amp": torch.bfloat16},
    "bf16 + channels_last": {"amp": torch.bfloat16, "channels_last": True},
    "torch.compile": {"compile": True},
    "SN D, one forward (recipe D)": {"config": {"spectral_norm": True}},
    "SN D, two forwards": {"config": {"spectral_norm": True}, "joint": False},
    "+ DiffAugment (color,translation,cutout)": {"augment": "color,translation,cutout"},
}


def lever_rate(args: argparse.Namespace, frames: torch.Tensor, lever: dict) -> float:
    """images/s of ``args.steps`` training steps (after 3 untimed warm-up steps) with a lever."""
    threads = torch.get_num_threads()
    torch.set_num_threads(lever.get("threads", threads))
    config = TrainConfig(data="-", out="-", nz=args.nz, ngf=args.ngf, ndf=args.ndf, fm=True,
                         batch_size=args.batch_size, **lever.get("config", {}))  # fmt: skip
    device = torch.device("cpu")
    nets = Networks.build(config, device)
    layout = torch.channels_last if lever.get("channels_last") else torch.contiguous_format
    nets.generator.to(memory_format=layout)
    nets.discriminator.to(memory_format=layout)
    g, d = nets.generator, nets.discriminator
    if lever.get("compile"):
        g, d = torch.compile(g), torch.compile(d)
    amp = lever.get("amp")
    objective = make_objective(config)
    policy = parse_policy(lever.get("augment", ""))
    noise = torch.Generator().manual_seed(0)
    augment = (lambda t: diff_augment(t, policy, noise)) if policy else None
    joint = lever.get("joint", nets.discriminator.per_sample)

    def step(i: int) -> None:
        x = frames[(i * args.batch_size) % (len(frames) - args.batch_size) :][: args.batch_size]
        x = x.permute(0, 3, 1, 2).float().div(127.5).sub(1).contiguous(memory_format=layout)
        z = torch.randn(args.batch_size, args.nz, 1, 1, generator=noise)
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            fake = g(z)
        discriminator_step(d, nets.opt_d, nets.scaler, x, fake, objective, amp, augment=augment,
                           joint=joint)  # fmt: skip
        generator_step(g, d, nets.opt_g, nets.scaler, x, fake, objective, amp, augment=augment)
        nets.average(i, config.ema_beta(args.batch_size, i))

    for i in range(3):
        step(i)
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    rate = args.steps * args.batch_size / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return rate


def cpu_levers(args: argparse.Namespace) -> dict[str, float]:
    """The lever table, a row printed as each lever is timed: images/s and the ratio to fp32."""
    with storage.open_frame_file(args.data) as f:
        frames = torch.from_numpy(f.read("train", limit=2048))
    levers = {k: v for k, v in LEVERS.items() if args.compile or not v.get("compile")}
    print(
        f"cpu, batch {args.batch_size}, {args.steps} steps, nz/ngf/ndf "
        f"{args.nz}/{args.ngf}/{args.ndf}, torch threads {torch.get_num_threads()}, --fm"
    )
    print(f"| {'step':<40} | {'images/s':>9} | {'ratio':>6} |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 8}|", flush=True)
    rates: dict[str, float] = {}
    for name, lever in levers.items():
        rates[name] = lever_rate(args, frames, lever)
        ratio = rates[name] / rates["fp32 (baseline)"]
        print(f"| {name:<40} | {rates[name]:>9.1f} | {ratio:>5.2f}x |", flush=True)
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "carracing_small.h5")
    p.add_argument("--steps", type=int, default=20, help="generator steps per contender")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--nz", type=int, default=100)
    p.add_argument("--ngf", type=int, default=64)
    p.add_argument("--ndf", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="reference DataLoader workers")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("bench_train.json"))
    p.add_argument("--cpu-levers", action="store_true", help="the CPU step-lever table instead")
    p.add_argument("--compile", action="store_true", help="with --cpu-levers: torch.compile too")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_levers:
        rates = cpu_levers(args)
        record = {"settings": {k: str(v) for k, v in vars(args).items()},
                  "torch_threads": torch.get_num_threads(), "images_per_s": rates,
                  "ratio": {k: v / rates["fp32 (baseline)"] for k, v in rates.items()}}  # fmt: skip
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
        return
    device = resolve_device(args.device)

    results = {
        "reference (DCGAN example loop)": reference(args, device),
        "carsynth train": ours(args, fm=False),
        "carsynth train --fm": ours(args, fm=True),
    }
    base = results["reference (DCGAN example loop)"]
    sizes = f"nz/ngf/ndf {args.nz}/{args.ngf}/{args.ndf}"
    print(f"device {device}, batch {args.batch_size}, {args.steps} steps, {sizes}, ", end="")
    print(f"torch threads {torch.get_num_threads()}")
    print(f"| {'loop':<32} | {'images/s':>9} | {'ratio':>6} |")
    print(f"|{'-' * 34}|{'-' * 11}|{'-' * 8}|")
    for name, rate in results.items():
        print(f"| {name:<32} | {rate:>9.1f} | {rate / base:>5.2f}x |")
    record = {
        "device": str(device),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "torch_threads": torch.get_num_threads(),
        "images_per_s": results,
        "ratio": {name: rate / base for name, rate in results.items()},
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
