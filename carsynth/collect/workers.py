"""Parallel rollouts with an ordered hand-off to the writer.

Episode k of a run uses the environment seed ``seed + k`` and a policy random generator seeded from
that number alone, so its frames depend on nothing else: not on the worker that ran it, nor on the
timing of the others. The main process writes episodes strictly in k order, holding back those
that finish early, and keeps at most ``2 * workers`` episodes in flight, so memory stays flat
however many episodes are asked for. The file therefore always holds a prefix of the run's
episodes, which is what ``--resume`` continues from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from carsynth import storage
from carsynth.collect.frames import EnvSettings, FrameSettings, process_frame
from carsynth.collect.policies import make_policy, policy_params
from carsynth.errors import UsageError
from carsynth.flags import option, required
from carsynth.progress import Progress, log

# Settings that must match for --resume to continue a file (and for shards to merge).
RESUME_KEYS = (
    "env_id", "policy", "policy_params", "frame_size", "crop_hud", "skip_frames", "frame_skip",
    "seed", "domain_randomize", "lap_complete_percent", "max_steps", "holdout_fraction", "shard",
)  # fmt: skip


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` with 0 <= I < N, as used by ``--shard``."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text}: expected I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text}: need 0 <= I < N")
    return index, count


@dataclass
class CollectConfig:
    """Every setting of ``carsynth collect`` (the CLI flags map one to one onto these fields)."""

    out: str = required("output frame file (.h5)")
    episodes: int = option(64, "episodes in the whole run (all shards together)")
    workers: int = option(0, "worker processes (0: one per CPU core)")
    policy: str = option("pilot", "random, brownian, pilot or module:callable")
    policy_args: dict[str, str] = field(default_factory=dict)  # --policy-arg NAME=VALUE
    seed: int = option(0, "episode k uses env seed SEED+k")
    size: int = option(64, "stored frames are SIZE x SIZE")
    crop_hud: bool = option(False, "drop the 12 dashboard rows before resizing")
    skip_frames: int = option(50, "env steps not recorded at the start (the zoom-in)")
    frame_skip: int = option(1, "each action is repeated this many steps; one frame per action")
    env_id: str = option("CarRacing-v3", "gymnasium env id", flag="--env")
    domain_randomize: bool = option(False, "CarRacing colour randomisation")
    lap_complete_percent: float = option(0.95, "CarRacing's lap_complete_percent")
    max_steps: int = option(1000, "env steps per episode before truncation")
    renderer: str = option(
        "fast", "fast (carsynth.envs, same frames) or stock gymnasium rendering",
        choices=("fast", "stock"),
    )  # fmt: skip
    holdout: float = option(0.1, "share of holdout episodes (decided by each episode's seed)")
    shard: tuple[int, int] = option(
        (0, 1), "I/N: collect the I-th of N disjoint seed blocks", type=parse_shard, metavar="I/N"
    )
    resume: bool = option(False, "continue an interrupted file")
    overwrite: bool = option(False, "replace an existing file")
    progress: bool = option(True, "progress bar on a terminal, a log line every 30 s elsewhere")
    quiet: bool = option(False, "only warnings and errors on stderr (no progress either)")

    @property
    def env_settings(self) -> EnvSettings:
        return EnvSettings(
            self.env_id, self.domain_randomize, self.lap_complete_percent, self.max_steps,
            self.renderer,
        )  # fmt: skip

    @property
    def frame_settings(self) -> FrameSettings:
        return FrameSettings(self.size, self.crop_hud, self.skip_frames, self.frame_skip)

    def episode_range(self) -> range:
        """The episode numbers k this shard collects: the I-th of N contiguous blocks."""
        index, count = self.shard
        return range(index * self.episodes // count, (index + 1) * self.episodes // count)


def check_config(config: CollectConfig) -> None:
    """Reject bad settings before anything is written."""
    checks = [
        (config.episodes >= 1, "--episodes must be at least 1"),
        (config.workers >= 0, "--workers must be 0 (all cores) or more"),
        (8 <= config.size <= 512, "--size must be between 8 and 512"),
        (config.seed >= 0, "--seed must be 0 or more (gymnasium seeds are non-negative)"),
        (config.skip_frames >= 0, "--skip-frames must be 0 or more"),
        (config.frame_skip >= 1, "--frame-skip must be at least 1"),
        (config.max_steps >= 1, "--max-steps must be at least 1"),
        (
            config.skip_frames < config.max_steps,
            f"--skip-frames {config.skip_frames} must be less than --max-steps "
            f"{config.max_steps}: no step would be recorded",
        ),
        (0.0 <= config.holdout < 1.0, "--holdout must be in [0, 1)"),
        (config.renderer in ("fast", "stock"), "--renderer must be fast or stock"),
        (0 < config.lap_complete_percent <= 1, "--lap-complete-percent must be in (0, 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if config.resume and config.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; choose one")


def file_attrs(config: CollectConfig, action_dim: int) -> dict[str, Any]:
    """The settings recorded in the file (see README, "HDF5 schema")."""
    policy = make_policy(config.policy, config.policy_args)
    return {
        "env_id": config.env_id,
        "gymnasium_version": gym.__version__,
        "renderer": config.renderer,
        "policy": config.policy,
        "policy_params": json.dumps(policy_params(policy) or config.policy_args, sort_keys=True),
        "frame_size": [config.size, config.size],
        "crop_hud": config.crop_hud,
        "skip_frames": config.skip_frames,
        "frame_skip": config.frame_skip,
        "seed": config.seed,
        "domain_randomize": config.domain_randomize,
        "lap_complete_percent": config.lap_complete_percent,
        "max_steps": config.max_steps,
        "holdout_fraction": config.holdout,
        "shard": f"{config.shard[0]}/{config.shard[1]}",
        "episodes_requested": config.episodes,
        "action_dim": action_dim,
    }


@dataclass(frozen=True)
class EpisodeJob:
    """What a worker needs to run one episode (small and picklable)."""

    seed: int
    env: EnvSettings
    frames: FrameSettings
    policy: str
    policy_args: tuple[tuple[str, str], ...]
    holdout_fraction: float


_worker_env: dict[EnvSettings, gym.Env] = {}


def run_episode(job: EpisodeJob) -> storage.Episode:
    """Run one episode and return its recorded observations, actions, rewards and flags.

    The policy acts on every ``frame_skip``-th step and its action is repeated in between (the
    usual Atari-style frame skip); observation t is the one action t acted on and reward t the
    sum of rewards until the next recorded observation. The first ``skip_frames`` steps are
    driven but not recorded. The episode ends with the observation after its last action (T + 1
    observations for T actions). Each worker process keeps one env per setting and reuses it.
    """
    env = _worker_env.get(job.env)
    if env is None:
        env = _worker_env[job.env] = job.env.make()
    policy = make_policy(job.policy, dict(job.policy_args))
    observation, _ = env.reset(seed=job.seed)
    policy.reset(env, np.random.default_rng([job.seed, 1]))
    settings = job.frames
    frames, actions, rewards, terminated, truncated = [], [], [], [], []
    step, done = 0, False  # step: env steps taken before `observation`
    while not done:
        action = policy.act(env, observation)
        reward, term, trunc, taken = 0.0, False, False, 0
        while taken < settings.frame_skip and not (term or trunc):
            next_observation, r, term, trunc, _ = env.step(action)
            reward += float(r)
            taken += 1
        if step >= settings.skip_frames:
            frames.append(process_frame(observation, settings.size, settings.crop_hud))
            actions.append(np.asarray(action, dtype=np.float32).reshape(-1))
            rewards.append(reward)
            terminated.append(term)
            truncated.append(trunc)
        observation, step = next_observation, step + taken
        done = term or trunc
    frames.append(process_frame(observation, settings.size, settings.crop_hud))
    action_dim = int(np.prod(env.action_space.shape)) or 1
    return storage.Episode(
        seed=job.seed,
        observations=np.asarray(frames, dtype=np.uint8).reshape(
            -1, settings.size, settings.size, 3
        ),
        actions=np.asarray(actions, dtype=np.float32).reshape(-1, action_dim),
        rewards=np.asarray(rewards, dtype=np.float32),
        terminations=np.asarray(terminated, dtype=bool),
        truncations=np.asarray(truncated, dtype=bool),
        holdout=storage.is_holdout(job.seed, job.holdout_fraction),
    )


def _init_worker(parent: int) -> None:
    # Ctrl-C (to the whole process group) and a cluster's SIGTERM are the main process's to
    # handle: it stops the workers itself. Workers must not print KeyboardInterrupt tracebacks
    # nor die first and make the main process report a broken pool instead of the interrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """End this worker when the main process is gone (killed with SIGKILL, say).

    A worker holds both ends of its job queue's pipe, so it never sees end-of-file and would
    wait for jobs forever (found by scripts/reliability_battery.py: two orphans per kill).
    """
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _ordered(todo: Iterator[EpisodeJob], workers: int) -> Iterator[storage.Episode]:
    """Run jobs on ``workers`` processes; yield episodes in job order, a bounded window ahead.

    If the caller stops early (an interrupt), episodes still running are dropped: their worker
    processes are killed at once instead of being waited for.
    """
    if workers == 1:
        for job in todo:
            yield run_episode(job)
        return
    context = multiprocessing.get_context("spawn")
    others = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(os.getpid(),)
    )
    pending: deque[Future] = deque()
    try:
        for job in todo:
            pending.append(pool.submit(run_episode, job))
            if len(pending) >= 2 * workers:
                break
        while pending:
            episode = pending.popleft().result()
            job = next(todo, None)
            if job is not None:
                pending.append(pool.submit(run_episode, job))
            yield episode
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if pending:
            for process in set(multiprocessing.active_children()) - others:
                process.kill()


@functools.cache
def fast_renderer_matches() -> bool:
    """Whether the fast renderer reproduces the stock frames here (checked once per process)."""
    from carsynth.envs import matches_stock

    return matches_stock()


def resolve_renderer(config: CollectConfig) -> CollectConfig:
    """``config``, with the stock renderer if the fast one does not reproduce its frames.

    The fast env overrides private methods of gymnasium's CarRacing; a gymnasium or pygame
    version that draws differently must not give silently different frames, so a failed check
    switches to the stock env with one warning line (and the file records ``renderer=stock``).
    """
    if config.renderer != "fast" or config.env_id != "CarRacing-v3" or fast_renderer_matches():
        return config
    print(
        f"carsynth: warning: the fast renderer does not reproduce CarRacing-v3's frames with "
        f"gymnasium {gym.__version__}; collecting with --renderer stock",
        file=sys.stderr,
    )
    return dataclasses.replace(config, renderer="stock")


def _resume_state(config: CollectConfig, path: Path, attrs: dict[str, Any]) -> None:
    """Check that ``path`` can be continued with ``config``, repairing a killed run's file."""
    if not path.is_file():
        raise UsageError(f"--resume: {path} does not exist (drop --resume to start it)")
    dropped = storage.repair(path)
    with storage.open_frame_file(path) as frame_file:
        if frame_file.kind != "real":
            raise UsageError(f"--resume: {path} is a {frame_file.kind} file, not a collection")
        stored = {k: frame_file.attrs.get(k) for k in RESUME_KEYS}
        seeds = frame_file.episodes["seed"].tolist()
    wanted = {k: attrs.get(k) for k in RESUME_KEYS}
    different = [k for k in RESUME_KEYS if stored[k] != wanted[k]]
    if different:
        name = different[0]
        raise UsageError(
            f"--resume: {path} was collected with {name}={stored[name]!r}, "
            f"this run has {name}={wanted[name]!r}"
        )
    expected = [config.seed + k for k in config.episode_range()[: len(seeds)]]
    if seeds != expected:
        raise UsageError(f"--resume: the episodes in {path} are not this run's first episodes")
    if dropped:
        log.info(f"resume: dropped {dropped} frames of an episode cut short by the last run")


