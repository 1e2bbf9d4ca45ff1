"""``carsynth train``: the DCGAN-64 training loop, with the feature-matching generator loss.

One function, :func:`train`, reads a :class:`TrainConfig` and leaves a run directory:

``config.json``                  every setting, the data file's fingerprint, versions, holdout seeds
``metrics.jsonl``                one JSON object per logging step (losses, D outputs, images/s, ...)
``samples/step_XXXXXXX.png``     the EMA generator on a fixed noise batch (``latents(seed, 0, 64)``)
``loss.png``                     the loss curves (and the collapse monitor's statistics)
``checkpoints/ckpt_XXXXXXX.pt``  networks, EMA generator, optimizers, grad scaler, RNG states, step

The loop keeps losses on the device and reads them back only at logging intervals (one host sync
per interval). Each step draws its noise from a generator seeded with (seed, step, rank) and each
epoch's frame order from (seed, epoch), so a resumed run repeats exactly what the uninterrupted
run would have done: on the CPU the final weights are bit-identical.

Several processes (``torchrun --nproc-per-node N -m carsynth train ...``) train with
DistributedDataParallel: each process takes its own slice of every global batch.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchvision.utils import save_image
from tqdm.auto import tqdm

from carsynth import __version__, losses, storage, unrolled
from carsynth.errors import UsageError
from carsynth.models import FEATURE_LAYERS, IMAGE_SIZE, Discriminator, Generator
from carsynth.monitor import FIT_SAMPLES, CollapseMonitor
from carsynth.sampling import latents, mix_seed

FINGERPRINT_BYTES = 4 * 2**20  # the data fingerprint hashes this many leading and trailing bytes
SAMPLE_COUNT = 64  # fixed-noise samples: an 8x8 grid and the diversity statistic


class TrainingDiverged(RuntimeError):
    """A loss became NaN or Inf; the last good checkpoint is kept."""


class TrainingCollapsed(RuntimeError):
    """``stop_on_collapse``: the collapse monitor failed; a checkpoint of that step is kept."""


@dataclass
class TrainConfig:
    """Every setting of a training run; all of them are recorded in ``config.json``."""

    data: str  # carsynth frame file to train on
    out: str  # run directory to create (or to continue with ``resume``)
    # networks (Radford et al. 2015)
    nz: int = 100  # latent size
    ngf: int = 64  # generator width (channels of its last hidden layer)
    ndf: int = 64  # discriminator width (channels of its first layer)
    # generator objective
    fm: bool = False  # feature matching (Salimans et al. 2016) instead of the non-saturating loss
    fm_layer: int = 4  # discriminator block (1..4) whose features are matched; 4 = last
    adv_weight: float = 0.0  # with ``fm``: weight of an added non-saturating adversarial term
    # mode-collapse mitigations (Salimans et al. 2016)
    real_label: float = 1.0  # discriminator target for real frames; 0.9 = one-sided smoothing
    minibatch_kernels: int = 0  # minibatch discrimination kernels B; 0 = off
    minibatch_kernel_dim: int = 5  # dimension C of each minibatch-discrimination kernel
    historical_weight: float = 0.0  # weight of the historical-averaging penalty; 0 = off
    # WGAN-GP (Gulrajani et al. 2017): pair it with lr 1e-4, beta1 0, beta2 0.9 (the CLI does)
    loss: Literal["bce", "wgan-gp"] = "bce"  # "wgan-gp": critic without batch norm + penalty
    gp_weight: float = 10.0  # gradient-penalty weight lambda (WGAN-GP)
    critic_steps: int | None = None  # D updates per G update; None: 5 for wgan-gp, else 1
    # unrolled GAN (Metz et al. 2017): the generator's loss against the discriminator K steps on
    unrolled_steps: int = 0  # K differentiable Adam steps of the discriminator (bce only); 0 = off
    # optimisation (Adam as in Radford et al. 2015)
    lr: float = 2e-4  # learning rate of both networks
    beta1: float = 0.5  # Adam beta1; 0.5 steadies GAN training (Radford et al. 2015)
    beta2: float = 0.999  # Adam beta2
    batch_size: int = 64  # frames per step and process
    steps: int | None = None  # generator updates; None: take ``epochs`` (default 5000 steps)
    epochs: float | None = None  # passes over the training frames (instead of ``steps``)
    seed: int = 0  # seeds weights, noise, frame order and the fixed sample batch
    # data
    holdout: float | None = None  # None: the file's holdout flags; F: recompute with is_holdout
    max_memory_frames: int = 500_000  # above this many frames, stream the file in chunks
    # hardware
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"  # auto: cuda, else mps, else cpu
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA, off elsewhere
    channels_last: bool = True  # NHWC memory layout on CUDA (faster convolutions there)
    compile: bool = False  # torch.compile both networks (slow start, faster steps)
    # EMA generator, used for samples and export
    ema_decay: float = 0.999  # per-step decay, warmed up as min(decay, (1 + t) / (10 + t))
    # collapse monitor (carsynth.monitor): NDB and the collapse check against held-out frames
    monitor_interval: int = 0  # steps between checks, a multiple of log_interval; 0 = off
    monitor_samples: int = 500  # EMA samples per check (fixed latents)
    monitor_k: int = 20  # NDB bins, fitted once on (at most 10,000) training frames
    stop_on_collapse: bool = False  # end the run (checkpoint kept) when the collapse check fails
    # bookkeeping
    log_interval: int = 50  # steps between metrics rows (and the only host syncs)
    sample_interval: int = 500  # steps between sample grids
    checkpoint_interval: int = 1000  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 3  # how many recent checkpoints to keep
    resume: bool = False  # continue the run in ``out`` from its latest checkpoint
    overwrite: bool = False  # replace an existing run directory
    progress: bool = True  # tqdm progress bar


# Settings that may change when a run is resumed (the budget, and bookkeeping that does not touch
# the weights); every other one must match config.json.
RESUMABLE = {
    "steps", "epochs", "resume", "overwrite", "progress", "device", "max_memory_frames",
    "log_interval", "sample_interval", "checkpoint_interval", "keep_checkpoints",
    "monitor_interval", "monitor_samples", "monitor_k", "stop_on_collapse",
}  # fmt: skip
DEFAULT_STEPS = 5000


# ------------------------------------------------------------------------------------ run files
def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The newest ``checkpoints/ckpt_XXXXXXX.pt`` of a run; ``UsageError`` if there is none."""
    found = sorted((Path(run_dir) / "checkpoints").glob("ckpt_*.pt"))
    if not found:
        raise UsageError(f"{run_dir}: no checkpoints (not a carsynth run directory?)")
    return found[-1]


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``config.json``: {"config": TrainConfig fields, "data": ..., "versions": ...}."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UsageError(f"{run_dir}: no config.json (not a carsynth run directory?)")
    return json.loads(path.read_text())


