"""``carsynth convert --to minari``: the round trip equals the file; the env recovers alike."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import run_cli

from carsynth import storage
from carsynth.collect import CollectConfig, collect
from carsynth.convert import to_minari
from carsynth.errors import UsageError

minari = pytest.importorskip("minari")

# No zoom-in skip, so the recovered env's reset gives the first recorded observation too.
SETTINGS = dict(max_steps=40, skip_frames=0, frame_skip=2, crop_hud=True, progress=False)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A schema-2 file of 2 episodes (20 steps each: 40 env steps, actions repeated twice)."""
    path = tmp_path_factory.mktemp("convert") / "real.h5"
    return collect(CollectConfig(out=str(path), episodes=2, workers=1, **SETTINGS))


@pytest.fixture(autouse=True)
def datasets(tmp_path, monkeypatch):
    """Minari writes under MINARI_DATASETS_PATH: a fresh folder per test."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    return tmp_path / "minari"


def test_round_trip_equals_the_file(real):
    to_minari(real, "carsynth/tiny-v0")
    dataset = minari.load_dataset("carsynth/tiny-v0")  # loaded the way a Minari user loads it
    with storage.open_frame_file(real) as f:
        episodes = list(storage.iter_episodes(f))
        assert dataset.total_episodes == 2 and dataset.total_steps == f.num_steps == 40
    for ours, theirs in zip(episodes, dataset.iterate_episodes(), strict=True):
        assert (
            theirs.observations.shape == (21, 64, 64, 3) and theirs.observations.dtype == np.uint8
        )
        np.testing.assert_array_equal(theirs.observations, ours.observations)  # lossless
        np.testing.assert_array_equal(theirs.actions, ours.actions)  # action for action
        np.testing.assert_array_equal(theirs.rewards, ours.rewards)
        np.testing.assert_array_equal(theirs.terminations, ours.terminations)
        np.testing.assert_array_equal(theirs.truncations, ours.truncations)


def test_recovered_env_gives_the_recorded_observations(real):
    dataset = to_minari(real, "tiny-v0")
    env = minari.load_dataset("tiny-v0").recover_environment()
    assert env.observation_space.shape == (64, 64, 3) and env.spec.max_episode_steps == 40
    wrapper = env.spec.additional_wrappers[0]
    assert wrapper.entry_point == "carsynth.collect.frames:RecordedFrames"
    assert wrapper.kwargs == {"size": 64, "crop_hud": True, "skip_frames": 0, "frame_skip": 2}
    episode = next(dataset.iterate_episodes())
    observation, _ = env.reset(seed=int(episode.id) + 0)  # episode 0 was collected with seed 0
    replayed = [observation]
    for action in episode.actions:
        observation, _, terminated, truncated, _ = env.step(action)
        replayed.append(observation)
    assert truncated and not terminated
    np.testing.assert_array_equal(np.array(replayed), episode.observations)


def test_version_1_file_loses_the_last_step_with_a_warning(fixture_file):
    with pytest.warns(UserWarning, match="schema version 1 stores no final observation"):
        dataset = to_minari(fixture_file, "small-v0", split="holdout")
    episode = next(dataset.iterate_episodes())
    with storage.open_frame_file(fixture_file) as f:  # the holdout episode: frames 600..799
        actions, frames = f.h5["actions"][600:800], f.h5["frames"][600:800]
    assert dataset.total_episodes == 1 and len(episode.actions) == 199
    np.testing.assert_array_equal(episode.actions, actions[:-1])
    np.testing.assert_array_equal(episode.observations, frames)


def test_cli_and_bad_input(real, tmp_path, datasets):
    result = run_cli("convert", "--to", "minari", str(real), "--dataset-id", "pilot-v0")
    assert result.returncode == 0, result.stderr
    assert "wrote Minari dataset pilot-v0: 2 episodes, 40 steps" in result.stdout
    again = run_cli("convert", str(real), "--dataset-id", "pilot-v0")
    assert again.returncode == 2 and "pilot-v0 exists" in again.stderr
    assert run_cli("convert", str(real), "--dataset-id", "pilot-v0", "--overwrite").returncode == 0
    bad = run_cli("convert", str(real), "--dataset-id", "no id")
    assert bad.returncode == 2 and "Malformed dataset ID" in bad.stderr
    fake = tmp_path / "fake.h5"
    storage.create_frame_file(
        fake, kind="synthetic", frame_size=(64, 64), action_dim=None, attrs={}
    )
    with pytest.raises(UsageError, match="fake.h5: a synthetic file has no episodes"):
        to_minari(fake, "fake-v0")
    assert sorted(p.name for p in datasets.iterdir()) == ["pilot-v0"]  # nothing else written


def test_missing_minari_says_how_to_install(real, monkeypatch):
    monkeypatch.setitem(sys.modules, "minari", None)  # import minari now raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'carsynth\[minari\]'"):
        to_minari(real, "tiny-v0")
