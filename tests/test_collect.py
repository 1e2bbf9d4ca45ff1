"""``carsynth collect``: frames, determinism, resume after SIGKILL, shards, policies, bad input."""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest
from conftest import ROOT, run_cli

from carsynth import storage
from carsynth.collect import CollectConfig, collect, make_policy, process_frame
from carsynth.collect.frames import HUD_ROWS, EnvSettings, road_fraction_near_car
from carsynth.data import FrameDataset
from carsynth.errors import UsageError

# Tiny episodes: 70 env steps of which the first 50 (the zoom-in) are not recorded.
TINY = dict(max_steps=70, skip_frames=50, progress=False)


def read_all(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as h5:
        return {name: h5[name][:] for name in ("observations", *storage.STEP_DATASETS, "episodes")}


def assert_same_contents(a, b) -> None:
    da, db = read_all(a), read_all(b)
    for name in da:
        np.testing.assert_array_equal(da[name], db[name], err_msg=name)


def test_frames_actions_and_episode_table(tmp_path):
    path = collect(CollectConfig(out=str(tmp_path / "a.h5"), episodes=2, workers=1, **TINY))
    with storage.open_frame_file(path) as f:
        assert f.version == 2 and f.frames.shape == (42, 64, 64, 3)  # 20 steps + 1 per episode
        assert list(f.episodes["seed"]) == [0, 1] and list(f.episodes["length"]) == [20, 20]
        actions = f.h5["actions"][:]
        assert actions.shape == (40, 3) and actions.dtype == np.float32
        assert np.all(actions[:, 0] >= -1) and np.all(actions[:, 1:] >= 0)
        assert f.h5["truncations"][19] and not f.h5["truncations"][:19].any()  # 70-step limit
        assert f.attrs["policy"] == "pilot" and f.attrs["max_steps"] == 70
        frames = f.read()
    assert frames.std() > 10  # real pictures, not blank frames


def test_frame_skip_repeats_actions(tmp_path):
    config = CollectConfig(out=str(tmp_path / "a.h5"), episodes=1, workers=1, frame_skip=4, **TINY)
    with storage.open_frame_file(collect(config)) as f:
        assert f.num_steps == 5 and f.num_frames == 6  # 20 recorded steps / 4, + final


def test_final_observation_is_what_env_step_returned(tmp_path):
    """Replaying the stored actions from the same seed gives every stored observation, the one
    after the last action included (T + 1 for T actions), processed (HUD crop, resize) alike."""
    config = CollectConfig(
        out=str(tmp_path / "a.h5"), episodes=1, workers=1, max_steps=40, skip_frames=0,
        frame_skip=2, crop_hud=True, progress=False,
    )  # fmt: skip
    with storage.open_frame_file(collect(config)) as f:
        episode = f.episode(0)
    assert len(episode) == 20 and len(episode.observations) == 21
    env = config.env_settings.make()
    observation, _ = env.reset(seed=0)
    replayed = [process_frame(observation, 64, crop_hud=True)]
    for action in episode.actions:
        for _ in range(2):
            observation, _, terminated, truncated, _ = env.step(action)
        replayed.append(process_frame(observation, 64, crop_hud=True))
    assert truncated and episode.truncations[-1] and not episode.truncations[:-1].any()
    np.testing.assert_array_equal(np.array(replayed), episode.observations)


def test_worker_count_does_not_change_the_file(tmp_path):
    one = collect(CollectConfig(out=str(tmp_path / "1.h5"), episodes=3, workers=1, **TINY))
    two = collect(CollectConfig(out=str(tmp_path / "2.h5"), episodes=3, workers=2, **TINY))
    assert_same_contents(one, two)


def test_shards_merge_into_the_unsharded_file(tmp_path):
    whole = collect(CollectConfig(out=str(tmp_path / "w.h5"), episodes=3, workers=1, **TINY))
    parts = [
        collect(
            CollectConfig(
                out=str(tmp_path / f"s{i}.h5"), episodes=3, workers=1, shard=(i, 2), **TINY
            )
        )  # fmt: skip
        for i in range(2)
    ]
    assert run_cli("merge", *map(str, parts), "--out", str(tmp_path / "m.h5")).returncode == 0
    assert_same_contents(whole, tmp_path / "m.h5")


def test_resume_after_sigkill_gives_the_uninterrupted_file(tmp_path):
    args = ["collect", "--episodes", "6", "--workers", "1", "--max-steps", "90", "--no-progress"]
    killed = tmp_path / "killed.h5"
    process = subprocess.Popen(
        [sys.executable, "-m", "carsynth", *args, "--out", str(killed)], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    stored = 0
    while stored < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            with storage.open_frame_file(killed) as f:
                stored = f.num_episodes
        except Exception:
            stored = 0
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert 2 <= stored < 6, "the run should be killed part-way"
    with storage.open_frame_file(killed) as f:  # whole episodes only
        kept = f.num_episodes
        assert 2 <= kept < 6
        assert f.num_frames == 41 * kept
    result = run_cli(*args, "--out", str(killed), "--resume")
    assert result.returncode == 0, result.stderr
    full = run_cli(*args, "--out", str(tmp_path / "full.h5"))
    assert full.returncode == 0, full.stderr
    assert_same_contents(killed, tmp_path / "full.h5")


def test_pilot_keeps_the_car_on_the_road():
    env = EnvSettings(max_steps=400).make()
    policy = make_policy("pilot")
    observation, _ = env.reset(seed=5)
    policy.reset(env, np.random.default_rng(5))
    frames = []
    for _ in range(400):
        observation, _, terminated, truncated, _ = env.step(policy.act(env, observation))
        frames.append(observation)
        if terminated or truncated:
            break
    on_road = road_fraction_near_car(np.array(frames[50:])) > 0.5
    assert on_road.mean() > 0.85
    # ... and drives along it: a random policy barely leaves the start (9 tiles on this seed).
    assert env.unwrapped.tile_visited_count > 50


def test_process_frame_crops_the_hud_and_antialiases():
    observation = np.full((96, 96, 3), 100, dtype=np.uint8)
    observation[-HUD_ROWS:] = 0  # a black dashboard
    cropped = process_frame(observation, 64, crop_hud=True)
    kept = process_frame(observation, 64, crop_hud=False)
    assert cropped.shape == kept.shape == (64, 64, 3) and cropped.dtype == np.uint8
    assert cropped.min() == 100 and kept[-1].max() == 0
    checker = (np.indices((96, 96)).sum(axis=0) % 2 * 255).astype(np.uint8)
    checker = np.repeat(checker[..., None], 3, axis=2)
    small = process_frame(checker, 64, crop_hud=False).astype(float)
    # An anti-aliased resize averages the 1-pixel checkerboard to grey; point sampling would not.
    assert abs(small[2:-2, 2:-2].mean() - 127.5) < 3 and small[2:-2, 2:-2].std() < 20


def test_user_policy_from_module(tmp_path, monkeypatch):
    (tmp_path / "mypolicy.py").write_text(
        "import numpy as np\ndef straight(observation):\n    return np.array([0.0, 0.5, 0.0])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = collect(
        CollectConfig(
            out=str(tmp_path / "u.h5"), episodes=1, workers=1, policy="mypolicy:straight", **TINY
        )  # fmt: skip
    )
    with storage.open_frame_file(path) as f:
        np.testing.assert_array_equal(f.h5["actions"][:], np.tile([0.0, 0.5, 0.0], (20, 1)))


def test_info_prints_counts_and_writes_a_grid(tmp_path, fixture_file):
    result = run_cli("info", str(fixture_file), "--grid", str(tmp_path / "g.png"))
    assert result.returncode == 0, result.stderr
    assert "1600 x 64x64x3 uint8" in result.stdout and "8 (1 holdout)" in result.stdout
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_info_shortens_long_attributes_and_json_keeps_them(tmp_path, fixture_file):
    path = tmp_path / "copy.h5"
    shutil.copy(fixture_file, path)
    document = json.dumps({"report": "x" * 2000})
    with h5py.File(path, "a") as f:
        f.attrs["validation"] = document
    text = run_cli("info", str(path))
    assert text.returncode == 0, text.stderr
    (line,) = [line for line in text.stdout.splitlines() if line.startswith("attr.validation")]
    assert len(line) < 140 and line.endswith("...")
    assert text.stdout.splitlines()[-1] == "(long attributes shortened; --json prints them whole)"
    whole = json.loads(run_cli("info", str(path), "--json").stdout)
    assert whole["attr.validation"] == document


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--policy", "nope"], "--policy nope: unknown policy"),
        (["--policy-arg", "speed=3"], "--policy-arg speed: pilot has no such parameter"),
        (["--shard", "2/2"], "--shard 2/2: need 0 <= I < N"),
        (["--shard", "x"], "--shard x: expected I/N"),
        (["--episodes", "0"], "--episodes must be at least 1"),
    ],
)
def test_bad_flags_exit_2_and_write_nothing(tmp_path, flags, message):
    out = tmp_path / "out.h5"
    result = run_cli("collect", "--out", str(out), *flags)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"carsynth: error: {message}")
    assert not out.exists()


