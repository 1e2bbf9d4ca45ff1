"""``carsynth export`` and ``carsynth run``: refusal, --force, round trips, regeneration."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from conftest import FIXTURE, run_cli

from carsynth import storage
from carsynth.errors import UsageError
from carsynth.export import ExportConfig, ExportRefused, export, regenerate
from carsynth.rundir import load_generator
from carsynth.sampling import generate_frames
from carsynth.training import TrainConfig, train
from carsynth.validation import ValidationConfig

# Fast settings of the calibrated gate. A 4-step GAN fails it (what the refusal tests rely on);
# the writing path is tested with --force. The fixture run's 7 training episodes need about
# 1,500 generated frames before the gate can decide (NUM is above that).
CHECKS = dict(k=10, kmeans_iters=10, ndb_fit_samples=400, pca_fit_samples=400, reps=200,
              reference_frames=1000)  # fmt: skip
NUM = 2000


@pytest.fixture
def passes(monkeypatch):
    """Every validation passes (the writing path is under test, not the generator)."""
    from carsynth.validation.checks import ValidationResult

    monkeypatch.setattr(ValidationResult, "failures", property(lambda self: []))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    config = TrainConfig(
        data=str(FIXTURE), out=str(out), steps=4, batch_size=16, nz=8, ngf=8, ndf=8,
        fm=True, progress=False, device="cpu",
    )  # fmt: skip
    return train(config)


def config(run_dir, out, **overrides) -> ExportConfig:
    # on the CPU, as the CPU-sampled frames they are compared with (CUDA rounds differently)
    values = dict(run=str(run_dir), out=str(out), num=NUM, batch_size=500, device="cpu",
                  progress=False)  # fmt: skip
    values["validation"] = ValidationConfig(**{**CHECKS, **overrides.pop("checks", {})})
    return ExportConfig(**{**values, **overrides})


def test_export_writes_generated_frames_with_provenance(run_dir, tmp_path, passes):
    result = export(config(run_dir, tmp_path / "s.h5", seed=7))
    assert result.validation.passed and result.path == tmp_path / "s.h5"
    with storage.open_frame_file(result.path) as f:
        assert f.kind == "synthetic" and f.frames.shape == (NUM, 64, 64, 3)
        frames = f.read()
        attrs = f.attrs
    expected = generate_frames(load_generator(run_dir), 7, 0, NUM, batch_size=333)
    np.testing.assert_array_equal(frames, expected)
    assert attrs["seed"] == 7 and attrs["nz"] == 8 and attrs["validation_passed"]
    assert not attrs["forced"] and len(attrs["generator_sha256"]) == 64
    assert json.loads(attrs["run_config"])["config"]["steps"] == 4
    assert json.loads(attrs["validation"])["passed"] is True
    # Any frame comes back from the seed and its index alone.
    for index in (0, 57, NUM - 1):
        np.testing.assert_array_equal(regenerate(result.path, index), frames[index])


def test_export_refuses_failing_frames_and_writes_nothing(run_dir, tmp_path):
    out = tmp_path / "s.h5"
    with pytest.raises(ExportRefused) as refused:
        export(config(run_dir, out))
    assert str(refused.value).startswith("generated frames failed validation: ")
    assert not refused.value.result.passed and refused.value.result.num_fake == NUM
    assert not out.exists() and not list(tmp_path.iterdir())


def test_too_few_frames_are_refused_before_anything_is_written(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "s.h5"

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before refusing --num")

    monkeypatch.setattr("carsynth.sampling.generate_frames", no_sampling)
    with pytest.raises(UsageError, match=r"the gate needs at least \d+ generated frames .*got 120"):
        export(config(run_dir, out, num=120, force=True))  # --force cannot make a verdict
    assert not out.exists()


def test_forced_export_writes_frames_with_provenance_and_the_failure(run_dir, tmp_path):
    result = export(config(run_dir, tmp_path / "s.h5", seed=7, force=True))
    assert not result.validation.passed and result.path == tmp_path / "s.h5"
    with storage.open_frame_file(result.path) as f:
        assert f.kind == "synthetic" and f.frames.shape == (NUM, 64, 64, 3)
        frames = f.read()
        attrs = f.attrs
    expected = generate_frames(load_generator(run_dir), 7, 0, NUM, batch_size=333)
    np.testing.assert_array_equal(frames, expected)
    assert attrs["seed"] == 7 and attrs["nz"] == 8 and not attrs["validation_passed"]
    assert attrs["forced"] and len(attrs["generator_sha256"]) == 64
    assert json.loads(attrs["run_config"])["config"]["steps"] == 4
    recorded = json.loads(attrs["validation"])
    assert recorded["passed"] is False and recorded["failures"] == result.validation.failures
    assert set(recorded["tests"]) == {"ndb", "sharpness", "collapse", "copying"}
    # Any frame comes back from the seed and its index alone, on any device setting.
    for index in (0, 57, NUM - 1):
        np.testing.assert_array_equal(regenerate(result.path, index), frames[index])
    # Bug: the unresolved "auto" reached torch (RuntimeError: Expected one of cpu, cuda, ...).
    np.testing.assert_array_equal(regenerate(result.path, 3, device="auto"), frames[3])
    with h5py.File(result.path, "a") as h5:
        h5.attrs["generator_sha256"] = "0" * 64
    with pytest.raises(UsageError, match="changed since"):
        regenerate(result.path, 0)


def test_existing_output_is_never_replaced_without_overwrite(run_dir, tmp_path, passes):
    out = tmp_path / "s.h5"
    out.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="exists; pass --overwrite"):
        export(config(run_dir, out, force=True))
    assert out.read_bytes() == b"keep me"
    export(config(run_dir, out, overwrite=True, force=True))
    with storage.open_frame_file(out) as f:
        assert f.num_frames == NUM


def test_cli_exit_codes(run_dir, tmp_path):
    out = tmp_path / "s.h5"
    fast = ["--k", "10", "--kmeans-iters", "10", "--ndb-fit-samples", "400", "--reps", "200"]
    fast += ["--pca-fit-samples", "400", "--reference-frames", "1000", "--no-progress"]
    strict = run_cli("export", "--run", str(run_dir), "--out", str(out), "--num", str(NUM), *fast)
    assert strict.returncode == 1 and "nothing written" in strict.stderr and not out.exists()
    assert "carsynth validate: FAIL" in strict.stdout and "null median" in strict.stdout
    few = run_cli("export", "--run", str(run_dir), "--out", str(out), "--num", "100", *fast)
    assert few.returncode == 2 and not out.exists()
    assert few.stderr.startswith("carsynth: error: the gate needs at least ")
    missing = run_cli("export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x.h5"))
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        f"carsynth: error: --run {tmp_path / 'nope'}: not a carsynth training run (no config.json)"
    )
    bad_num = run_cli(
        "export", "--run", str(run_dir), "--out", str(tmp_path / "y.h5"), "--num", "0"
    )
    assert bad_num.returncode == 2 and "--num must be at least 1" in bad_num.stderr
    assert not (tmp_path / "y.h5").exists()


def test_run_preset_test_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "pipeline"
    first = run_cli("run", "--preset", "test", "--out", str(out), "--no-progress")
    # The plumbing preset's 4-step GAN fails the gate: exit 1, the report, nothing exported.
    assert first.returncode == 1, first.stderr
    assert "validation failed; report in" in first.stdout and "nothing exported" in first.stdout
    for name in ("real.h5", "train/config.json", "validation/report.json", "report.html"):
        assert (out / name).exists(), name
    assert not (out / "synthetic.h5").exists()
    forced = run_cli("run", "--preset", "test", "--out", str(out), "--no-progress", "--force")
    assert forced.returncode == 1 and forced.stdout.count("skipped") == 2, forced.stderr
    with storage.open_frame_file(out / "synthetic.h5") as f:  # written, marked as forced
        assert f.frames.shape == (500, 64, 64, 3) and f.attrs["forced"]
    again = run_cli("run", "--preset", "test", "--out", str(out), "--no-progress")
    assert again.returncode == 1 and again.stdout.count("skipped") == 3, again.stderr


def test_export_of_a_run_whose_data_moved_takes_data(run_dir, tmp_path, passes):
    moved = tmp_path / "moved_run"
    shutil.copytree(run_dir, moved)
    record = json.loads((moved / "config.json").read_text())
    record["data"]["path"] = str(tmp_path / "gone.h5")
    (moved / "config.json").write_text(json.dumps(record))
    with pytest.raises(UsageError, match="pass --data PATH"):
        export(config(moved, tmp_path / "a.h5"))
    copy = shutil.copy(FIXTURE, tmp_path / "here.h5")
    result = export(config(moved, tmp_path / "b.h5", data=str(copy), force=True))
    assert (
        result.validation.num_train
        == export(config(run_dir, tmp_path / "c.h5", force=True)).validation.num_train
    )
    other = tmp_path / "other.h5"
    other.write_bytes(b"not the same file")
    with pytest.raises(UsageError, match="--data .*fingerprint"):
        export(config(moved, tmp_path / "d.h5", data=str(other)))
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "d.h5").exists()
