"""The HDF5 schema (v2 written, v1 read): layout, crash safety, splits, merge, bad files."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import ROOT

from carsynth import storage
from carsynth.errors import UsageError


def make_episode(
    seed: int, length: int, size: int = 8, holdout: bool = False, final: bool = True
) -> storage.Episode:
    """An episode of ``length`` steps: ``length + 1`` observations (``length`` without ``final``,
    as version 1 stored them)."""
    rng = np.random.default_rng(seed)
    return storage.Episode(
        seed=seed,
        observations=rng.integers(0, 256, (length + final, size, size, 3), dtype=np.uint8),
        actions=rng.normal(size=(length, 3)).astype(np.float32),
        rewards=rng.normal(size=length).astype(np.float32),
        terminations=np.arange(length) == length - 1,
        truncations=np.zeros(length, dtype=bool),
        holdout=holdout,
    )


def new_file(path, size: int = 8, version: int = storage.SCHEMA_VERSION, **attrs) -> None:
    storage.create_frame_file(
        path, kind="real", frame_size=(size, size), action_dim=3, attrs=attrs,
        schema_version=version,
    )  # fmt: skip


def test_fixture_follows_schema(fixture_file):
    with h5py.File(fixture_file, "r") as h5:
        assert h5.attrs["schema_version"] == 1
        assert h5.attrs["kind"] == "real"
        assert h5.attrs["env_id"] == "CarRacing-v3"
        for key in ("gymnasium_version", "policy", "policy_params", "frame_size", "crop_hud",
                    "skip_frames", "seed", "carsynth_version", "created"):  # fmt: skip
            assert key in h5.attrs
        n = h5["frames"].shape[0]
        assert h5["frames"].dtype == np.uint8 and h5["frames"].shape[1:] == (64, 64, 3)
        assert h5["frames"].chunks[0] == storage.FRAME_CHUNK and h5["frames"].compression
        assert h5["actions"].shape == (n, 3) and h5["actions"].dtype == np.float32
        assert h5["rewards"].shape == (n,) and h5["terminated"].dtype == bool
        table = h5["episodes"][:]
        assert table["length"].sum() == n
        assert list(table["seed"]) == list(range(8))
        np.testing.assert_allclose(
            table["return"], [h5["rewards"][s : s + n].sum() for s, n in zip(table["start"],
            table["length"], strict=True)], rtol=1e-5,
        )  # fmt: skip


def test_roundtrip_and_splits(tmp_path):
    path = tmp_path / "a.h5"
    new_file(path, policy="test")
    episodes = [make_episode(0, 5), make_episode(1, 7, holdout=True), make_episode(2, 0)]
    assert storage.append_episodes(path, episodes[:2]) == 14  # 6 + 8 observations
    storage.append_episodes(path, episodes[2:])
    with h5py.File(path, "r") as h5:  # the layout a user reads without carsynth
        assert h5.attrs["schema_version"] == 2
        assert sorted(h5) == ["actions", "episodes", "observations", "rewards", "terminations",
                              "truncations"]  # fmt: skip
        assert h5["observations"].shape == (15, 8, 8, 3) and h5["actions"].shape == (12, 3)
        table = h5["episodes"][:]
        assert list(table["start"]) == [0, 6, 14] and list(table["step_start"]) == [0, 5, 12]
        assert list(table["length"]) == [5, 7, 0]
        np.testing.assert_array_equal(h5["observations"][6:14], episodes[1].observations)
        np.testing.assert_array_equal(h5["terminations"][5:12], episodes[1].terminations)
    with storage.open_frame_file(path) as f:
        assert f.num_frames == 15 and f.num_steps == 12 and f.num_episodes == 3
        assert f.final_observations and f.attrs["policy"] == "test"
        np.testing.assert_array_equal(f.read("holdout"), episodes[1].observations)
        np.testing.assert_array_equal(f.read("all", limit=7)[6], episodes[1].observations[0])
        assert f.count("train") == 7 and f.frame_ranges("holdout") == [(6, 14)]
        back = list(storage.iter_episodes(f))
    for wrote, read in zip(episodes, back, strict=True):
        for name in ("observations", "actions", "rewards", "terminations", "truncations"):
            np.testing.assert_array_equal(getattr(read, name), getattr(wrote, name))
        assert (read.seed, read.holdout) == (wrote.seed, wrote.holdout)


def test_the_one_split_gives_whole_v2_episodes_with_their_final_observation(tmp_path):
    # Training, rundir.run_frames, validation's real_splits and carsynth.data all read frames
    # through split_ranges / episode_mask: in a version-2 file an episode's frames are its
    # T + 1 observations (before the merge, split_ranges cut each v2 episode's final one).
    from carsynth.validation import real_splits

    path = tmp_path / "a.h5"
    new_file(path)
    episodes = [make_episode(0, 5), make_episode(1, 7, holdout=True), make_episode(2, 3)]
    storage.append_episodes(path, episodes)
    with storage.open_frame_file(path) as f:
        assert f.split_ranges() == {"train": [(0, 6), (14, 18)], "holdout": [(6, 14)]}
        assert f.split_ranges(holdout_seeds=[2]) == {"train": [(0, 6), (6, 14)],
                                                     "holdout": [(14, 18)]}  # fmt: skip
        assert list(f.episode_mask("holdout", holdout_seeds=[2])) == [False, False, True]
        assert f.frame_ranges("train") == f.split_ranges()["train"]
        train, _, holdout, _ = real_splits(f)
    np.testing.assert_array_equal(holdout, episodes[1].observations)
    np.testing.assert_array_equal(
        train, np.concatenate([episodes[0].observations, episodes[2].observations])
    )


def test_a_v2_file_needs_the_final_observation(tmp_path):
    path = tmp_path / "a.h5"
    new_file(path)
    with pytest.raises(
        UsageError, match="a.h5: a schema-2 file stores 4 observations for 3 actions"
    ):
        storage.append_episodes(path, [make_episode(0, 3, final=False)])


def test_version_1_files_are_still_read_and_merged(tmp_path, fixture_file):
    with storage.open_frame_file(fixture_file) as f:  # the shipped fixture is version 1
        assert f.version == 1 and not f.final_observations
        assert f.num_frames == f.num_steps == 1600 and f.frame_ranges("holdout") == [(600, 800)]
        episode = f.episode(3)
        assert len(episode) == 200 and len(episode.observations) == 200  # no final observation
        np.testing.assert_array_equal(episode.actions, f.h5["actions"][600:800])
        np.testing.assert_array_equal(episode.terminations, f.h5["terminated"][600:800])
        assert list(f.episodes["step_start"]) == list(f.episodes["start"])
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    new_file(a, version=1, shard="0/2")
    new_file(b, version=1, shard="1/2")
    storage.append_episodes(a, [make_episode(0, 3, final=False)])
    storage.append_episodes(b, [make_episode(1, 4)])  # a v1 file keeps T of the T + 1
    merged = storage.merge([a, b], tmp_path / "m.h5")
    with h5py.File(merged, "r") as h5:
        assert h5.attrs["schema_version"] == 1 and "frames" in h5 and "terminated" in h5
        assert h5["episodes"].dtype == storage.EPISODE_DTYPE_V1
    with storage.open_frame_file(merged) as f:
        np.testing.assert_array_equal(
            f.episode(1).observations, make_episode(1, 4, final=False).observations
        )
    v2 = tmp_path / "v2.h5"
    new_file(v2, shard="1/2")
    storage.append_episodes(v2, [make_episode(1, 4)])
    with pytest.raises(UsageError, match="settings differ.*schema_version"):
        storage.merge([a, v2], tmp_path / "mixed.h5")


def test_create_never_overwrites(tmp_path):
    path = tmp_path / "a.h5"
    new_file(path)
    storage.append_episodes(path, [make_episode(0, 3)])
    with pytest.raises(UsageError, match="exists; pass --overwrite"):
        new_file(path)
    with storage.open_frame_file(path) as f:
        assert f.num_frames == 4
    assert [p.name for p in tmp_path.iterdir()] == ["a.h5"]  # no temp file left behind


def test_holdout_depends_on_seed_only():
    chosen = [s for s in range(2000) if storage.is_holdout(s, 0.1)]
    assert 150 < len(chosen) < 250  # binomial(2000, 0.1): mean 200, sd 13
    assert chosen == [s for s in range(2000) if storage.is_holdout(s, 0.1)]
    assert not any(storage.is_holdout(s, 0.0) for s in range(100))


def test_trailing_frames_are_ignored_and_repaired(tmp_path):
    path = tmp_path / "a.h5"
    new_file(path)
    storage.append_episodes(path, [make_episode(0, 4)])
    with h5py.File(path, "a") as h5:  # an episode whose table row never landed
        for name in ("observations", *storage.STEP_DATASETS):
            h5[name].resize(9, axis=0)
    with storage.open_frame_file(path) as f:
        assert f.num_frames == 5 and f.trailing_frames == 4
    assert storage.repair(path) == 4
    with h5py.File(path, "r") as h5:
        assert h5["observations"].shape[0] == 5 and h5["rewards"].shape[0] == 4


KILL_MID_APPEND = """
import os, signal, sys, h5py, numpy as np
f = h5py.File(sys.argv[1], "a", libver="latest")
f.swmr_mode = True
f["observations"].resize(4, axis=0)
f["observations"][:] = 7
f["observations"].flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_inside_an_append_leaves_a_readable_file(tmp_path):
    path = tmp_path / "a.h5"
    new_file(path)
    storage.append_episodes(path, [make_episode(0, 2)])
    result = subprocess.run([sys.executable, "-c", KILL_MID_APPEND, str(path)])
    assert result.returncode == -signal.SIGKILL
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "r")
    with storage.open_frame_file(path) as f:  # carsynth reads it (SWMR read mode)
        assert f.num_frames == 3 and f.trailing_frames == 1
    assert storage.repair(path) == 1
    with h5py.File(path, "r") as h5:  # and afterwards plain h5py does too
        assert h5["observations"].shape[0] == 3