def test_unwritable_and_existing_outputs(tmp_path, fixture_file):
    result = run_cli("collect", "--out", str(tmp_path / "no" / "dir" / "a.h5"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    before = fixture_file.stat().st_mtime_ns
    result = run_cli("collect", "--out", str(fixture_file))
    assert result.returncode == 2 and "exists; pass --overwrite" in result.stderr
    assert fixture_file.stat().st_mtime_ns == before


def test_resume_refuses_foreign_or_different_files(tmp_path, fixture_file):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as h5:
        h5["x"] = 1
    result = run_cli("collect", "--out", str(foreign), "--resume")
    assert result.returncode == 2 and "not a carsynth frame file" in result.stderr
    copy = tmp_path / "copy.h5"
    copy.write_bytes(fixture_file.read_bytes())
    result = run_cli("collect", "--out", str(copy), "--resume", "--size", "32", "--episodes", "8",
                     "--max-steps", "250")  # fmt: skip
    assert result.returncode == 2
    assert (
        "was collected with frame_size=[64, 64], this run has frame_size=[32, 32]" in result.stderr
    )
    assert copy.read_bytes() == fixture_file.read_bytes()


def _cli_loads_torch(argv: list[str]) -> tuple[str, bool]:
    """Run ``carsynth ARGV`` in a fresh interpreter: its exit code and whether torch was loaded."""
    code = (
        "import sys; from carsynth import cli\n"
        f"try:\n    code = cli.main({argv!r})\nexcept SystemExit as e:\n    code = e.code\n"
        "print(code, 'torch' in sys.modules, file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    code, loaded = result.stderr.split()[-2:]
    return code, loaded == "True"


def test_collect_command_does_not_load_torch(tmp_path):
    # Building every command's flags imported carsynth.train (torch): 0.8 GiB in the collector's
    # main process. Only the chosen command's flags are built now.
    assert _cli_loads_torch(["collect", "--out", str(tmp_path / "a.h5"), "--episodes", "0"]) == (
        "2",
        False,
    )


def test_readers_and_a_second_writer_never_disturb_a_collect(tmp_path):
    """A polling reader, a dataset holding the file open and a second collect, during a collect.

    Before one writer held the file open in SWMR mode, a reader holding the file made the
    collector crash (BlockingIOError: unable to lock file), and a second collect interleaved its
    episodes with the first one's.
    """
    path = tmp_path / "a.h5"
    args = ["collect", "--out", str(path), "--episodes", "8", "--workers", "1",
            "--max-steps", "90", "--no-progress"]  # fmt: skip
    writer = subprocess.Popen(
        [sys.executable, "-m", "carsynth", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    reads, dataset, second = 0, None, []
    while writer.poll() is None:
        try:
            with storage.open_frame_file(path) as f:  # what `carsynth info` does
                f.read(limit=64)
                reads += 1
        except UsageError as error:
            assert "no such file" in str(error)
        if reads and dataset is None:
            dataset = FrameDataset(path, cache=False)  # keeps the file open from here on
        if dataset is not None and len(dataset):
            assert dataset[len(dataset) - 1].shape == (3, 64, 64)
        if reads == 2 and not second:
            second = [
                subprocess.Popen(
                    [sys.executable, "-m", "carsynth", *args, flag],
                    cwd=ROOT,
                    stderr=subprocess.PIPE,
                    text=True,
                )  # fmt: skip
                for flag in ("--overwrite", "--resume")
            ]
        time.sleep(0.05)
    assert writer.returncode == 0, writer.stderr.read()
    assert reads >= 3 and second, "the readers should have run during the collect"
    for process in second:
        assert process.wait() == 2
        (line,) = process.stderr.read().splitlines()
        assert f"a.h5 is being written by pid {writer.pid} on " in line
    assert not (tmp_path / "a.h5.lock").exists()
    full = collect(CollectConfig(out=str(tmp_path / "full.h5"), episodes=8, workers=1,
                                 max_steps=90, progress=False))  # fmt: skip
    assert_same_contents(path, full)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_and_prints_the_resume_command(tmp_path, signum):
    out = tmp_path / "a.h5"
    args = ["collect", "--out", str(out), "--episodes", "6", "--workers", "2", "--max-steps",
            "90", "--no-progress", "--overwrite"]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "carsynth", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    stored, deadline = 0, time.monotonic() + 120
    while stored < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            with storage.open_frame_file(out) as f:
                stored = f.num_episodes
        except UsageError:
            pass
    process.send_signal(signum)
    assert process.wait(timeout=60) == 130
    (line,) = process.stderr.read().splitlines()
    command = line.partition("continue with: ")[2]
    assert command == shlex.join(["carsynth", *args[:-1], "--resume"])
    with storage.open_frame_file(out) as f:  # whole episodes only, the file closed cleanly
        assert 2 <= f.num_episodes < 6 and f.num_frames == 41 * f.num_episodes
    h5py.File(out, "r").close()
    assert run_cli(*shlex.split(command)[1:]).returncode == 0
    full = collect(CollectConfig(out=str(tmp_path / "full.h5"), episodes=6, workers=1,
                                 max_steps=90, progress=False))  # fmt: skip
    assert_same_contents(out, full)


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_do_not_import_torch(flag):
    assert _cli_loads_torch([flag]) == ("0", False)


def test_a_full_disk_is_one_line_and_keeps_the_finished_episodes(tmp_path):
    """A collect that fills its disk: one line, whole episodes kept, resumable once there is room.

    As root, the disk is a real 2 MiB tmpfs (ENOSPC), nearly filled by a ballast file that is
    deleted to make room; elsewhere, the process's file size limit (ulimit -f, EFBIG) plays the
    full disk and is lifted to make room. Before, a full disk crashed the collector (a 42-line
    traceback and a segfault, exit 139), and resuming while full gave a 53-line traceback.
    """
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)]
    ).returncode == 0  # fmt: skip
    limit = None
    if mounted:
        (disk / "ballast").write_bytes(b"\0" * 1_650_000)
    else:
        limit = 350_000

    def full_disk() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = disk / "a.h5"
    args = ["collect", "--out", str(out), "--episodes", "30", "--workers", "2",
            "--max-steps", "60", "--no-progress"]  # fmt: skip
    try:
        for extra in ([], ["--resume"]):  # the run, then a resume while the disk is still full
            result = subprocess.run(
                [sys.executable, "-m", "carsynth", *args, *extra], cwd=ROOT, capture_output=True,
                text=True, preexec_fn=full_disk,
            )  # fmt: skip
            assert result.returncode == 2, result.stderr
            (line,) = result.stderr.splitlines()
            assert line.startswith(f"carsynth: error: {out}: ")
            assert ("no space left" if mounted else "file too large") in line or "MiB free" in line
            with storage.open_frame_file(out) as f:
                kept = f.num_episodes
                assert 5 <= kept < 30 and f.num_frames == 11 * kept
                assert len(f.read()) == 11 * kept
        if mounted:
            (disk / "ballast").unlink()
        limit = None
        result = run_cli(*args, "--resume")
        assert result.returncode == 0, result.stderr
        full = collect(CollectConfig(out=str(tmp_path / "full.h5"), episodes=30, workers=1,
                                     max_steps=60, progress=False))  # fmt: skip
        assert_same_contents(out, full)
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)])


