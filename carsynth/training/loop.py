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

import contextlib
import errno
import io
import logging
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

from carsynth import __version__, files, report_html, rundir, storage
from carsynth.augment import diff_augment
from carsynth.devices import resolve_device
from carsynth.errors import UsageError
from carsynth.monitor import FIT_SAMPLES, CollapseMonitor
from carsynth.progress import Progress, log
from carsynth.sampling import latents, mix_seed
from carsynth.training.config import DEFAULT_STEPS, TrainConfig, check_config, resume_differences
from carsynth.training.data import RunData, epoch_order
from carsynth.training.networks import Networks
from carsynth.training.plots import plot_losses
from carsynth.training.steps import autocast, discriminator_step, generator_step, make_objective
from carsynth.training.stopping import (
    StopSignals,
    TrainingDiverged,
    TrainingInterrupted,
    check_divergence,
)
from carsynth.training.tracking import MetricsLog

SAMPLE_COUNT = 64  # fixed-noise samples: an 8x8 grid and the diversity statistic
# loss.png and report.html are redrawn with a checkpoint at most this often (and at the end)
FIGURE_SECONDS = 60.0
# errno values that mean the run directory cannot take more: full disk, quota, file size limit,
# a read-only file system, no permission
CANNOT_WRITE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES)
__all__ = ["train", "TrainingDiverged", "TrainingCollapsed", "TrainingInterrupted"]


class TrainingCollapsed(RuntimeError):
    """``stop_on_collapse``: the collapse monitor failed; a checkpoint of that step is kept."""


