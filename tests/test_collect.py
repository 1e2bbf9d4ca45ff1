"""``carsynth collect``: frames, determinism, resume after SIGKILL, shards, policies, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import ROOT, run_cli

from carsynth import storage
from carsynth.collect import CollectConfig, collect, make_policy, process_frame
from carsynth.collect.frames import HUD_ROWS, EnvSettings, road_fraction_near_car

# Tiny episodes: 70 env steps of which the first 50 (the zoom-in) are not recorded.
TINY = dict(max_steps=70, skip_frames=50, progress=False)


def read_all(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as h5:
        return {name: h5[name][:] for name in ("frames", "actions", "rewards", "episodes")}


def assert_same_contents(a, b) -> None:
    da, db = read_all(a), read_all(b)
    for name in da:
        np.testing.assert_array_equal(da[name], db[name], err_msg=name)


def test_frames_actions_and_episode_table(tmp_path):
    path = collect(CollectConfig(out=str(tmp_path / "a.h5"), episodes=2, workers=1, **TINY))
    with storage.open_frame_file(path) as f:
        assert f.frames.shape == (40, 64, 64, 3)
        assert list(f.episodes["seed"]) == [0, 1] and list(f.episodes["length"]) == [20, 20]
        actions = f.h5["actions"][:]
        assert actions.shape == (40, 3) and actions.dtype == np.float32
        assert np.all(actions[:, 0] >= -1) and np.all(actions[:, 1:] >= 0)
        assert f.h5["truncated"][19] and not f.h5["truncated"][:19].any()  # 70-step limit
        assert f.attrs["policy"] == "pilot" and f.attrs["max_steps"] == 70
        frames = f.read()
    assert frames.std() > 10  # real pictures, not blank frames


def test_frame_skip_repeats_actions(tmp_path):
    config = CollectConfig(out=str(tmp_path / "a.h5"), episodes=1, workers=1, frame_skip=4, **TINY)
    with storage.open_frame_file(collect(config)) as f:
        assert f.num_frames == 5  # 20 recorded steps / 4


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
        assert f.num_frames == 40 * kept
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


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_do_not_import_torch(flag):
    assert _cli_loads_torch([flag]) == ("0", False)