@pytest.mark.parametrize("virtual", [False, True])
def test_merge_joins_shards_in_seed_order(tmp_path, virtual):
    a, b, out = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "sub" / "m.h5"
    out.parent.mkdir()
    new_file(a, shard="0/2")
    new_file(b, shard="1/2")
    storage.append_episodes(a, [make_episode(0, 3), make_episode(1, 4)])
    storage.append_episodes(b, [make_episode(2, 5, holdout=True)])
    storage.merge([b, a], out, virtual=virtual)  # order of the inputs does not matter
    with storage.open_frame_file(out) as f:
        assert list(f.episodes["seed"]) == [0, 1, 2]
        np.testing.assert_array_equal(f.read("holdout"), make_episode(2, 5).observations)
        np.testing.assert_array_equal(f.h5["actions"][3:7], make_episode(1, 4).actions)
        np.testing.assert_array_equal(f.episode(1).observations, make_episode(1, 4).observations)
        assert list(f.episodes["start"]) == [0, 4, 9] and list(f.episodes["step_start"]) == [
            0,
            3,
            7,
        ]
        assert f.attrs["merged_from"]
        assert f.h5["observations"].is_virtual == f.h5["rewards"].is_virtual == virtual


def test_merge_refuses_different_settings(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    new_file(a, skip_frames=50)
    new_file(b, skip_frames=10)
    storage.append_episodes(a, [make_episode(0, 3)])
    storage.append_episodes(b, [make_episode(1, 3)])
    with pytest.raises(UsageError, match="settings differ.*skip_frames"):
        storage.merge([a, b], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()


def test_bad_files_name_the_file(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(UsageError, match="notes.h5: not an HDF5 file"):
        storage.open_frame_file(text)
    with pytest.raises(UsageError, match="missing.h5: no such file"):
        storage.open_frame_file(tmp_path / "missing.h5")
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as h5:
        h5["frames"] = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(UsageError, match="plain.h5: not a carsynth frame file"):
        storage.open_frame_file(plain)
    wrong = tmp_path / "wrong.h5"
    new_file(wrong)
    with h5py.File(wrong, "a") as h5:
        del h5["observations"]
        h5["observations"] = np.zeros((2, 8, 8, 3), np.float32)
    with pytest.raises(UsageError, match=r"'observations' must be uint8 \(N, H, W, 3\)"):
        storage.open_frame_file(wrong)


def test_truncated_file_is_refused(tmp_path, fixture_file):
    path = tmp_path / "cut.h5"
    shutil.copy(fixture_file, path)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    with pytest.raises(UsageError, match="cut.h5"), storage.open_frame_file(path) as f:
        f.read()


def test_one_writer_per_file(tmp_path):
    path = tmp_path / "a.h5"
    new_file(path)
    with storage.writer_lock(path) as lock:
        assert lock == tmp_path / "a.h5.lock"
        # another spelling of the same file is the same file
        spelled = tmp_path / ".." / tmp_path.name / "a.h5"
        mine = rf"a.h5 is being written by pid {os.getpid()} on "
        with pytest.raises(UsageError, match=mine), storage.writer_lock(spelled):
            pass
        new_file(tmp_path / "b.h5")
        storage.append_episodes(tmp_path / "b.h5", [make_episode(0, 3)])
        merged = tmp_path / "m.h5"
        with storage.writer_lock(merged), pytest.raises(UsageError, match="m.h5 is being written"):
            storage.merge([tmp_path / "b.h5"], merged)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "b.h5"]  # locks removed


def test_a_killed_writers_lock_does_not_block(tmp_path):
    path = tmp_path / "a.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from carsynth import storage\n"
         "with storage.writer_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)",
         str(path)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert holder.stdout.readline() == "locked\n"
    held = rf"being written by pid {holder.pid} .*since"
    with pytest.raises(UsageError, match=held), storage.writer_lock(path):
        pass
    holder.kill()
    holder.wait()
    assert (tmp_path / "a.h5.lock").exists()  # left behind by the killed holder ...
    with storage.writer_lock(path):  # ... but the kernel released its lock
        pass


def test_a_reader_holding_the_file_never_blocks_its_writer(tmp_path):
    # carsynth's readers hold no HDF5 file lock: a FrameDataset open for a whole training run
    # let no --resume open the file ("unable to lock file"; found by the SIGKILL battery).
    path = tmp_path / "a.h5"
    new_file(path)
    storage.append_episodes(path, [make_episode(0, 3)])
    append = (
        "import sys, numpy as np; from carsynth import storage\n"
        "episode = storage.Episode(1, np.ones((5, 8, 8, 3), np.uint8), np.zeros((4, 3)),"
        " np.zeros(4), np.zeros(4, bool), np.zeros(4, bool))\n"
        "storage.append_episodes(sys.argv[1], [episode])"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with storage.open_frame_file(path) as reader:
        writer = subprocess.run([sys.executable, "-c", append, str(path)], env=env,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert writer.returncode == 0, writer.stderr
        np.testing.assert_array_equal(reader.read(), make_episode(0, 3).observations)
    with storage.open_frame_file(path) as f:
        assert list(f.episodes["seed"]) == [0, 1]


def test_readers_wait_out_a_writer_switching_to_swmr(tmp_path):
    # Between opening a file and turning SWMR on, a writer's file refused SWMR readers ("file is
    # not already open for SWMR writing"): 869 failed opens of 1,538 in 8 s of reopening.
    path = tmp_path / "a.h5"
    new_file(path)
    reopen = (
        "import sys, time; from carsynth import storage\n"
        "end = time.monotonic() + 3\n"
        "while time.monotonic() < end:\n"
        "    storage.FrameWriter.open(sys.argv[1]).close()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", reopen, str(path)], env=env)
    opened = 0
    while writer.poll() is None:
        with storage.open_frame_file(path) as f:
            opened += f.num_frames == 0
    assert writer.returncode == 0 and opened > 10


def test_readers_during_appends_see_whole_episodes(tmp_path):
    # FrameFile once opened 'frames' before reading the episode table; under a writer appending
    # meanwhile, the table could list an episode that its older view of 'frames' did not have:
    # "'frames' is shorter than the episode table (truncated file?)".
    path = tmp_path / "a.h5"
    new_file(path)
    append = (
        "import sys, time, numpy as np; from carsynth import storage\n"
        "end = time.monotonic() + 3\n"
        "with storage.FrameWriter.open(sys.argv[1]) as writer:\n"
        "    while time.monotonic() < end:\n"
        "        n = 5\n"
        "        writer.append_episode(storage.Episode(writer.num_episodes,"
        " np.ones((n + 1, 8, 8, 3), np.uint8), np.zeros((n, 3)), np.zeros(n), np.zeros(n, bool),"
        " np.zeros(n, bool)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", append, str(path)], env=env)
    seen = []
    while writer.poll() is None:
        with storage.open_frame_file(path) as f:
            assert f.num_frames == 6 * f.num_episodes  # schema 2: T + 1 observations
            seen.append(f.num_episodes)
    assert writer.returncode == 0 and len(set(seen)) > 10