def train(config: TrainConfig) -> Path:
    """Train a DCGAN-64 as ``config`` says; returns the run directory.

    Raises ``UsageError`` (before anything is written) for bad settings or data, or when the
    run directory cannot be written (disk full: the last good checkpoint is kept);
    :class:`TrainingDiverged` when a loss or weight becomes NaN, Inf or explodes; and
    :class:`TrainingInterrupted` after Ctrl-C or SIGTERM, once a checkpoint of the step reached
    is saved (see :mod:`carsynth.training.stopping`).
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
        resuming = _prepare_out(config)
        with StopSignals() as signals, storage.open_frame_file(config.data) as f:
            return Trainer(config, f, device, rank, world, resuming).run(signals)
    except OSError as error:
        if error.errno not in CANNOT_WRITE:
            raise
        raise UsageError(
            f"{config.out}: {os.strerror(error.errno).lower()} (writing {error.filename}); "
            f"the last good checkpoint is kept; make room, then continue with --resume"
        ) from None
    finally:
        if owns_group:
            dist.destroy_process_group()


def _prepare_out(c: TrainConfig) -> bool:
    """Check the run directory (nothing is written); returns whether the run resumes.

    A folder that holds only what a run killed while starting leaves (no config.json yet) is
    started afresh by ``--resume`` and may be replaced by ``--overwrite``.
    """
    out = Path(c.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    folder = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--out {out}: {folder} is not writable")
    partial = rundir.is_partial(out)
    if c.resume and (partial or not out.exists()):
        log.warning(f"{out}: nothing to resume (no config.json yet); starting the run")
        return False
    if c.resume:
        diff = resume_differences(rundir.read_run_config(out)["config"], c)
        if diff:
            raise UsageError(f"{out}: --resume with settings that differ from the run: {diff}")
        return True
    if out.exists() and any(out.iterdir()):
        if not c.overwrite:
            raise UsageError(f"{out} exists; pass --overwrite to replace it or --resume")
        if not (out / rundir.CONFIG).is_file() and not partial:
            raise UsageError(f"{out}: not a carsynth run directory; refusing to replace it")
    return False


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


class Trainer:
    """One run: its data, networks and bookkeeping, and the loop (:meth:`run`)."""

    def __init__(self, c: TrainConfig, f: storage.FrameFile, device: torch.device, rank: int,
                 world: int, resuming: bool) -> None:  # fmt: skip
        self.c, self.device, self.rank, self.world = c, device, rank, world
        self.out = Path(c.out)
        # ---- data: which frames, checked before anything is written
        self.data = RunData.split(f, c, world)
        self.plan = Schedule.of(c, self.data.n, world)
        record = _record(c, f, self.data, self.plan, world, device)
        if resuming:
            saved = rundir.read_run_config(self.out)["data"]
            if not rundir.same_data(saved["fingerprint"], record["data"]["fingerprint"]):
                raise UsageError(f"{c.data}: the data file changed since the run started")
        self.source, self.block = self.data.source(f, c, self.plan.global_batch, device)
        self.monitor = (
            _monitor(c, f, self.data, device) if c.monitor_interval and rank == 0 else None
        )
        # ---- networks, optimisers, precision
        self.nets = Networks.build(c, device)
        self.start, self.resumed = 0, {}
        if resuming:
            self._resume()
        # ---- run directory (rank 0 writes; every rank reads), once every input has loaded
        if world > 1:
            dist.barrier()  # every process has checked the inputs before rank 0 writes
        if rank == 0:
            self._start_run_dir(record)
        self.g_step, self.d_step, self.d_plain = self.nets.for_steps(c, device, world)
        self.objective = make_objective(c)
        self.fixed_z = latents(c.seed, 0, SAMPLE_COUNT, c.nz).to(device)
        self.noise = torch.Generator(device=device)
        # DiffAugment draws from the step's noise stream, so a resumed run repeats them
        policy = c.augment_policy
        self.augment = (lambda t: diff_augment(t, policy, self.noise)) if policy else None
        self.joint = self.nets.discriminator.per_sample

    def _resume(self) -> None:
        """Load the newest checkpoint that loads (an older one, with a warning, when the latest
        is damaged); a run without any starts from step 0."""
        if not rundir.checkpoints(self.out):
            return

        def restore(state: dict[str, Any]) -> dict[str, Any]:
            try:
                self.start = self.nets.load(state, self.device)
            except (RuntimeError, KeyError, ValueError, TypeError) as error:
                detail = " ".join(str(error).split())[:300]
                raise UsageError(f"does not fit this run's networks ({detail})") from None
            return state

        _, self.resumed = rundir.newest_loadable(self.out, restore)

    def _start_run_dir(self, record: dict[str, Any]) -> None:
        if self.c.overwrite and self.out.exists() and not self.c.resume:
            shutil.rmtree(self.out)
        (self.out / rundir.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        (self.out / rundir.SAMPLES).mkdir(exist_ok=True)
        rundir.write_run_config(self.out, record)
        for folder in (self.out, self.out / rundir.CHECKPOINTS):  # a killed run's temporary files
            for stale in folder.glob(".*.tmp"):
                stale.unlink()
        # Checkpoints past the one resumed did not load: kept aside for a look, out of the way
        for newer in rundir.checkpoints(self.out):
            if int(newer.stem.split("_")[1]) > self.start:
                newer.rename(newer.with_name(newer.name + ".unreadable"))

    def run(self, signals: StopSignals | None = None) -> Path:
        """The loop: D updates, a G update, the averages, then logging, samples, checkpoints."""
        c, plan = self.c, self.plan
        self.metrics = MetricsLog(self.out, self.start) if self.rank == 0 else None
        # Sums since the last log row, on the device: d_loss, g_loss, D(x), D(G(z)), fm distance
        # (a checkpoint written between two rows carries them, so a resumed row is the same).
        sums = self.sums = torch.zeros(5, device=self.device)
        self.since = int(self.resumed.get("log_count", 0))
        if self.since:
            sums += self.resumed["log_sums"].to(self.device)
        self.tick, self.epoch = time.perf_counter(), -1
        self.figures_at = time.monotonic()
        self.collapsed, self.failures = False, []
        if self.monitor is not None:
            self.monitor.passed_before = bool(self.resumed.get("monitor_passed", False))
        # a bar on a terminal, else a log line every 30 s; nothing on other ranks or --quiet
        mode = "auto" if c.progress else "log"
        if self.rank != 0 or not log.isEnabledFor(logging.INFO):
            mode = "off"
        progress = Progress(plan.total, desc="train", unit="steps", initial=self.start, mode=mode)
        stats: dict[str, str] = {}
        try:
            for step in range(self.start, plan.total):
                # (0) Ctrl-C or SIGTERM since the last step: save this step, stop
                if self._stop_requested(signals, step):
                    self._interrupt(step, signals)
                if c.lr_decay:
                    self.nets.scale_learning_rates(c, step, plan.total)
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
                self.nets.average(step, c.ema_beta(plan.global_batch, step))
                with torch.no_grad():
                    sums += torch.cat([d_stats[:1], g_loss.detach().float().view(1), d_stats[1:]])
                self.since += 1
                done = step + 1
                last = done == plan.total
                # (4) a metrics row, (5) a sample grid, (6) a checkpoint, (7) the collapse stop
                if done % c.log_interval == 0 or last:
                    values = self._log(done, sums)
                    stats = {"d_loss": f"{values[0]:.4g}", "g_loss": f"{values[1]:.4g}",
                             "img/s": f"{self.images_per_s:.0f}"}  # fmt: skip
                if self.rank == 0 and (done % c.sample_interval == 0 or last):
                    self._samples(done)
                if self.rank == 0 and (done % c.checkpoint_interval == 0 or last):
                    self._save(done, signals)
                if c.stop_on_collapse and done % c.monitor_interval == 0:
                    self._stop_if_collapsed(done)
                progress.update(1, **stats)
        finally:
            progress.close()
            if self.metrics is not None:
                self.metrics.close()
        return self.out

    def _stop_requested(self, signals: StopSignals | None, step: int) -> bool:
        """Whether a signal asked to stop. Several processes agree on it (any process's signal
        stops all at one step) at logging steps only, to keep one host sync per interval."""
        flag = signals is not None and signals.requested
        if self.world > 1:
            if step % self.c.log_interval:
                return False
            t = torch.tensor([float(flag)], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def _interrupt(self, done: int, signals: StopSignals | None) -> None:
        """Save a checkpoint of ``done`` finished steps (unless the run has just resumed from it)
        and raise :class:`TrainingInterrupted`."""
        checkpoint = rundir.checkpoint_path(self.out, done)
        if self.rank == 0 and done > self.start and not checkpoint.exists():
            self._save(done, signals)
        if self.rank == 0 and done > self.start:
            self._figures()
        found = rundir.checkpoints(self.out)
        raise TrainingInterrupted(done, checkpoint if checkpoint in found else None)

    def _samples(self, done: int) -> None:
        """The EMA generator's fixed-noise grid: a PNG in samples/ and the TensorBoard image."""
        with torch.no_grad():
            grid = self.nets.ema(self.fixed_z).float()
        files.write_grid(grid, rundir.sample_path(self.out, done), columns=8)
        if self.metrics is not None:
            self.metrics.images(done, grid)

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

    def _log(self, done: int, sums: torch.Tensor) -> list[float]:
        """Average the sums (the one host sync per interval), check for divergence, write a row,
        reset the sums."""
        values = (sums / self.since).tolist()
        self._check_divergence(done, values)
        seconds = time.perf_counter() - self.tick
        self.images_per_s = self.since * self.plan.global_batch / seconds
        if self.metrics is not None:
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
                "images_per_s": self.images_per_s,
            }
            if self.monitor is not None and done % self.c.monitor_interval == 0:
                row.update(self.monitor(self.nets.ema))
                self.collapsed, self.failures = row["collapsed"], row["collapse_failures"]
            self.metrics.write(row)
        sums.zero_()
        self.since, self.tick = 0, time.perf_counter()
        return values

    def _check_divergence(self, done: int, values: list[float]) -> None:
        """:func:`check_divergence` on the averaged losses and every weight of both networks."""
        names = ("d_loss", "g_loss", "d_real", "d_fake", "fm_distance")
        weights = [*self.nets.generator.parameters(), *self.nets.discriminator.parameters()]
        check_divergence(done, dict(zip(names, values, strict=True)), weights,
                         self.out / rundir.CHECKPOINTS)  # fmt: skip

    def _save(self, step: int, signals: StopSignals | None = None) -> None:
        """A checkpoint of ``step`` (the oldest beyond ``keep_checkpoints`` removed), the plot.

        Checked for divergence first, so a saved checkpoint is always a good one. Serialised in
        memory, then written through :func:`files.atomic_write`: a kill or a full disk leaves
        the previous checkpoints whole, and a full disk is an ``OSError`` with its errno.
        """
        self._check_divergence(step, (self.sums / self.since).tolist() if self.since else [0.0] * 5)
        state = self.nets.state(step, self.device)
        state.update(log_sums=self.sums.cpu(), log_count=self.since)
        if self.monitor is not None:
            state["monitor_passed"] = self.monitor.passed_before
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with signals.hold() if signals is not None else contextlib.nullcontext():
            files.atomic_write(
                rundir.checkpoint_path(self.out, step),
                lambda tmp: tmp.write_bytes(buffer.getbuffer()),
            )
        for old in rundir.checkpoints(self.out)[: -self.c.keep_checkpoints]:
            old.unlink()
        if step == self.plan.total or time.monotonic() - self.figures_at >= FIGURE_SECONDS:
            self._figures()

    def _figures(self) -> None:
        """Redraw loss.png and report.html."""
        self.figures_at = time.monotonic()
        plot_losses(rundir.metrics_path(self.out), self.out / rundir.LOSS_PLOT)
        report_html.write_run_page(self.out)

    def _stop_if_collapsed(self, done: int) -> None:
        flag = torch.tensor([float(self.collapsed)], device=self.device)
        if self.world > 1:
            dist.broadcast(flag, 0)  # rank 0 ran the monitor; every rank stops together
        if not flag.item():
            return
        checkpoint = rundir.checkpoint_path(self.out, done)
        if self.rank == 0 and not checkpoint.exists():
            self._save(done)
        if self.rank == 0:
            self._figures()
        raise TrainingCollapsed(
            f"stopped at step {done}: {'; '.join(self.failures) or 'collapse'}; "
            f"checkpoint {checkpoint} kept"
        )