def training_finished(run_dir: str | os.PathLike) -> bool:
    """Whether the run in ``run_dir`` wrote its final checkpoint (its full step budget)."""
    try:
        steps = read_run_config(run_dir)["steps"]
    except UsageError:
        return False
    return (Path(run_dir) / "checkpoints" / f"ckpt_{steps:07d}.pt").is_file()


def load_generator(
    run_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    checkpoint: str | os.PathLike | None = None,
) -> Generator:
    """The EMA generator of a checkpoint (default: the run's latest), in eval mode on ``device``."""
    config = read_run_config(run_dir)["config"]
    generator = Generator(config["nz"], config["ngf"])
    checkpoint = checkpoint or latest_checkpoint(run_dir)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    generator.load_state_dict(state["ema"])
    return generator.to(device).eval()


def run_frames(run_dir: str | os.PathLike, split: Literal["train", "holdout"]) -> np.ndarray:
    """The exact training or held-out frames of a run: uint8 (N, H, W, 3), file order."""
    if split not in ("train", "holdout"):
        raise UsageError(f"split must be 'train' or 'holdout', got {split!r}")
    data = read_run_config(run_dir)["data"]
    with storage.open_frame_file(data["path"]) as f:
        ranges = _split_ranges(f, set(data["holdout_seeds"]))[split]
        if not ranges:
            return np.zeros((0, *f.frame_size, 3), dtype=np.uint8)
        return np.concatenate([f.frames[a:b] for a, b in ranges])


def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Size and the SHA-256 of the first and the last ``FINGERPRINT_BYTES`` of a file.

    Cheap for files of any size. It changes when episodes are appended (size, tail) or the file
    is rewritten (HDF5 keeps its superblock and root metadata at the head), but not when the file
    is only copied or touched: a run can be resumed on a copy of its data (rsync, a fresh clone).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(FINGERPRINT_BYTES)).hexdigest()
        f.seek(max(0, size - FINGERPRINT_BYTES))
        tail = hashlib.sha256(f.read(FINGERPRINT_BYTES)).hexdigest()
    return {"size": size, "sha256_head": head, "sha256_tail": tail}


