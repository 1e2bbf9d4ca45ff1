"""Shared fixtures: the shipped real file and helpers to run the CLI in a subprocess."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
# Under pytest-xdist (`-n auto`, the README's test command) the workers share the cores: each
# gets its share of torch threads instead of all of them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(
        max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    )

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "data" / "carracing_small.h5"


@pytest.fixture(scope="session", autouse=True)
def frame_cache_folder(tmp_path_factory) -> Iterator[Path]:
    """The datasets' frame cache (carsynth.frame_cache) in a folder of this test session, so a
    test run never writes into the user's ~/.cache (the CLI subprocesses inherit it too)."""
    folder = tmp_path_factory.mktemp("frame_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CARSYNTH_CACHE", str(folder))
        yield folder


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


def load_script(name: str) -> ModuleType:
    """Import ``scripts/NAME.py`` (the scripts are not a package) as module ``NAME``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