def collect(config: CollectConfig) -> Path:
    """Collect ``config.episodes`` episodes (this shard's part of them) into ``config.out``.

    Returns the output path. Raises :class:`UsageError` for bad settings before writing anything,
    and when another process is writing ``config.out``. ``KeyboardInterrupt`` (Ctrl-C; the CLI
    turns SIGTERM into one) stops at once: episodes in flight are dropped, the file keeps the
    finished ones, and ``resume=True`` continues it.
    """
    check_config(config)
    make_policy(config.policy, config.policy_args)  # fail early on a bad policy
    path = Path(config.out)
    with storage.writer_lock(path):
        config = resolve_renderer(config)
        action_dim = _action_dim(config)
        attrs = file_attrs(config, action_dim)
        with _open_output(config, path, attrs, action_dim) as writer:
            _collect_into(writer, config)
    return path


def _action_dim(config: CollectConfig) -> int:
    """The size of the env's action vector, checking that it gives RGB observations."""
    try:
        probe = config.env_settings.make()
    except ValueError as error:
        raise UsageError(f"--env {config.env_id}: {error}") from None
    action_dim = int(np.prod(probe.action_space.shape)) or 1
    obs_shape = probe.observation_space.shape
    probe.close()
    if obs_shape is None or len(obs_shape) != 3 or obs_shape[2] != 3:
        raise UsageError(f"--env {config.env_id}: observations are {obs_shape}, need (H, W, 3) RGB")
    return action_dim


