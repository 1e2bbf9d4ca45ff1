"""``validate_frames``, ``validate_files`` and ``carsynth validate``: verdicts, reports, exits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from carsynth import storage
from carsynth.cli import main
from carsynth.errors import UsageError
from carsynth.validation import (
    ValidationConfig,
    fit_reference,
    judge_frames,
    real_splits,
    validate_files,
    validate_frames,
)

FAST = {"k": 10, "kmeans_iters": 10, "pairs": 4, "ndb_fit_samples": 400, "pca_fit_samples": 400,
        "reps": 200, "reference_frames": 1000}  # fmt: skip


@pytest.fixture(scope="module")
def fixture_frames() -> np.ndarray:
    from conftest import FIXTURE

    with storage.open_frame_file(FIXTURE) as f:
        return f.read("all")


@pytest.fixture(scope="module")
def fixture_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from conftest import FIXTURE

    with storage.open_frame_file(FIXTURE) as f:
        return real_splits(f)


def synthetic_file(path: Path, frames: np.ndarray) -> Path:
    storage.create_frame_file(
        path, kind="synthetic", frame_size=frames.shape[1:3], action_dim=None, attrs={}
    )
    if len(frames):
        storage.append_frames(path, frames)
    return path


def waves(latents: np.ndarray) -> np.ndarray:
    """16x16 frames with stripes where two latent phases (u, v) put them: uint8 (N, 16, 16, 3)."""
    i = np.arange(16)[None, :, None, None]
    j = np.arange(16)[None, None, :, None]
    c = np.arange(3)[None, None, None, :]
    u, v = latents[:, 0, None, None, None], latents[:, 1, None, None, None]
    x = 128 + 50 * np.sin(0.6 * i + u + c) + 50 * np.cos(0.5 * j + v)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def wave_episodes(
    rng: np.random.Generator, episodes: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Episodes whose latent phases drift (AR(1), coefficient 0.95, stationary N(0, 1.5^2)):
    consecutive frames are near duplicates, as a car's are. Frames and episode ids."""
    z = np.empty((episodes, length, 2))
    z[:, 0] = rng.normal(size=(episodes, 2))
    for t in range(1, length):
        z[:, t] = 0.95 * z[:, t - 1] + np.sqrt(1 - 0.95**2) * rng.normal(size=(episodes, 2))
    return waves(1.5 * z.reshape(-1, 2)), np.repeat(np.arange(episodes), length)


@pytest.fixture(scope="module")
def wave_world() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    train, train_ep = wave_episodes(rng, 40, 40)
    holdout, holdout_ep = wave_episodes(rng, 6, 40)
    perfect = waves(1.5 * rng.normal(size=(2000, 2)))  # independent draws of the same law
    noisy = np.clip(perfect + rng.normal(0, 12, perfect.shape), 0, 255).astype(np.uint8)
    return {"train": train, "train_ep": train_ep, "holdout": holdout, "holdout_ep": holdout_ep,
            "perfect": perfect, "noisy": noisy}  # fmt: skip


def test_perfect_frames_pass_and_noisy_ones_fail(wave_world) -> None:
    w, config = wave_world, ValidationConfig(k=10, pairs=4, reps=200)
    real = (w["train"], w["train_ep"], w["holdout"], w["holdout_ep"])
    good = validate_frames(*real, w["perfect"], config)
    assert good.passed and good.failures == [], good.summary()
    assert good.summary().startswith("carsynth validate: PASS (level 0.05, each test at 0.0125)")
    data = json.loads(json.dumps(good.to_dict()))
    assert set(data["tests"]) == {"ndb", "sharpness", "collapse", "copying"}
    ndb = data["tests"]["ndb"]
    assert ndb["level"] == 0.0125 and ndb["p_value"] >= 0.0125 and ndb["design_effect"] > 2
    assert set(ndb["null_quantiles"]) == {"q0.01", "q0.05", "q0.5", "q0.95", "q0.99"}
    assert 0 < data["density_coverage"]["generated"]["coverage"] <= 1
    noisy = validate_frames(*real, w["noisy"], config)
    assert not noisy.passed
    assert any(f.startswith("sharpness: statistic") for f in noisy.failures), noisy.failures
    assert "failed: sharpness" in noisy.summary()


def test_copies_fail_and_too_few_frames_are_refused(fixture_split) -> None:
    train, train_ep, holdout, holdout_ep = fixture_split
    config = ValidationConfig(**FAST)
    with pytest.raises(UsageError, match=r"the gate needs at least \d+ generated frames .*got 700"):
        validate_frames(train, train_ep, holdout, holdout_ep, train[::2], config)
    copies = np.concatenate([train, train[:600]])  # 2,000 training frames
    copied = validate_frames(train, train_ep, holdout, holdout_ep, copies, config)
    assert not copied.passed and "copying" in [f.split(":")[0] for f in copied.failures]
    assert copied.gate.copying.test.statistic == 1.0  # every frame is a training frame
    np.testing.assert_array_equal(copied.closest_fake, copied.closest_train)
    data = json.loads(json.dumps(copied.to_dict()))
    assert data["passed"] is False and data["frames"] == {
        "train": 1400,
        "holdout": 200,
        "fake": 2000,
    }
    assert data["tests"]["copying"]["passed"] is False and data["config"]["k"] == 10


