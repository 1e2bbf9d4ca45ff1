"""Benchmark the fast CarRacing and ``carsynth collect`` against their baselines, in one run.

Rows:
- env steps/s of the stock ``CarRacing-v3`` and of ``carsynth/CarRacingFast-v3`` in this process,
  the same actions for both (best of ``--repeats``, interleaved, so load spikes hit both alike);
- frames/s of a plain World-Models-style loop (one process, ``gym.make("CarRacing-v3")``,
  Brownian actions, observations appended to a list and saved with ``np.savez_compressed`` per
  episode), the baseline;
- frames/s of the whole ``carsynth collect`` command on all cores, ``--renderer fast`` and
  ``--renderer stock``, with the same episodes, Brownian policy and every step recorded
  (``--skip-frames 0``); wall time from launch to exit, start-up included; the peak resident
  memory of its main process.

Collections run ``--rounds`` times, interleaved, and keep their fastest run. Prints a table and
writes JSON (``--json``). The machine may be shared: the load average is recorded before and after.

    python3 scripts/bench_collect.py --episodes 8 --max-steps 1000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pygame

import carsynth  # noqa: F401 - registers carsynth/CarRacingFast-v3
from carsynth import storage
from carsynth.collect import make_policy

ROOT = Path(__file__).resolve().parents[1]


def env_steps_per_second(env_ids: list[str], steps: int, repeats: int) -> dict[str, float]:
    """Best steps/s of each env over ``repeats`` interleaved runs of the same action sequence."""
    envs = {env_id: gym.make(env_id) for env_id in env_ids}
    probe = envs[env_ids[0]]
    policy = make_policy("brownian")
    policy.reset(probe, np.random.default_rng(0))
    actions = [policy.act(probe, None) for _ in range(steps)]
    best = dict.fromkeys(env_ids, 0.0)
    for _ in range(repeats):
        for env_id, env in envs.items():
            env.reset(seed=0)
            start = time.perf_counter()
            for action in actions:
                _, _, terminated, truncated, _ = env.step(action)
                if terminated or truncated:
                    env.reset()
            best[env_id] = max(best[env_id], steps / (time.perf_counter() - start))
    return best


def plain_loop(episodes: int, max_steps: int, out_dir: Path) -> tuple[int, float]:
    """The World Models way: one process, frames in a list, one .npz per episode.

    Returns (frames, seconds, CPU seconds).
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    env = gym.make("CarRacing-v3", max_episode_steps=max_steps)
    frames_total = 0
    for episode in range(episodes):
        observation, _ = env.reset(seed=episode)
        policy = make_policy("brownian")
        policy.reset(env, np.random.default_rng(episode))
        frames, actions = [], []
        done = False
        while not done:
            action = policy.act(env, observation)
            frames.append(observation)
            actions.append(action)
            observation, _, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
        np.savez_compressed(out_dir / f"{episode}.npz", obs=np.array(frames), action=actions)
        frames_total += len(frames)
    return frames_total, time.perf_counter() - start, time.process_time() - cpu_start


