"""SIGKILL `carsynth collect` at random moments and check what it leaves; report the counts.

Each run starts a fresh collect (a real subprocess, as a user starts it) while a reader polls the
file the way ``carsynth info`` does and a ``FrameDataset`` holds it open, kills the collect with
SIGKILL at a random moment (sometimes its first ``--resume`` too), and then checks:

- the file opens (or does not exist yet, if the kill came before it was created);
- it holds whole episodes only: a prefix of the uninterrupted run's episodes, same seeds,
  lengths and frames;
- ``--resume`` (or a fresh start, when no file existed) ends with a file whose every dataset
  holds the same bytes as the uninterrupted run's, and whose attributes agree (except
  ``created``);
- no reader error other than "no such file yet", no lock file left behind, and no process of the
  killed collect (its workers) still alive 30 s after the kill (read from /proc: Linux; a worker
  notices within a second, once it has started: on a loaded machine that can take seconds).

    python scripts/reliability_battery.py --runs 15 --out battery.json

prints a table with one row per run and the totals, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from carsynth import files, storage  # noqa: E402
from carsynth.data import FrameDataset  # noqa: E402
from carsynth.errors import UsageError  # noqa: E402


@dataclasses.dataclass
class Run:
    """What one killed run left and what resuming it gave."""

    run: int
    kill_after_s: float
    episodes_at_kill: int  # -1: no file yet
    whole_episodes: bool
    resume_kills: int
    identical_after_resume: bool
    reader_polls: int
    reader_errors: int
    first_reader_error: str
    lock_left: bool
    orphans: int  # processes of the killed collect still alive 30 s after the kill

    @property
    def ok(self) -> bool:
        return (
            self.whole_episodes
            and self.identical_after_resume
            and not self.reader_errors
            and not self.lock_left
            and not self.orphans
        )


def command(out: Path, episodes: int, workers: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "carsynth", "collect", "--out", str(out), "--episodes",
        str(episodes), "--workers", str(workers), "--max-steps", "70", "--quiet", *extra,
    ]  # fmt: skip


def contents(path: Path) -> dict[str, bytes]:
    """Every dataset's bytes and every attribute but ``created``, of an HDF5 file."""
    with h5py.File(path, "r") as h5:
        out = {name: h5[name][:].tobytes() for name in h5}
        out.update({f"attr.{k}": str(v) for k, v in h5.attrs.items() if k != "created"})
    return out


def is_prefix(path: Path, reference: Path) -> bool:
    """Whether ``path`` holds whole episodes that are the reference's first ones, exactly."""
    with storage.open_frame_file(path) as got, storage.open_frame_file(reference) as want:
        n = got.num_episodes
        if got.num_steps != int(got.episodes["length"].sum()) or got.trailing_frames:
            return False
        if not np.array_equal(got.episodes, want.episodes[:n]):
            return False
        return np.array_equal(got.read(), want.read(limit=got.num_frames))


class Reader(threading.Thread):
    """Polls the file as ``carsynth info`` does and keeps a FrameDataset reading it."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.polls, self.errors, self.stop = path, 0, [], threading.Event()

    def run(self) -> None:
        dataset = None
        while not self.stop.is_set():
            try:
                with storage.open_frame_file(self.path) as f:
                    f.read(limit=64)
                dataset = dataset or FrameDataset(self.path, cache=False)  # holds the file open
                if len(dataset):
                    dataset[len(dataset) - 1]
                self.polls += 1
            except UsageError as error:
                if "no such file" not in str(error):
                    self.errors.append(str(error))
            except Exception as error:  # a reader crash is a finding, not a reason to stop
                self.errors.append(f"{type(error).__name__}: {error}")
            time.sleep(0.05)


def running(pid: str) -> bool:
    """Whether process ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def wait_for_exit(pids: list[str], timeout: float) -> int:
    """Wait until the processes ``pids`` are gone; how many are left after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        alive = sum(running(pid) for pid in pids)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def killed_run(
    k: int, folder: Path, reference: Path, full_s: float, args: argparse.Namespace, rng
) -> Run:
    out = folder / f"run{k}.h5"
    out.unlink(missing_ok=True)
    kill_after = float(rng.uniform(0.3, full_s))
    reader = Reader(out)
    reader.start()
    process = subprocess.Popen(command(out, args.episodes, args.workers), cwd=ROOT)
    time.sleep(kill_after)
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    process.send_signal(signal.SIGKILL)
    process.wait()
    orphans = wait_for_exit(children, timeout=30.0)
    at_kill, whole = -1, True
    if out.exists():
        try:
            with storage.open_frame_file(out) as f:
                at_kill = f.num_episodes
            whole = is_prefix(out, reference)
        except UsageError:
            whole = False
    resume_kills = 0
    while rng.random() < 0.3 and out.exists():  # kill the resume too, sometimes
        resuming = subprocess.Popen(command(out, args.episodes, args.workers, "--resume"), cwd=ROOT)
        time.sleep(float(rng.uniform(0.3, full_s)))
        resuming.send_signal(signal.SIGKILL)
        resuming.wait()
        resume_kills += 1
    extra = ["--resume"] if out.exists() else []
    finish = subprocess.run(command(out, args.episodes, args.workers, *extra), cwd=ROOT)
    reader.stop.set()
    reader.join()
    identical = finish.returncode == 0 and contents(out) == contents(reference)
    return Run(
        k, round(kill_after, 2), at_kill, whole, resume_kills, identical, reader.polls,
        len(reader.errors), (reader.errors or [""])[0], storage.lock_path(out).exists(), orphans,
    )  # fmt: skip


def battery(args: argparse.Namespace) -> dict:
    """Run the battery; returns the rows and the totals."""
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    reference = folder / "reference.h5"
    start = time.monotonic()
    subprocess.run(command(reference, args.episodes, args.workers, "--overwrite"), cwd=ROOT,
                   check=True)  # fmt: skip
    full_s = time.monotonic() - start
    rng = np.random.default_rng(args.seed)
    runs = [killed_run(k, folder, reference, full_s, args, rng) for k in range(args.runs)]
    totals = {
        "runs": len(runs),
        "passed": sum(r.ok for r in runs),
        "killed_before_the_file_existed": sum(r.episodes_at_kill < 0 for r in runs),
        "killed_with_episodes_stored": sum(r.episodes_at_kill > 0 for r in runs),
        "resumes_killed_too": sum(r.resume_kills for r in runs),
        "files_with_only_whole_episodes": sum(r.whole_episodes for r in runs),
        "identical_after_resume": sum(r.identical_after_resume for r in runs),
        "reader_polls": sum(r.reader_polls for r in runs),
        "reader_errors": sum(r.reader_errors for r in runs),
        "orphan_processes": sum(r.orphans for r in runs),
        "uninterrupted_run_s": round(full_s, 1),
    }
    return {"rows": [dataclasses.asdict(r) | {"ok": r.ok} for r in runs], "totals": totals}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--folder", default="battery", help="where the runs' files go")
    parser.add_argument("--out", help="write the rows and totals as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    result = battery(args)
    columns = list(result["rows"][0]) if result["rows"] else []
    print(" | ".join(columns))
    for row in result["rows"]:
        print(" | ".join(str(row[c]) for c in columns))
    print(json.dumps(result["totals"], indent=2))
    if args.out:
        files.atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    return result


if __name__ == "__main__":
    main()