def test_one_reference_judges_many_sets_as_validate_frames_does(wave_world) -> None:
    # export and the recipe curves fit the real side once, then judge each generated set
    w, config = wave_world, ValidationConfig(k=10, pairs=4, reps=200)
    real = (w["train"], w["train_ep"], w["holdout"], w["holdout_ep"])
    reference = fit_reference(*real, config)
    for fake in (w["perfect"], w["noisy"], w["perfect"]):
        once, twice = validate_frames(*real, fake, config), judge_frames(reference, fake)
        once, twice = once.to_dict(), twice.to_dict()
        assert set(once.pop("seconds")) == set(twice.pop("seconds")) == {
            "fit", "reference", "tests", "total"}  # fmt: skip
        assert json.dumps(once) == json.dumps(twice)
    with pytest.raises(UsageError, match="frame sizes differ"):
        judge_frames(reference, w["perfect"][:, :8, :8])
    with pytest.raises(UsageError, match="the gate needs at least"):
        judge_frames(reference, w["perfect"][:50])


def test_bad_arrays_and_settings_are_usage_errors(fixture_split, fixture_frames) -> None:
    train, train_ep, holdout, holdout_ep = fixture_split
    config = ValidationConfig(**FAST)
    real = (train, train_ep, holdout, holdout_ep)
    with pytest.raises(
        UsageError, match="frame sizes differ: train 64x64, holdout 64x64, fake 32x32"
    ):
        validate_frames(*real, fixture_frames[:50, :32, :32], config)
    with pytest.raises(UsageError, match="train: 1400 frames, too few for K=2000 bins"):
        validate_frames(*real, holdout, ValidationConfig(k=2000, ndb_fit_samples=2000))
    with pytest.raises(UsageError, match="fake: 0 frames"):
        validate_frames(*real, train[:0], config)
    with pytest.raises(UsageError, match=r"train: \(5,\) episode ids for 1400 frames"):
        validate_frames(train, train_ep[:5], holdout, holdout_ep, holdout, config)
    with pytest.raises(UsageError, match="--space must be one of pixels, pca"):
        ValidationConfig(space="faiss")
    with pytest.raises(UsageError, match="--device must be auto, cuda, mps or cpu, got 'gpu0'"):
        ValidationConfig(device="gpu0")
    # Settings that would switch a check off, or make it unable to reject, are refused.
    for flags, message in [
        ({"pca_dims": 0}, "--pca-dims must be at least 1, got 0"),
        ({"nn_resolution": 0}, "--nn-resolution must be at least 4, got 0"),
        ({"level": 1.5}, "--level must be in (0, 1)"),
        ({"copy_quantile": 0.0}, "--copy-quantile must be in (0, 1)"),
        ({"reps": 100}, "--reps must be at least 160, got 100"),  # p could never fall below level/4
        ({"k": 1}, "--k must be at least 2, got 1"),
    ]:
        with pytest.raises(UsageError, match=re.escape(message)):
            ValidationConfig(**flags)


def test_real_file_without_holdout_is_refused_naming_the_flag(tmp_path, fixture_file) -> None:
    # There used to be a private seeded split here, different from train --holdout's.
    path = tmp_path / "no_holdout.h5"
    with storage.open_frame_file(fixture_file) as f:
        storage.create_frame_file(
            path, kind="real", frame_size=(64, 64), action_dim=3, attrs={}, schema_version=1
        )
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
        train, train_ep, holdout, holdout_ep = real_splits(f)
        ranges = f.split_ranges(f.holdout_seeds())
        np.testing.assert_array_equal(holdout, f.read_ranges(ranges["holdout"]))
        np.testing.assert_array_equal(train, f.read("train"))
        assert len(holdout) == f.count("holdout") == 200
    # Each frame's episode: 7 training episodes of 200 frames, one held out.
    np.testing.assert_array_equal(train_ep, np.repeat(np.arange(7), 200))
    np.testing.assert_array_equal(holdout_ep, np.zeros(200))


def test_cli_report_and_exit_codes(tmp_path, fixture_file, fixture_split, capsys) -> None:
    train = fixture_split[0]
    fake = synthetic_file(tmp_path / "fake.h5", np.concatenate([train, train[:600]]))  # copies
    report = tmp_path / "report"
    flags = ["--k", "10", "--kmeans-iters", "10", "--ndb-fit-samples", "400"]
    flags += ["--pca-fit-samples", "400", "--reps", "200", "--no-progress"]
    common = ["validate", "--real", str(fixture_file), "--fake", str(fake), *flags]
    failed = run_cli(*common, "--report", str(report))  # as a user runs it
    assert failed.returncode == 1, failed.stderr
    assert failed.stdout.startswith("carsynth validate: FAIL")
    assert "failed: copying" in failed.stdout and "null median" in failed.stdout
    data = json.loads((report / "report.json").read_text())
    assert data["passed"] is False and data["sources"]["holdout"] == "holdout episodes of the file"
    assert data["frames"] == {"train": 1400, "holdout": 200, "fake": 2000}
    assert data["tests"]["copying"]["p_value"] < data["tests"]["copying"]["level"]
    for name in ("ndb_bins.png", "nn_distances.png", "closest_pairs.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same entry point in-process (no second torch start-up): a report is never replaced.
    before = (report / "report.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*common, "--report", str(report)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"carsynth: error: {report} holds report.json; pass --overwrite to replace it"
    )
    assert (report / "report.json").stat().st_mtime_ns == before
    # Too few generated frames to decide: exit 2 and one line saying how many it needs.
    few = synthetic_file(tmp_path / "few.h5", train[:300])
    assert main(["validate", "--real", str(fixture_file), "--fake", str(few), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("carsynth: error: the gate needs at least ") and err.endswith("got 300")
    assert "\n" not in err


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
