"""scripts/sharpness_anatomy.py: the decomposition of the sharpness statistic, by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

sa = load_script("sharpness_anatomy")


def frames(count: int = 4, value: int = 100) -> np.ndarray:
    x = np.full((count, 64, 64, 3), value, np.uint8)
    x[:, :, 32:] = 200  # one vertical edge of 100 grey levels per frame
    return x


def test_flat_frames_with_an_edge_by_hand() -> None:
    real = frames()
    row = sa.anatomy(real, sa.spectrum(real), real_median=100 * 64 / (63 * 64 + 64 * 63))
    # 64 of the 2 * 63 * 64 neighbour pairs cross the edge, each a difference of 100
    assert row["zero"] == pytest.approx(1 - 64 / (2 * 63 * 64))
    assert row["small"] == 0 and row["large"] == pytest.approx(100 * 64 / (2 * 63 * 64))
    assert row["log_ratio"] == pytest.approx(0.0)
    assert row["power 0-0.12"] == pytest.approx(1.0)
    assert np.isnan(row["power (0.5, 0.5)"])  # no real power there to compare with


def test_a_checkerboard_shows_at_the_diagonal_nyquist_frequency() -> None:
    real = frames()
    board = real.astype(np.int16)
    board += 2 * ((np.indices((64, 64)).sum(0) % 2)[None, :, :, None]).astype(np.int16)
    row = sa.anatomy(board.astype(np.uint8), sa.spectrum(real) + 1e-9, 1.0)
    assert row["zero"] < 0.05 and row["small"] > 1.9  # nearly every pair now differs by 2
    assert row["power (0.5, 0.5)"] > 1e6 and row["power 0-0.12"] == pytest.approx(1.0, rel=1e-3)


def test_noise_rows_are_uint8_and_clipped() -> None:
    x = sa.noisy(np.array([[[[0, 255, 128]]]], np.uint8).repeat(1000, 1), 50.0, seed=0)
    assert x.dtype == np.uint8 and x.min() == 0 and x.max() == 255
    assert (sa.noisy(frames(), 0.0, 0) == frames()).all()


def test_script_writes_rows_for_real_and_noisy_frames(fixture_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    assert sa.main(["--data", str(fixture_file), "--frames", "50", "--noise", "1",
                    "--json", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())
    assert list(rows) == ["real", "real + noise 1"]
    assert rows["real"]["log_ratio"] == 0 and rows["real + noise 1"]["log_ratio"] > 0
    assert sa.main(["--data", str(tmp_path / "missing.h5")]) == 2