def test_resume_accepts_other_spellings_of_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    spellings = ["a/x.h5", str(tmp_path / "a" / ".." / "a" / "x.h5"), str(tmp_path / "a/x.h5")]
    for episodes, out in enumerate(spellings, start=2):
        config = CollectConfig(out=out, episodes=episodes, workers=1, resume=episodes > 2, **TINY)
        collect(config)
    full = collect(CollectConfig(out=str(tmp_path / "full.h5"), episodes=4, workers=1, **TINY))
    assert_same_contents(tmp_path / "a" / "x.h5", full)


def test_a_huge_episode_count_starts_at_once_and_stops_on_ctrl_c(tmp_path):
    # Building the whole job list first ended in MemoryError for --episodes 100000000.
    out = tmp_path / "a.h5"
    process = subprocess.Popen(
        [sys.executable, "-m", "carsynth", "collect", "--out", str(out), "--episodes",
         "100000000", "--workers", "2", "--max-steps", "60", "--no-progress"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stored, deadline = 0, time.monotonic() + 120
    while stored < 1 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
        try:
            with storage.open_frame_file(out) as f:
                stored = f.num_episodes
        except UsageError:
            pass
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    assert "continue with: carsynth collect" in process.stderr.read()
    with storage.open_frame_file(out) as f:
        assert f.num_episodes >= 1 and f.attrs["episodes_requested"] == 100_000_000


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_taken_by_another_thread_waits_for_the_whole_episode(signum) -> None:
    # The worker pool gives the process other threads, and the kernel may hand a Ctrl-C or a
    # SIGTERM to any of them; Python still raises in the main thread at once. Blocking the
    # signals in the main thread let that land between the frames and the episode's table
    # row: a killed collection left a file that no longer opened.
    from carsynth.cli import _interrupt
    from carsynth.collect.workers import _append_uninterrupted

    go = threading.Event()

    def send() -> None:  # a thread that was there before the append, signals unblocked
        go.wait()
        signal.pthread_kill(threading.get_ident(), signum)

    sender = threading.Thread(target=send)
    sender.start()

    class Writer:
        finished = False

        def append_episode(self, episode) -> None:
            go.set()
            sender.join()
            for _ in range(100):  # bytecode on which a pending handler would run
                time.sleep(0.001)
            self.finished = True

    writer = Writer()
    before = signal.signal(signal.SIGTERM, _interrupt)  # as the CLI sets it
    try:
        with pytest.raises(KeyboardInterrupt):
            _append_uninterrupted(writer, None)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert writer.finished  # the episode was written whole, then the stop came
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
