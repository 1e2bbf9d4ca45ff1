"""Shared fixtures: the shipped real file and helpers to run the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "data" / "carracing_small.h5"


@pytest.fixture
def fixture_file() -> Path:
    """The shipped real frame file (read-only: copy it before changing it)."""
    return FIXTURE


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m carsynth ARGS`` the way a user runs the command."""
    return subprocess.run(
        [sys.executable, "-m", "carsynth", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip
