"""Training throughput: ``carsynth train`` against the PyTorch DCGAN example's loop.

The reference is the loop of pytorch/examples ``dcgan/main.py``: a torch DataLoader over the
HDF5 file (one h5py read per frame, ToTensor-style scaling in the workers), the same networks and
batch size, the non-saturating loss, and ``.item()`` on the losses every step as the example
prints them. Both run the same number of generator steps in this process, timed end to end
(setup included); the ratio is carsynth's images/s over the reference's.

    python -m scripts.bench_train --steps 20 --threads 1
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
from carsynth.devices import resolve_device
from carsynth.files import to_float
from carsynth.models import Discriminator, Generator
from carsynth.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


class H5Frames(Dataset):
    """The training frames of a carsynth file, one h5py read per item (opened per worker)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with storage.open_frame_file(path) as f:
            self.rows = np.concatenate([np.arange(a, b) for a, b in f.frame_ranges("train")])
        self.h5: h5py.File | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.h5 is None:
            self.h5 = h5py.File(self.path, "r")
        frame = torch.from_numpy(self.h5["frames"][int(self.rows[i])])
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
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