def peak_rss_mib(pid: int) -> float | None:
    """The peak resident memory of a running process (VmHWM), or None once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def collect_command(renderer: str, episodes: int, max_steps: int, out: Path) -> dict:
    """Run ``carsynth collect`` on all cores; return frames, seconds and main-process peak RSS."""
    command = [
        sys.executable, "-m", "carsynth", "collect", "--out", str(out), "--overwrite",
        "--episodes", str(episodes), "--max-steps", str(max_steps), "--skip-frames", "0",
        "--policy", "brownian", "--workers", "0", "--renderer", renderer, "--no-progress",
    ]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    start, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL)
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, peak_rss_mib(process.pid) or 0.0)
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    # CPU time of the command and its workers (reaped children count in RUSAGE_CHILDREN).
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    if process.returncode != 0:
        raise SystemExit(f"carsynth collect --renderer {renderer} failed")
    with storage.open_frame_file(out) as f:
        frames, recorded = f.num_frames, f.attrs["renderer"]
    return {
        "frames": frames, "seconds": seconds, "cpu_seconds": cpu, "main_rss_mib": peak,
        "renderer": recorded,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=8, help="episodes per collection run")
    parser.add_argument("--max-steps", type=int, default=1000, help="steps per episode")
    parser.add_argument("--env-steps", type=int, default=1000, help="steps per env-speed run")
    parser.add_argument("--repeats", type=int, default=3, help="env-speed runs per env")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each collection")
    parser.add_argument("--json", default="bench_collect.json", help="where to write results")
    args = parser.parse_args()
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # headless pygame

    load_before = os.getloadavg()
    speeds = env_steps_per_second(
        ["CarRacing-v3", "carsynth/CarRacingFast-v3"], args.env_steps, args.repeats
    )
    # Rounds interleave the three collections so that a burst of load from elsewhere hits them
    # alike; each keeps its fastest round.
    plain_frames, plain_seconds, plain_cpu = 0, math.inf, math.inf
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            frames, seconds, cpu = plain_loop(args.episodes, args.max_steps, Path(tmp))
            if seconds < plain_seconds:
                plain_frames, plain_seconds, plain_cpu = frames, seconds, cpu
            for renderer in ("fast", "stock"):
                out = Path(tmp) / f"{renderer}.h5"
                run = collect_command(renderer, args.episodes, args.max_steps, out)
                if renderer not in runs or run["seconds"] < runs[renderer]["seconds"]:
                    runs[renderer] = run
    load_after = os.getloadavg()

    stock_speed = speeds["CarRacing-v3"]
    plain_fps = plain_frames / plain_seconds
    rows = [
        ("env CarRacing-v3 (stock), 1 process", "steps/s", stock_speed, 1.0, ""),
        (
            "env carsynth/CarRacingFast-v3, 1 process", "steps/s",
            speeds["carsynth/CarRacingFast-v3"],
            speeds["carsynth/CarRacingFast-v3"] / stock_speed, "vs stock env",
        ),
        ("plain World-Models loop, 1 process", "frames/s", plain_fps, 1.0, ""),
    ]  # fmt: skip
    for renderer, run in runs.items():
        fps = run["frames"] / run["seconds"]
        name = f"carsynth collect --renderer {renderer}, {os.cpu_count()} cores"
        rows.append((name, "frames/s", fps, fps / plain_fps, "vs plain loop"))

    versions = f"gymnasium {gym.__version__}, pygame {pygame.version.ver}"
    print(f"CPU cores: {os.cpu_count()}, load average before {load_before[0]:.2f}, "
          f"after {load_after[0]:.2f}; {versions}")  # fmt: skip
    print(f"collection runs: {args.episodes} episodes x {args.max_steps} steps, every frame kept")
    print(f"| {'row':<44} | {'rate':>16} | {'ratio':>20} |")
    print(f"| {'-' * 44} | {'-' * 15}: | {'-' * 19}: |")
    for name, unit, value, ratio, versus in rows:
        ratio_text = f"{ratio:.2f}x {versus}" if versus else "1.00x"
        print(f"| {name:<44} | {value:>7.0f} {unit:<8} | {ratio_text:>20} |")
    # On a shared machine wall-clock rates depend on what else runs; CPU time does much less.
    plain_per_cpu = plain_frames / plain_cpu
    print(f"plain loop: {plain_frames} frames in {plain_seconds:.1f} s, "
          f"{plain_per_cpu:.0f} frames per CPU-second")  # fmt: skip
    for renderer, run in runs.items():
        per_cpu = run["frames"] / run["cpu_seconds"]
        print(f"collect --renderer {renderer}: {run['frames']} frames in {run['seconds']:.1f} s, "
              f"{per_cpu:.0f} frames per CPU-second ({per_cpu / plain_per_cpu:.2f}x the plain "
              f"loop's), main process peak RSS {run['main_rss_mib']:.0f} MiB, "
              f"file renderer={run['renderer']}")  # fmt: skip

    result = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "versions": {"gymnasium": gym.__version__, "pygame": pygame.version.ver},
        "load_average": {"before": load_before, "after": load_after},
        "settings": vars(args),
        "env_steps_per_second": speeds,
        "plain_loop": {
            "frames": plain_frames,
            "seconds": plain_seconds,
            "cpu_seconds": plain_cpu,
            "fps": plain_fps,
        },  # fmt: skip
        "collect": runs,
        "ratios": {
            "fast_env_vs_stock_env": speeds["carsynth/CarRacingFast-v3"] / stock_speed,
            **{
                f"collect_{r}_vs_plain_loop": run["frames"] / run["seconds"] / plain_fps
                for r, run in runs.items()
            },
        },
    }
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
