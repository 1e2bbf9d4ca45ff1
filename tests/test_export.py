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

# Checks that anything passes: they test the writing path, not the generator (a 4-step GAN fails
# the default checks, which is what the refusal tests rely on).
LENIENT = dict(
    k=5, max_ndb_excess=1.0, min_collapse_ratio=0.0, max_duplicate_share=1.0, max_copy_share=1.0
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    config = TrainConfig(
        data=str(FIXTURE), out=str(out), steps=4, batch_size=16, nz=8, ngf=8, ndf=8,
        fm=True, progress=False, device="cpu",
    )  # fmt: skip
    return train(config)


def config(run_dir, out, **overrides) -> ExportConfig:
    values = dict(run=str(run_dir), out=str(out), num=120, batch_size=50, progress=False)
    values["validation"] = ValidationConfig(**{**LENIENT, **overrides.pop("checks", {})})
    return ExportConfig(**{**values, **overrides})


def test_export_writes_generated_frames_with_provenance(run_dir, tmp_path):
    result = export(config(run_dir, tmp_path / "s.h5", seed=7))
    assert result.validation.passed and result.path == tmp_path / "s.h5"
    with storage.open_frame_file(result.path) as f:
        assert f.kind == "synthetic" and f.frames.shape == (120, 64, 64, 3)
        frames = f.read()
        attrs = f.attrs
    expected = generate_frames(load_generator(run_dir), 7, 0, 120, batch_size=33)
    np.testing.assert_array_equal(frames, expected)
    assert attrs["seed"] == 7 and attrs["nz"] == 8 and attrs["validation_passed"]
    assert not attrs["forced"] and len(attrs["generator_sha256"]) == 64
    assert json.loads(attrs["run_config"])["config"]["steps"] == 4
    assert json.loads(attrs["validation"])["passed"] is True
    # Any frame comes back from the seed and its index alone.
    for index in (0, 57, 119):
        np.testing.assert_array_equal(regenerate(result.path, index), frames[index])


def test_export_refuses_failing_frames_and_writes_nothing(run_dir, tmp_path):
    out = tmp_path / "s.h5"
    with pytest.raises(ExportRefused) as refused:
        export(config(run_dir, out, checks=dict(max_duplicate_share=0.05, min_collapse_ratio=0.5)))
    assert "collapse" in str(refused.value) and not refused.value.result.passed
    assert not out.exists() and not list(tmp_path.iterdir())


def test_force_writes_and_records_the_failure(run_dir, tmp_path):
    out = tmp_path / "s.h5"
    result = export(config(run_dir, out, force=True, checks=dict(max_ndb_excess=0.0)))
    assert not result.validation.passed
    with storage.open_frame_file(out) as f:
        assert f.attrs["forced"] and not f.attrs["validation_passed"]
        assert json.loads(f.attrs["validation"])["failures"] == result.validation.failures


def test_existing_output_is_never_replaced_without_overwrite(run_dir, tmp_path):
    out = tmp_path / "s.h5"
    out.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="exists; pass --overwrite"):
        export(config(run_dir, out))
    assert out.read_bytes() == b"keep me"
    export(config(run_dir, out, overwrite=True))
    with storage.open_frame_file(out) as f:
        assert f.num_frames == 120


def test_regenerate_refuses_a_changed_checkpoint(run_dir, tmp_path):
    out = export(config(run_dir, tmp_path / "s.h5")).path
    with h5py.File(out, "a") as h5:
        h5.attrs["generator_sha256"] = "0" * 64
    with pytest.raises(UsageError, match="changed since"):
        regenerate(out, 0)


def test_cli_exit_codes(run_dir, tmp_path):
    out = tmp_path / "s.h5"
    strict = run_cli("export", "--run", str(run_dir), "--out", str(out), "--num", "100",
                     "--k", "5", "--no-progress")  # fmt: skip
    assert strict.returncode == 1 and "nothing written" in strict.stderr and not out.exists()
    assert "collapse" in strict.stdout
    forced = run_cli("export", "--run", str(run_dir), "--out", str(out), "--num", "100",
                     "--k", "5", "--no-progress", "--force")  # fmt: skip
    assert forced.returncode == 0 and "FAILED (written because of --force)" in forced.stdout
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
    first = run_cli("run", "--preset", "test", "--out", str(out), "--no-progress", "--force")
    assert first.returncode == 1, first.stderr  # a 4-step GAN fails the checks; --force writes
    for name in ("real.h5", "train/config.json", "validation/report.json", "synthetic.h5"):
        assert (out / name).exists(), name
    with storage.open_frame_file(out / "synthetic.h5") as f:
        assert f.num_frames == 200 and f.attrs["forced"]
    again = run_cli("run", "--preset", "test", "--out", str(out), "--no-progress")
    assert again.returncode == 1, again.stderr  # the skipped export's verdict is still a failure
    assert again.stdout.count("skipped") == 3


def test_regenerate_resolves_device_auto(run_dir, tmp_path):
    # Bug: the unresolved "auto" reached torch (RuntimeError: Expected one of cpu, cuda, ...).
    out = export(config(run_dir, tmp_path / "s.h5")).path
    with storage.open_frame_file(out) as f:
        expected = f.frames[3]
    np.testing.assert_array_equal(regenerate(out, 3, device="auto"), expected)


def test_export_of_a_run_whose_data_moved_takes_data(run_dir, tmp_path):
    moved = tmp_path / "moved_run"
    shutil.copytree(run_dir, moved)
    record = json.loads((moved / "config.json").read_text())
    record["data"]["path"] = str(tmp_path / "gone.h5")
    (moved / "config.json").write_text(json.dumps(record))
    with pytest.raises(UsageError, match="pass --data PATH"):
        export(config(moved, tmp_path / "a.h5"))
    copy = shutil.copy(FIXTURE, tmp_path / "here.h5")
    result = export(config(moved, tmp_path / "b.h5", data=str(copy)))
    assert (
        result.validation.num_train
        == export(config(run_dir, tmp_path / "c.h5")).validation.num_train
    )
    other = tmp_path / "other.h5"
    other.write_bytes(b"not the same file")
    with pytest.raises(UsageError, match="--data .*fingerprint"):
        export(config(moved, tmp_path / "d.h5", data=str(other)))
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "d.h5").exists()