def _open_output(
    config: CollectConfig, path: Path, attrs: dict[str, Any], action_dim: int
) -> storage.FrameWriter:
    """The writer of this run: on the file to continue (``--resume``) or on a new one."""
    if config.resume:
        _resume_state(config, path, attrs)
        return storage.FrameWriter.open(path)
    return storage.FrameWriter.create(
        path, kind="real", frame_size=(config.size, config.size), action_dim=action_dim,
        attrs=attrs, overwrite=config.overwrite,
    )  # fmt: skip


def _append_uninterrupted(writer: storage.FrameWriter, episode: storage.Episode) -> None:
    """Append an episode with SIGINT and SIGTERM held back until it is written whole.

    Python runs signal handlers in the main thread whichever thread the kernel gave the signal
    to, so blocking the signals in this thread (``pthread_sigmask``) does not hold them back
    when the process has other threads (the worker pool's): the handlers are swapped for ones
    that only note the signal, and the noted signal is handed to the old handler afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        writer.append_episode(episode)  # Python handlers, and KeyboardInterrupt, run elsewhere
        return
    noted: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _: noted.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}  # fmt: skip
    try:
        writer.append_episode(episode)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if noted:  # the first signal, as if it came now
        handler = previous[noted[0]]
        if callable(handler):
            handler(noted[0], None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(noted[0])


def _collect_into(writer: storage.FrameWriter, config: CollectConfig) -> None:
    """Run the episodes the file does not hold yet and append them in order."""
    episode_numbers = config.episode_range()[writer.num_episodes :]
    jobs = (
        EpisodeJob(
            config.seed + k,
            config.env_settings,
            config.frame_settings,
            config.policy,
            tuple(sorted(config.policy_args.items())),
            config.holdout,
        )  # fmt: skip
        for k in episode_numbers
    )
    workers = config.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(episode_numbers)))
    progress = Progress(
        len(config.episode_range()), desc="collect", unit="ep", initial=writer.num_episodes,
        mode="auto" if config.progress and not config.quiet else "off",
    )  # fmt: skip
    frames, start = 0, time.perf_counter()
    with progress, contextlib.closing(_ordered(jobs, workers)) as episodes:
        for episode in episodes:
            _append_uninterrupted(writer, episode)
            frames += len(episode)
            fps = frames / (time.perf_counter() - start)
            progress.update(1, frames=frames, fps=f"{fps:.0f}")
