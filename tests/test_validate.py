"""``validate_frames``, ``validate_files`` and ``carsynth validate``: verdicts, reports, exits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from carsynth import storage
from carsynth.cli import main
from carsynth.errors import UsageError
from carsynth.validation import ValidationConfig, real_splits, validate_files, validate_frames

FAST = {"k": 10, "kmeans_iters": 10, "pairs": 4, "ndb_fit_samples": 400, "pca_fit_samples": 400}


@pytest.fixture(scope="module")
def fixture_frames() -> np.ndarray:
    from conftest import FIXTURE

    with storage.open_frame_file(FIXTURE) as f:
        return f.read("all")


def synthetic_file(path: Path, frames: np.ndarray) -> Path:
    storage.create_frame_file(
        path, kind="synthetic", frame_size=frames.shape[1:3], action_dim=None, attrs={}
    )
    if len(frames):
        storage.append_frames(path, frames)
    return path


def test_held_out_real_frames_pass_and_copies_fail(fixture_frames) -> None:
    train, pool = fixture_frames[:800], fixture_frames[800:]
    config = ValidationConfig(**FAST)
    good = validate_frames(train, pool[0::2], pool[1::2], config)
    assert good.passed and good.failures == []
    assert good.ndb.score <= good.ndb_limit == good.ndb_baseline.score + 0.1
    assert good.summary().startswith("carsynth validate: PASS")
    copied = validate_frames(train, pool[0::2], train[::2], config)
    assert not copied.passed
    assert len(copied.failures) == 1
    assert copied.failures[0].startswith("copying: 100.0% of generated frames are nearer")
    assert "failed: copying" in copied.summary()
    # The closest pairs are the copies themselves.
    np.testing.assert_array_equal(copied.closest_fake, copied.closest_train)
    data = json.loads(json.dumps(copied.to_dict()))
    assert data["passed"] is False and data["frames"] == {"train": 800, "holdout": 400, "fake": 400}
    assert data["ndb_real_baseline"]["num_fake"] == 400 and len(data["ndb"]["bins"]["z"]) == 10
    assert data["config"]["k"] == 10 and data["copying"]["copy_share"] == 1.0


def test_bad_arrays_are_usage_errors(fixture_frames) -> None:
    train, holdout = fixture_frames[:800], fixture_frames[800:1000]
    with pytest.raises(
        UsageError, match="frame sizes differ: train 64x64, holdout 64x64, fake 32x32"
    ):
        validate_frames(train, holdout, fixture_frames[:50, :32, :32], ValidationConfig(**FAST))
    with pytest.raises(UsageError, match="train: 800 frames, too few for K=1000 bins"):
        validate_frames(train, holdout, holdout, ValidationConfig(k=1000))
    with pytest.raises(UsageError, match="fake: 0 frames"):
        validate_frames(train, holdout, train[:0], ValidationConfig(**FAST))
    with pytest.raises(UsageError, match="--space must be one of pixels, pca"):
        ValidationConfig(space="faiss")
    with pytest.raises(UsageError, match="--device must be auto, cuda, mps or cpu, got 'gpu0'"):
        ValidationConfig(device="gpu0")


def test_real_file_without_holdout_is_refused_naming_the_flag(tmp_path, fixture_file) -> None:
    # There used to be a private seeded split here, different from train --holdout's.
    path = tmp_path / "no_holdout.h5"
    with storage.open_frame_file(fixture_file) as f:
        storage.create_frame_file(path, kind="real", frame_size=(64, 64), action_dim=3, attrs={})
        episodes = list(storage.iter_episodes(f))
    for episode in episodes:
        episode.holdout = False
    storage.append_episodes(path, episodes)
    with storage.open_frame_file(path) as f, pytest.raises(UsageError, match="--holdout F"):
        real_splits(f)
    result = run_cli("validate", "--real", str(path), "--fake", str(fixture_file))
    assert result.returncode == 2 and "collect with --holdout F" in result.stderr


def test_real_splits_is_the_split_training_uses(fixture_file) -> None:
    with storage.open_frame_file(fixture_file) as f:
        train, holdout, _ = real_splits(f)
        ranges = f.split_ranges(f.holdout_seeds())
        np.testing.assert_array_equal(holdout, f.read_ranges(ranges["holdout"]))
        np.testing.assert_array_equal(train, f.read("train"))
        assert len(holdout) == f.count("holdout") == 200


def test_cli_report_and_exit_codes(tmp_path, fixture_file, fixture_frames, capsys) -> None:
    fake = synthetic_file(tmp_path / "fake.h5", fixture_frames[1400:])  # episode 7, a train one
    report = tmp_path / "report"
    common = ["validate", "--real", str(fixture_file), "--fake", str(fake), "--k", "10"]
    common += ["--kmeans-iters", "10", "--ndb-fit-samples", "400", "--pca-fit-samples", "400"]
    common += ["--no-progress"]
    failed = run_cli(*common, "--report", str(report))  # as a user runs it
    assert failed.returncode == 1, failed.stderr
    assert failed.stdout.startswith("carsynth validate: FAIL")
    assert "failed: copying" in failed.stdout
    data = json.loads((report / "report.json").read_text())
    assert data["passed"] is False and data["sources"]["holdout"] == "holdout episodes of the file"
    assert data["frames"] == {"train": 1400, "holdout": 200, "fake": 200}
    for name in ("ndb_bins.png", "nn_distances.png", "closest_pairs.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same entry point in-process (no second torch start-up): refused, then lenient flags.
    before = (report / "report.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*common, "--report", str(report)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"carsynth: error: {report} holds report.json; pass --overwrite to replace it"
    )
    assert (report / "report.json").stat().st_mtime_ns == before
    assert main([*common, "--max-copy-share", "1", "--max-ndb-excess", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["max_copy_share"] == 1.0


def test_cli_bad_files_exit_2(tmp_path, fixture_file, fixture_frames) -> None:
    small = synthetic_file(tmp_path / "small.h5", fixture_frames[:20, :32, :32])
    empty = synthetic_file(tmp_path / "empty.h5", fixture_frames[:0])
    for fake, message in [
        (small, f"frame sizes differ: {fixture_file} (training split) 64x64, "),
        (empty, f"{empty}: 0 frames, need at least 2"),
    ]:
        result = run_cli("validate", "--real", str(fixture_file), "--fake", str(fake))
        assert result.returncode == 2
        assert result.stderr.startswith(f"carsynth: error: {message}"), result.stderr
    assert not list(tmp_path.glob("report*"))


def test_validate_files_refuses_bad_inputs(tmp_path, fixture_file, fixture_frames) -> None:
    fake = synthetic_file(tmp_path / "fake.h5", fixture_frames[:100])
    with pytest.raises(UsageError, match=r"\(training split\): 1400 frames, too few for K=2000"):
        validate_files(fixture_file, fake, config=ValidationConfig(k=2000), progress=False)
    with pytest.raises(UsageError, match="missing.h5: no such file"):
        validate_files(fixture_file, tmp_path / "missing.h5", progress=False)
    with pytest.raises(UsageError, match="--real must be a real frame file, this one is synthetic"):
        validate_files(fake, fake, progress=False)
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(UsageError, match="taken: exists and is not a folder"):
        validate_files(fixture_file, fake, report_dir=tmp_path / "taken", progress=False)


def test_config_spaces_are_the_metrics_spaces() -> None:
    from carsynth.metrics import neighbours
    from carsynth.validation.checks import SPACES

    assert SPACES == neighbours.SPACES