def same_data(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether two fingerprints describe the same file contents, compared on the keys both have
    (runs started before the tail hash recorded the file's mtime instead, which is ignored)."""
    return all(saved[key] == current[key] for key in saved.keys() & current.keys())


def _holdout_seeds(f: storage.FrameFile, fraction: float | None) -> list[int]:
    if f.episodes is None:
        return []
    seeds = f.episodes["seed"].astype(int)
    if fraction is None:
        return sorted(int(s) for s in seeds[f.episodes["holdout"].astype(bool)])
    return sorted(int(s) for s in seeds if storage.is_holdout(int(s), fraction))


def _split_ranges(f: storage.FrameFile, holdout: set[int]) -> dict[str, list[tuple[int, int]]]:
    """Frame index ranges (whole episodes, file order) of the train and holdout splits."""
    if f.episodes is None:
        return {"train": f.frame_ranges("all"), "holdout": []}
    out: dict[str, list[tuple[int, int]]] = {"train": [], "holdout": []}
    for row in f.episodes:
        if row["length"]:
            a = int(row["start"])
            split = "holdout" if int(row["seed"]) in holdout else "train"
            out[split].append((a, a + int(row["length"])))
    return out


# ------------------------------------------------------------------------------------- data
def epoch_order(n: int, epoch: int, seed: int, block: int | None) -> np.ndarray:
    """The order in which epoch ``epoch`` visits positions 0..n-1, seeded by (seed, epoch).

    ``block=None``: a plain permutation. Otherwise the positions are cut into contiguous blocks
    of ``block``; the blocks are visited in a random order and shuffled within, so a streaming
    reader needs only the current and the next block in memory.
    """
    rng = np.random.default_rng([seed, epoch, 0x7A1])
    if block is None or block >= n:
        return rng.permutation(n)
    starts = rng.permutation(np.arange(0, n, block))
    return np.concatenate([s + rng.permutation(min(block, n - s)) for s in starts])


class MemoryFrames:
    """All training frames as one uint8 tensor, on the device when it fits there.

    The epoch's order is copied to the frames' device once per epoch (``start_epoch``): a copy
    from host memory every step would wait for the GPU each time.
    """

    def __init__(self, frames: np.ndarray, device: torch.device) -> None:
        host = torch.from_numpy(frames)
        try:
            self.frames = host.to(device)
        except torch.OutOfMemoryError:
            self.frames = host.pin_memory() if device.type == "cuda" else host
        self.device = device
        self.order = torch.zeros(0, dtype=torch.long)

    def start_epoch(self, order: np.ndarray) -> None:
        self.order = torch.from_numpy(order).to(self.frames.device)

    def batch(self, at: int, size: int) -> torch.Tensor:
        """Frames at positions ``order[at : at + size]``: uint8 (size, H, W, 3) on the device."""
        index = self.order[at : at + size]
        return self.frames.index_select(0, index).to(self.device, non_blocking=True)


class StreamingFrames:
    """Training frames read from the file one block of positions at a time (two blocks cached).

    Used with ``epoch_order(..., block=self.block)``, each batch touches at most two blocks.
    """

    def __init__(self, f: storage.FrameFile, rows: np.ndarray, block: int, device: torch.device):
        self.f, self.rows, self.block, self.device = f, rows, block, device
        self.cache: dict[int, torch.Tensor] = {}
        self.order = np.zeros(0, dtype=np.int64)

    def start_epoch(self, order: np.ndarray) -> None:
        self.order = order

    def _load(self, b: int) -> torch.Tensor:
        if b not in self.cache:
            rows = self.rows[b * self.block : (b + 1) * self.block]
            # One contiguous read (the block may span a skipped holdout episode), then select.
            span = self.f.frames[int(rows[0]) : int(rows[-1]) + 1]
            if len(self.cache) >= 2:
                self.cache.pop(next(iter(self.cache)))
            self.cache[b] = torch.from_numpy(span[rows - rows[0]]).to(self.device)
        return self.cache[b]

    def batch(self, at: int, size: int) -> torch.Tensor:
        """Frames at positions ``order[at : at + size]``, grouped by block (order within kept)."""
        positions = self.order[at : at + size]
        parts = []
        for b in np.unique(positions // self.block):
            chosen = positions[positions // self.block == b] - b * self.block
            parts.append(self._load(int(b))[torch.from_numpy(chosen).to(self.device)])
        return torch.cat(parts)


# ------------------------------------------------------------------------------------ checks
def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; an unavailable device is a UsageError."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "cpu": True,
    }
    if name not in available:
        raise UsageError(f"--device must be auto, cuda, mps or cpu, got {name!r}")
    if not available[name]:
        raise UsageError(f"--device {name}: not available on this machine")
    if name == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def _check_config(c: TrainConfig) -> None:
    positive = {
        "--nz": c.nz, "--ngf": c.ngf, "--ndf": c.ndf, "--batch-size": c.batch_size,
        "--log-interval": c.log_interval, "--sample-interval": c.sample_interval,
        "--checkpoint-interval": c.checkpoint_interval, "--keep-checkpoints": c.keep_checkpoints,
        "--max-memory-frames": c.max_memory_frames,
    }  # fmt: skip
    for flag, value in positive.items():
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if c.steps is not None and c.epochs is not None:
        raise UsageError("give --steps or --epochs, not both")
    if c.steps is not None and c.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {c.steps}")
    if c.epochs is not None and not c.epochs > 0:
        raise UsageError(f"--epochs must be > 0, got {c.epochs}")
    if c.fm_layer not in FEATURE_LAYERS:
        raise UsageError(f"--fm-layer must be one of {FEATURE_LAYERS}, got {c.fm_layer}")
    if c.minibatch_kernels < 0 or c.minibatch_kernel_dim < 1:
        raise UsageError("--minibatch-kernels must be >= 0 and --minibatch-kernel-dim >= 1")
    if not 0.0 < c.real_label <= 1.0:
        raise UsageError(f"--real-label must be in (0, 1], got {c.real_label}")
    if c.loss not in ("bce", "wgan-gp"):
        raise UsageError(f"--loss must be bce or wgan-gp, got {c.loss!r}")
    if c.critic_steps is not None and c.critic_steps < 1:
        raise UsageError(f"--critic-steps must be >= 1, got {c.critic_steps}")
    if c.unrolled_steps < 0:
        raise UsageError(f"--unrolled-steps must be >= 0, got {c.unrolled_steps}")
    if c.unrolled_steps and c.loss != "bce":
        raise UsageError(
            "--unrolled-steps works with --loss bce only (Metz et al. unroll the GAN loss)"
        )
    if c.gp_weight < 0:
        raise UsageError(f"--gp-weight must be >= 0, got {c.gp_weight}")
    if c.historical_weight < 0:
        raise UsageError(f"--historical-weight must be >= 0, got {c.historical_weight}")
    if c.adv_weight < 0:
        raise UsageError(f"--adv-weight must be >= 0, got {c.adv_weight}")
    if c.holdout is not None and not 0.0 <= c.holdout < 1.0:
        raise UsageError(f"--holdout must be in [0, 1), got {c.holdout}")
    if not 0.0 <= c.ema_decay < 1.0:
        raise UsageError(f"--ema-decay must be in [0, 1), got {c.ema_decay}")
    if c.lr <= 0 or not (0 <= c.beta1 < 1 and 0 <= c.beta2 < 1):
        raise UsageError("--lr must be > 0 and --beta1/--beta2 in [0, 1)")
    if c.monitor_interval < 0 or c.monitor_interval % c.log_interval:
        raise UsageError(
            f"--monitor-interval must be a multiple of --log-interval {c.log_interval} (or 0), "
            f"got {c.monitor_interval}"
        )
    if c.monitor_interval and (c.monitor_samples < 2 or c.monitor_k < 2):
        raise UsageError("--monitor-samples and --monitor-k must be >= 2")
    if c.stop_on_collapse and not c.monitor_interval:
        raise UsageError("--stop-on-collapse needs --monitor-interval")
    if c.amp not in ("auto", "bf16", "fp16", "off"):
        raise UsageError(f"--amp must be auto, bf16, fp16 or off, got {c.amp!r}")


def _prepare_out(c: TrainConfig) -> Path | None:
    """Check the run directory; returns the checkpoint to resume from (or None)."""
    out = Path(c.out)
    if c.resume:
        saved = read_run_config(out)["config"]
        mine = dataclasses.asdict(c)
        # A setting missing from an older config.json had its default value then.
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        diff = sorted(
            k for k in mine if k not in RESUMABLE and saved.get(k, defaults[k]) != mine[k]
        )
        if diff:
            raise UsageError(f"{out}: --resume with settings that differ from the run: {diff}")
        found = sorted((out / "checkpoints").glob("ckpt_*.pt"))
        return found[-1] if found else None
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"{out} exists and is not a directory")
        if any(out.iterdir()):
            if not c.overwrite:
                raise UsageError(f"{out} exists; pass --overwrite to replace it or --resume")
            if not (out / "config.json").is_file():
                raise UsageError(f"{out}: not a carsynth run directory; refusing to replace it")
    return None


def plot_losses(metrics_path: Path, out: Path) -> None:
    """Draw the losses of ``metrics.jsonl`` (absolute values, log scale: WGAN losses go negative)
    into a PNG, with the collapse monitor's statistics in a second panel when it ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    checked = [r for r in rows if "ndb" in r]
    fig, axes = plt.subplots(
        1 + bool(checked), 1, figsize=(7, 4 + 3 * bool(checked)), squeeze=False
    )
    steps = [r["step"] for r in rows]
    for key in ("d_loss", "g_loss", "fm_distance"):
        axes[0, 0].plot(steps, [abs(r[key]) for r in rows], label=key)
    axes[0, 0].set_yscale("log")
    if checked:  # the collapse monitor's rows
        for key in ("ndb", "collapse_ratio", "duplicate_share"):
            axes[1, 0].plot([r["step"] for r in checked], [r[key] for r in checked], label=key)
    for ax in axes[:, 0]:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    storage.atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# ------------------------------------------------------------------------------------- steps
def _autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _with_history(
    loss: torch.Tensor, net: nn.Module, history: list[torch.Tensor] | None, weight: float
) -> torch.Tensor:
    """``loss`` plus ``weight`` x the historical-averaging penalty of ``net`` (when tracked)."""
    if history is None:
        return loss
    penalty = losses.historical_averaging_penalty(list(net.parameters()), history)
    return loss + weight * penalty


def discriminator_step(
    discriminator: nn.Module,
    opt_d: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x: torch.Tensor,
    fake: torch.Tensor,
    config: TrainConfig,
    amp_dtype: torch.dtype | None = None,
    history: list[torch.Tensor] | None = None,
    critic: nn.Module | None = None,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """One discriminator update on a real batch ``x`` and a generated batch ``fake``.

    ``config.loss`` "bce": real frames towards ``config.real_label`` (1, or 0.9 for one-sided
    label smoothing), generated ones towards 0. "wgan-gp": the critic loss of Gulrajani et al.
    2017 with the gradient penalty at ``eps * x + (1 - eps) * fake`` computed through ``critic``
    (the bare network: DistributedDataParallel does not take double backward). ``history`` (running
    means of the discriminator's parameters) adds the historical-averaging penalty. Returns,
    detached, [d_loss, mean D(x), mean D(G(z)), feature-matching distance]: D(.) is a probability
    for "bce" and a raw critic score for "wgan-gp". The distance is monitored in every mode.
    """
    fake = fake.detach()
    with _autocast(x.device, amp_dtype):
        real_logits, real_features = discriminator(x)
        fake_logits, fake_features = discriminator(fake)
        if config.loss == "wgan-gp":
            d_loss = losses.d_wasserstein_loss(real_logits, fake_logits)
            d_loss = d_loss + config.gp_weight * losses.gradient_penalty(
                critic or discriminator, x, fake, eps
            )
        else:
            d_loss = losses.d_bce_loss(real_logits, fake_logits, config.real_label)
        d_loss = _with_history(d_loss, discriminator, history, config.historical_weight)
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(d_loss).backward()
    scaler.step(opt_d)
    scaler.update()  # per optimizer step: critic steps may repeat this one
    with torch.no_grad():
        to_stat = torch.sigmoid if config.loss == "bce" else torch.clone
        return torch.stack(
            [
                d_loss.float(),
                to_stat(real_logits.float()).mean(),
                to_stat(fake_logits.float()).mean(),
                losses.feature_matching_loss(real_features, fake_features),
            ]
        )


def generator_step(
    generator: nn.Module,
    discriminator: nn.Module,
    opt_g: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x: torch.Tensor,
    fake: torch.Tensor,
    config: TrainConfig,
    amp_dtype: torch.dtype | None = None,
    history: list[torch.Tensor] | None = None,
    opt_d: torch.optim.Optimizer | None = None,
) -> torch.Tensor:
    """One generator update against the (just updated) discriminator; returns the loss.

    ``fake`` is ``generator``'s output, still attached to its graph. ``config.fm``: feature
    matching against the real batch's statistics under the current discriminator (Salimans et al.
    2016), plus ``config.adv_weight`` x the adversarial loss; else the adversarial loss alone
    (non-saturating for "bce", -mean D(G(z)) for "wgan-gp"). The discriminator's weights are
    frozen for the step; ``history`` adds the historical-averaging penalty.
    ``config.unrolled_steps`` K > 0 judges ``fake`` (and takes the real features) with the
    discriminator K differentiable steps of its optimizer ``opt_d`` ahead (Metz et al. 2017); the
    lookahead minimises the discriminator's cross-entropy (with ``real_label``) on ``x`` and
    ``fake``, without the historical-averaging penalty.
    """
    discriminator.requires_grad_(False)
    try:
        with _autocast(x.device, amp_dtype):
            judge = discriminator
            if config.unrolled_steps:
                if opt_d is None:
                    raise ValueError("unrolled_steps needs the discriminator's optimizer opt_d")
                judge = unrolled.lookahead(
                    discriminator,
                    opt_d,
                    lambda d: losses.d_bce_loss(d(x)[0], d(fake)[0], config.real_label),
                    config.unrolled_steps,
                )
            gen_logits, gen_features = judge(fake)
            adversarial = (
                losses.g_wasserstein_loss(gen_logits)
                if config.loss == "wgan-gp"
                else losses.g_nonsaturating_loss(gen_logits)
            )
            if config.fm:
                with torch.no_grad():
                    _, real_features = judge(x)
                g_loss = losses.feature_matching_loss(real_features, gen_features)
                if config.adv_weight:
                    g_loss = g_loss + config.adv_weight * adversarial
            else:
                g_loss = adversarial
            g_loss = _with_history(g_loss, generator, history, config.historical_weight)
        opt_g.zero_grad(set_to_none=True)
        scaler.scale(g_loss).backward()
        scaler.step(opt_g)
        scaler.update()
    finally:
        discriminator.requires_grad_(True)
    return g_loss


# ------------------------------------------------------------------------------------- loop
def train(config: TrainConfig) -> Path:
    """Train a DCGAN-64 as ``config`` says; returns the run directory.

    Raises ``UsageError`` (before anything is written) for bad settings or data, and
    :class:`TrainingDiverged` when a loss becomes NaN or Inf.
    """
    c = config
    _check_config(c)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(c.device)
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        device = resolve_device(c.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    try:
        resume_from = _prepare_out(c)
        with storage.open_frame_file(c.data) as f:
            return _train(c, f, device, rank, world, resume_from)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _train(
    c: TrainConfig,
    f: storage.FrameFile,
    device: torch.device,
    rank: int,
    world: int,
    resume_from: Path | None,
) -> Path:
    # ---- data: which frames, checked before anything is written
    if f.frame_size != (IMAGE_SIZE, IMAGE_SIZE):
        raise UsageError(
            f"{f.path}: frames are {f.frame_size[0]}x{f.frame_size[1]}, "
            f"the DCGAN-64 model needs {IMAGE_SIZE}x{IMAGE_SIZE}"
        )
    if c.holdout and f.episodes is None:
        raise UsageError(f"{f.path}: --holdout needs a real file with episodes")
    holdout_seeds = _holdout_seeds(f, c.holdout)
    ranges = _split_ranges(f, set(holdout_seeds))
    rows = np.concatenate([np.arange(a, b) for a, b in ranges["train"]] or [np.zeros(0, int)])
    n = len(rows)
    if n == 0:
        raise UsageError(f"{f.path}: no training frames (empty file, or every episode held out)")
    holdout_rows = [np.arange(a, b) for a, b in ranges["holdout"]]
    if c.monitor_interval and not holdout_rows:
        raise UsageError(f"{f.path}: --monitor-interval needs held-out episodes (see --holdout)")
    if c.monitor_interval and n < c.monitor_k:
        raise UsageError(f"--monitor-k {c.monitor_k} is more than the {n} training frames")
    global_batch = c.batch_size * world
    if global_batch > n:
        raise UsageError(
            f"--batch-size {c.batch_size} x {world} processes is larger than the "
            f"{n} training frames of {f.path}"
        )
    batches_per_epoch = n // global_batch  # the last partial batch of an epoch is dropped
    critic_steps = c.critic_steps or (5 if c.loss == "wgan-gp" else 1)
    steps_per_epoch = batches_per_epoch / critic_steps  # generator steps per pass over the data
    total = c.steps or (math.ceil(c.epochs * steps_per_epoch) if c.epochs else DEFAULT_STEPS)

    # ---- run directory (rank 0 writes; every rank reads)
    out = Path(c.out)
    ckpt_dir, sample_dir = out / "checkpoints", out / "samples"
    data_info = {
        "path": str(Path(c.data).resolve()),
        "fingerprint": fingerprint(c.data),
        "kind": f.kind,
        "train_frames": n,
        "holdout_frames": sum(b - a for a, b in ranges["holdout"]),
        "holdout_seeds": holdout_seeds,
    }
    if resume_from is not None:
        saved = read_run_config(out)["data"]
        if not same_data(saved["fingerprint"], data_info["fingerprint"]):
            raise UsageError(f"{c.data}: the data file changed since the run started")
    if world > 1:
        dist.barrier()  # every process has checked the inputs before rank 0 writes
    if rank == 0:
        if c.overwrite and out.exists() and not c.resume:
            shutil.rmtree(out)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        sample_dir.mkdir(exist_ok=True)
        record = {
            "config": dataclasses.asdict(c),
            "data": data_info,
            "steps": total,
            "steps_per_epoch": steps_per_epoch,
            "critic_steps": critic_steps,
            "world_size": world,
            "device": str(device),
            "versions": {
                "carsynth": __version__,
                "torch": torch.__version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
        }
        storage.atomic_write(
            out / "config.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n")
        )
        for stale in ckpt_dir.glob(".*.tmp"):
            stale.unlink()

    if n <= c.max_memory_frames:
        block = None
        source: MemoryFrames | StreamingFrames = MemoryFrames(
            np.concatenate([f.frames[a:b] for a, b in ranges["train"]]), device
        )
    else:
        block = max(c.max_memory_frames // 2, global_batch)
        source = StreamingFrames(f, rows, block, device)

    monitor = None
    if c.monitor_interval and rank == 0:
        rng = np.random.default_rng([c.seed, 0x3D])
        holdout_all = np.concatenate(holdout_rows)
        pick_train = np.sort(rng.choice(rows, min(n, FIT_SAMPLES), replace=False))
        pick_holdout = np.sort(
            rng.choice(holdout_all, min(len(holdout_all), c.monitor_samples), replace=False)
        )
        monitor = CollapseMonitor(
            f.frames[pick_train], f.frames[pick_holdout], c.monitor_samples, c.monitor_k,
            c.seed, device,
        )  # fmt: skip

    # ---- networks, optimisers, precision
    torch.manual_seed(c.seed)
    generator = Generator(c.nz, c.ngf).to(device)
    discriminator = Discriminator(
        c.ndf, c.fm_layer, c.minibatch_kernels, c.minibatch_kernel_dim, norm=c.loss == "bce"
    ).to(device)
    channels_last = c.channels_last and device.type == "cuda"
    if channels_last:
        generator.to(memory_format=torch.channels_last)
        discriminator.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(generator).eval().requires_grad_(False)
    opt_g = torch.optim.Adam(
        generator.parameters(), lr=c.lr, betas=(float(c.beta1), float(c.beta2))
    )
    opt_d = torch.optim.Adam(
        discriminator.parameters(), lr=c.lr, betas=(float(c.beta1), float(c.beta2))
    )
    amp = c.amp if c.amp != "auto" else ("bf16" if device.type == "cuda" else "off")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    # Historical averaging: running means of every parameter over all updates so far.
    history = None
    if c.historical_weight:
        history = {
            "g": [p.detach().clone() for p in generator.parameters()],
            "d": [p.detach().clone() for p in discriminator.parameters()],
        }

    start = 0
    if resume_from is not None:
        state = torch.load(resume_from, map_location="cpu", weights_only=True)
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        ema.load_state_dict(state["ema"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        scaler.load_state_dict(state["scaler"])
        if history is not None:
            for key in history:
                for mean, saved in zip(history[key], state[f"history_{key}"], strict=True):
                    mean.copy_(saved)
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state["rng_cuda"] is not None:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), device)
        start = int(state["step"])

    # Networks as the steps call them: the discriminator step goes through DDP (its gradients
    # are averaged over processes); the generator step calls the bare discriminator, whose
    # weights it does not update, so no gradient of it is exchanged.
    g_step, d_step, d_plain = generator, discriminator, discriminator
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        g_step = nn.parallel.DistributedDataParallel(
            generator, device_ids=ids, broadcast_buffers=False
        )
        d_step = nn.parallel.DistributedDataParallel(
            discriminator, device_ids=ids, broadcast_buffers=False
        )
    if c.compile:
        g_step, d_step, d_plain = (torch.compile(m) for m in (g_step, d_step, d_plain))

    fixed_z = latents(c.seed, 0, SAMPLE_COUNT, c.nz).to(device)
    noise = torch.Generator(device=device)
    ema_params, ema_buffers = list(ema.parameters()), list(ema.buffers())
    g_params, g_buffers = list(generator.parameters()), list(generator.buffers())
    d_params = list(discriminator.parameters())

    writer = None
    if rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            writer = None
        metrics_path = out / "metrics.jsonl"
        # Rows past the checkpoint being resumed will be written again.
        kept = []
        if metrics_path.exists():
            kept = [
                line
                for line in metrics_path.read_text().splitlines()
                if line and json.loads(line)["step"] <= start
            ]
        metrics_path.write_text("".join(line + "\n" for line in kept))

    def to_input(frames: torch.Tensor) -> torch.Tensor:
        x = frames.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return x.contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )

    def save_checkpoint(step: int) -> None:
        state = {
            "step": step,
            "generator": generator.state_dict(),
            "discriminator": discriminator.state_dict(),
            "ema": ema.state_dict(),
            "opt_g": opt_g.state_dict(),
            "opt_d": opt_d.state_dict(),
            "scaler": scaler.state_dict(),
            **({f"history_{k}": v for k, v in history.items()} if history is not None else {}),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }
        storage.atomic_write(ckpt_dir / f"ckpt_{step:07d}.pt", lambda tmp: torch.save(state, tmp))
        for old in sorted(ckpt_dir.glob("ckpt_*.pt"))[: -c.keep_checkpoints]:
            old.unlink()

    # Sums since the last log row, kept on the device: d_loss, g_loss, D(x), D(G(z)), fm distance.
    sums = torch.zeros(5, device=device)
    since, tick = 0, time.perf_counter()
    order_epoch = -1
    collapsed, failures = False, []
    bar = tqdm(total=total, initial=start, disable=not (c.progress and rank == 0), desc="train")
    try:
        for step in range(start, total):
            # critic_steps discriminator updates, each on its own batch and noise; the generator
            # update then uses the last of them (its fake batch keeps the generator's graph).
            for i in range(critic_steps):
                batch = step * critic_steps + i
                epoch, k = divmod(batch, batches_per_epoch)
                if epoch != order_epoch:
                    order_epoch = epoch
                    source.start_epoch(epoch_order(n, epoch, c.seed, block))
                at = k * global_batch + rank * c.batch_size
                x = to_input(source.batch(at, c.batch_size))
                noise.manual_seed(mix_seed(c.seed, step, rank, i))
                z = torch.randn(c.batch_size, c.nz, 1, 1, device=device, generator=noise)
                eps = torch.rand(c.batch_size, 1, 1, 1, device=device, generator=noise)
                with torch.set_grad_enabled(i == critic_steps - 1), _autocast(device, amp_dtype):
                    fake = g_step(z)
                d_stats = discriminator_step(
                    d_step, opt_d, scaler, x, fake, c, amp_dtype,
                    history["d"] if history else None, d_plain, eps,
                )  # fmt: skip
            g_loss = generator_step(
                generator, d_plain, opt_g, scaler, x, fake, c, amp_dtype,
                history["g"] if history else None, opt_d,
            )  # fmt: skip
            if history is not None:
                with torch.no_grad():  # the mean of the step + 2 parameter sets seen so far
                    torch._foreach_lerp_(history["g"], g_params, 1.0 / (step + 2))
                    torch._foreach_lerp_(history["d"], d_params, 1.0 / (step + 2))

            # EMA of the generator, warmed up so that short runs are not dominated by the init.
            decay = min(c.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, g_params, 1.0 - decay)
                for e, g in zip(ema_buffers, g_buffers, strict=True):
                    e.copy_(g)

            with torch.no_grad():
                sums += torch.cat([d_stats[:1], g_loss.detach().float().view(1), d_stats[1:]])
            since += 1
            bar.update(1)
            done = step + 1
            last = done == total
            if done % c.log_interval == 0 or last:
                values = (sums / since).tolist()  # the one host sync per interval
                if not all(math.isfinite(v) for v in values):
                    raise TrainingDiverged(
                        f"loss became NaN/Inf by step {done}; the last good checkpoint is in "
                        f"{ckpt_dir} (try a lower --lr)"
                    )
                seconds = time.perf_counter() - tick
                if rank == 0:
                    with torch.no_grad():
                        samples = ema(fixed_z).float()
                        diversity = torch.pdist(samples.flatten(1)).mean().item()
                    row = {
                        "step": done,
                        "epoch": round(done / steps_per_epoch, 4),
                        "d_loss": values[0],
                        "g_loss": values[1],
                        "d_real": values[2],
                        "d_fake": values[3],
                        "fm_distance": values[4],
                        "sample_diversity": diversity,
                        "images_per_s": since * global_batch / seconds,
                    }
                    if monitor is not None and done % c.monitor_interval == 0:
                        row.update(monitor(ema))
                        collapsed, failures = row["collapsed"], row["collapse_failures"]
                    with open(out / "metrics.jsonl", "a") as m:
                        m.write(json.dumps(row) + "\n")
                    if writer is not None:
                        for key, value in row.items():
                            if isinstance(value, (int, float)):
                                writer.add_scalar(key, value, done)
                    bar.set_postfix(d=f"{values[0]:.3f}", g=f"{values[1]:.3f}")
                sums.zero_()
                since, tick = 0, time.perf_counter()
            if rank == 0 and (done % c.sample_interval == 0 or last):
                with torch.no_grad():
                    grid = ema(fixed_z).float()
                path = sample_dir / f"step_{done:07d}.png"
                storage.atomic_write(
                    path,
                    lambda tmp, grid=grid: save_image(
                        grid, tmp, format="png", nrow=8, normalize=True, value_range=(-1, 1)
                    ),
                )
            if rank == 0 and (done % c.checkpoint_interval == 0 or last):
                if not torch.isfinite(sums).all():
                    raise TrainingDiverged(
                        f"loss became NaN/Inf by step {done}; the last good checkpoint is in "
                        f"{ckpt_dir} (try a lower --lr)"
                    )
                save_checkpoint(done)
                plot_losses(out / "metrics.jsonl", out / "loss.png")
            if c.stop_on_collapse and done % c.monitor_interval == 0:
                flag = torch.tensor([float(collapsed)], device=device)
                if world > 1:
                    dist.broadcast(flag, 0)  # rank 0 ran the monitor; every rank stops together
                if flag.item():
                    if rank == 0 and not (ckpt_dir / f"ckpt_{done:07d}.pt").exists():
                        save_checkpoint(done)
                        plot_losses(out / "metrics.jsonl", out / "loss.png")
                    raise TrainingCollapsed(
                        f"stopped at step {done}: {'; '.join(failures) or 'collapse'}; "
                        f"checkpoint {ckpt_dir / f'ckpt_{done:07d}.pt'} kept"
                    )
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return out
