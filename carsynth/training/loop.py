"""``carsynth train``: the DCGAN-64 training loop, with the feature-matching generator loss.

One function, :func:`train`, reads a :class:`TrainConfig` and leaves a run directory (see
:mod:`carsynth.rundir` for its files).

The loop keeps losses on the device and reads them back only at logging intervals (one host sync
per interval). Each step draws its noise from a generator seeded with (seed, step, rank) and each
epoch's frame order from (seed, epoch), so a resumed run repeats exactly what the uninterrupted
run would have done: on the CPU the final weights are bit-identical.

Several processes (``torchrun --nproc-per-node N -m carsynth train ...``) train with
DistributedDataParallel: each process takes its own slice of every global batch.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from carsynth import __version__, files, rundir, storage
from carsynth.augment import diff_augment
from carsynth.devices import resolve_device
from carsynth.errors import UsageError
from carsynth.monitor import FIT_SAMPLES, CollapseMonitor
from carsynth.sampling import latents, mix_seed
from carsynth.training.config import DEFAULT_STEPS, TrainConfig, check_config, resume_differences
from carsynth.training.data import RunData, epoch_order
from carsynth.training.networks import Networks
from carsynth.training.plots import plot_losses
from carsynth.training.steps import autocast, discriminator_step, generator_step, make_objective

SAMPLE_COUNT = 64  # fixed-noise samples: an 8x8 grid and the diversity statistic


class TrainingDiverged(RuntimeError):
    """A loss became NaN or Inf; the last good checkpoint is kept."""


class TrainingCollapsed(RuntimeError):
    """``stop_on_collapse``: the collapse monitor failed; a checkpoint of that step is kept."""


def train(config: TrainConfig) -> Path:
    """Train a DCGAN-64 as ``config`` says; returns the run directory.

    Raises ``UsageError`` (before anything is written) for bad settings or data, and
    :class:`TrainingDiverged` when a loss becomes NaN or Inf.
    """
    check_config(config)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(config.device)
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        resume_from = _prepare_out(config)
        with storage.open_frame_file(config.data) as f:
            return Trainer(config, f, device, rank, world, resume_from).run()
    finally:
        if owns_group:
            dist.destroy_process_group()


def _prepare_out(c: TrainConfig) -> Path | None:
    """Check the run directory; returns the checkpoint to resume from (or None)."""
    out = Path(c.out)
    if c.resume:
        diff = resume_differences(rundir.read_run_config(out)["config"], c)
        if diff:
            raise UsageError(f"{out}: --resume with settings that differ from the run: {diff}")
        found = rundir.checkpoints(out)
        return found[-1] if found else None
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"{out} exists and is not a directory")
        if any(out.iterdir()):
            if not c.overwrite:
                raise UsageError(f"{out} exists; pass --overwrite to replace it or --resume")
            if not (out / rundir.CONFIG).is_file():
                raise UsageError(f"{out}: not a carsynth run directory; refusing to replace it")
    return None


@dataclass
class Schedule:
    """How many steps, and how the batches of each step fall on the epochs."""

    n: int  # training frames
    global_batch: int  # frames per discriminator update over all processes
    critic_steps: int  # discriminator updates per generator update
    total: int  # generator updates of the whole run

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch  # the last partial batch of an epoch is dropped

    @property
    def steps_per_epoch(self) -> float:
        return self.batches_per_epoch / self.critic_steps  # generator steps per pass

    @classmethod
    def of(cls, c: TrainConfig, n: int, world: int) -> Schedule:
        plan = cls(n, c.batch_size * world, c.critic_updates, 0)
        plan.total = c.steps or (
            math.ceil(c.epochs * plan.steps_per_epoch) if c.epochs else DEFAULT_STEPS
        )
        return plan


def _record(c: TrainConfig, f: storage.FrameFile, data: RunData, plan: Schedule, world: int,
            device: torch.device) -> dict[str, Any]:  # fmt: skip
    """What config.json holds: every setting, the data file and its split, versions."""
    return {
        "config": c.resolved(),
        "data": {
            "path": str(Path(c.data).resolve()),
            "fingerprint": rundir.fingerprint(c.data),
            "kind": f.kind,
            "train_frames": data.n,
            "holdout_frames": len(data.holdout_rows),
            "holdout_seeds": data.holdout_seeds,
        },
        "steps": plan.total,
        "steps_per_epoch": plan.steps_per_epoch,
        "critic_steps": plan.critic_steps,
        "world_size": world,
        "device": str(device),
        "versions": {
            "carsynth": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }


def _monitor(c: TrainConfig, f: storage.FrameFile, data: RunData, device: torch.device):
    """The collapse monitor, fitted on subsamples of the training and held-out frames."""
    rng = np.random.default_rng([c.seed, 0x3D])
    pick_train = np.sort(rng.choice(data.rows, min(data.n, FIT_SAMPLES), replace=False))
    held = data.holdout_rows
    pick_holdout = np.sort(rng.choice(held, min(len(held), c.monitor_samples), replace=False))
    return CollapseMonitor(
        f.frames[pick_train], f.frames[pick_holdout], c.monitor_samples, c.monitor_k, c.seed,
        device,
    )  # fmt: skip


class MetricsLog:
    """``metrics.jsonl`` (and TensorBoard when installed): one row per logging step."""

    def __init__(self, out: Path, start: int) -> None:
        self.path = rundir.metrics_path(out)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.writer = None
        # Rows past the checkpoint being resumed will be written again.
        kept = []
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line and json.loads(line)["step"] <= start
            ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as m:
            m.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Trainer:
    """One run: its data, networks and bookkeeping, and the loop (:meth:`run`)."""

    def __init__(self, c: TrainConfig, f: storage.FrameFile, device: torch.device, rank: int,
                 world: int, resume_from: Path | None) -> None:  # fmt: skip
        self.c, self.device, self.rank, self.world = c, device, rank, world
        self.out = Path(c.out)
        # ---- data: which frames, checked before anything is written
        self.data = RunData.split(f, c, world)
        self.plan = Schedule.of(c, self.data.n, world)
        record = _record(c, f, self.data, self.plan, world, device)
        if resume_from is not None:
            saved = rundir.read_run_config(self.out)["data"]
            if not rundir.same_data(saved["fingerprint"], record["data"]["fingerprint"]):
                raise UsageError(f"{c.data}: the data file changed since the run started")
        # ---- run directory (rank 0 writes; every rank reads)
        if world > 1:
            dist.barrier()  # every process has checked the inputs before rank 0 writes
        if rank == 0:
            self._start_run_dir(record)
        self.source, self.block = self.data.source(f, c, self.plan.global_batch, device)
        self.monitor = (
            _monitor(c, f, self.data, device) if c.monitor_interval and rank == 0 else None
        )
        # ---- networks, optimisers, precision
        self.nets = Networks.build(c, device)
        self.start = self.nets.load(resume_from, device) if resume_from is not None else 0
        self.g_step, self.d_step, self.d_plain = self.nets.for_steps(c, device, world)
        self.objective = make_objective(c)
        self.fixed_z = latents(c.seed, 0, SAMPLE_COUNT, c.nz).to(device)
        self.noise = torch.Generator(device=device)
        # DiffAugment draws from the step's noise stream, so a resumed run repeats them
        policy = c.augment_policy
        self.augment = (lambda t: diff_augment(t, policy, self.noise)) if policy else None
        self.joint = self.nets.discriminator.per_sample

    def _start_run_dir(self, record: dict[str, Any]) -> None:
        if self.c.overwrite and self.out.exists() and not self.c.resume:
            shutil.rmtree(self.out)
        (self.out / rundir.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        (self.out / rundir.SAMPLES).mkdir(exist_ok=True)
        rundir.write_run_config(self.out, record)
        for stale in (self.out / rundir.CHECKPOINTS).glob(".*.tmp"):
            stale.unlink()

    def run(self) -> Path:
        """The loop: D updates, a G update, the averages, then logging, samples, checkpoints."""
        c, plan = self.c, self.plan
        log = MetricsLog(self.out, self.start) if self.rank == 0 else None
        # Sums since the last log row, on the device: d_loss, g_loss, D(x), D(G(z)), fm distance.
        sums = torch.zeros(5, device=self.device)
        self.since, self.tick, self.epoch = 0, time.perf_counter(), -1
        self.collapsed, self.failures = False, []
        bar = tqdm(total=plan.total, initial=self.start, desc="train",
                   disable=not (c.progress and self.rank == 0))  # fmt: skip
        try:
            for step in range(self.start, plan.total):
                # (1) update D critic_steps times, each on its own batch and noise; the G update
                # then uses the last of them (its fake batch keeps the generator's graph).
                for i in range(plan.critic_steps):
                    x, fake, eps = self._batch(step, i)
                    d_stats = discriminator_step(
                        self.d_step, self.nets.opt_d, self.nets.scaler, x, fake, self.objective,
                        self.nets.amp_dtype, self.nets.history_of("d"), self.d_plain, eps,
                        self.augment, self.joint,
                    )  # fmt: skip
                # (2) update G against the updated D
                g_loss = generator_step(
                    self.nets.generator, self.d_plain, self.nets.opt_g, self.nets.scaler, x, fake,
                    self.objective, self.nets.amp_dtype, self.nets.history_of("g"),
                    self.nets.opt_d, self.augment,
                )  # fmt: skip
                # (3) running averages: historical means and the EMA generator
                self.nets.average(step, c.ema_beta(plan.global_batch))
                with torch.no_grad():
                    sums += torch.cat([d_stats[:1], g_loss.detach().float().view(1), d_stats[1:]])
                self.since += 1
                bar.update(1)
                done = step + 1
                last = done == plan.total
                # (4) a metrics row, (5) a sample grid, (6) a checkpoint, (7) the collapse stop
                if done % c.log_interval == 0 or last:
                    values = self._log(done, sums, log)
                    bar.set_postfix(d=f"{values[0]:.3f}", g=f"{values[1]:.3f}")
                if self.rank == 0 and (done % c.sample_interval == 0 or last):
                    with torch.no_grad():
                        grid = self.nets.ema(self.fixed_z).float()
                    files.write_grid(grid, rundir.sample_path(self.out, done), columns=8)
                if self.rank == 0 and (done % c.checkpoint_interval == 0 or last):
                    self._check_finite(sums, done)
                    self._save(done)
                if c.stop_on_collapse and done % c.monitor_interval == 0:
                    self._stop_if_collapsed(done)
        finally:
            bar.close()
            if log is not None:
                log.close()
        return self.out

    def _batch(self, step: int, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The real batch, the generated batch and the penalty's mixing weights of D update i."""
        c, plan = self.c, self.plan
        epoch, k = divmod(step * plan.critic_steps + i, plan.batches_per_epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.source.start_epoch(epoch_order(plan.n, epoch, c.seed, self.block))
        at = k * plan.global_batch + self.rank * c.batch_size
        x = self.nets.to_input(self.source.batch(at, c.batch_size))
        self.noise.manual_seed(mix_seed(c.seed, step, self.rank, i))
        z = torch.randn(c.batch_size, c.nz, 1, 1, device=self.device, generator=self.noise)
        eps = torch.rand(c.batch_size, 1, 1, 1, device=self.device, generator=self.noise)
        grad = i == plan.critic_steps - 1  # only the last D update's batch trains G
        with torch.set_grad_enabled(grad), autocast(self.device, self.nets.amp_dtype):
            fake = self.g_step(z)
        return x, fake, eps

    def _log(self, done: int, sums: torch.Tensor, log: MetricsLog | None) -> list[float]:
        """Average the sums (the one host sync per interval), write a row, reset the sums."""
        values = (sums / self.since).tolist()
        if not all(math.isfinite(v) for v in values):
            self._diverged(done)
        seconds = time.perf_counter() - self.tick
        if log is not None:
            with torch.no_grad():
                samples = self.nets.ema(self.fixed_z).float()
                diversity = torch.pdist(samples.flatten(1)).mean().item()
            row = {
                "step": done,
                "epoch": round(done / self.plan.steps_per_epoch, 4),
                "d_loss": values[0],
                "g_loss": values[1],
                "d_real": values[2],
                "d_fake": values[3],
                "fm_distance": values[4],
                "sample_diversity": diversity,
                "images_per_s": self.since * self.plan.global_batch / seconds,
            }
            if self.monitor is not None and done % self.c.monitor_interval == 0:
                row.update(self.monitor(self.nets.ema))
                self.collapsed, self.failures = row["collapsed"], row["collapse_failures"]
            log.write(row)
        sums.zero_()
        self.since, self.tick = 0, time.perf_counter()
        return values

    def _diverged(self, done: int) -> None:
        raise TrainingDiverged(
            f"loss became NaN/Inf by step {done}; the last good checkpoint is in "
            f"{self.out / rundir.CHECKPOINTS} (try a lower --lr)"
        )

    def _check_finite(self, sums: torch.Tensor, done: int) -> None:
        if not torch.isfinite(sums).all():
            self._diverged(done)

    def _save(self, step: int) -> None:
        """A checkpoint of ``step`` (the oldest beyond ``keep_checkpoints`` removed), the plot."""
        state = self.nets.state(step, self.device)
        files.atomic_write(
            rundir.checkpoint_path(self.out, step), lambda tmp: torch.save(state, tmp)
        )
        for old in rundir.checkpoints(self.out)[: -self.c.keep_checkpoints]:
            old.unlink()
        plot_losses(rundir.metrics_path(self.out), self.out / rundir.LOSS_PLOT)

    def _stop_if_collapsed(self, done: int) -> None:
        flag = torch.tensor([float(self.collapsed)], device=self.device)
        if self.world > 1:
            dist.broadcast(flag, 0)  # rank 0 ran the monitor; every rank stops together
        if not flag.item():
            return
        checkpoint = rundir.checkpoint_path(self.out, done)
        if self.rank == 0 and not checkpoint.exists():
            self._save(done)
        raise TrainingCollapsed(
            f"stopped at step {done}: {'; '.join(self.failures) or 'collapse'}; "
            f"checkpoint {checkpoint} kept"
        )
