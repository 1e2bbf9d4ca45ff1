"""The code stays `ruff check` and `ruff format` clean (part of the README test command)."""

import subprocess
import sys

import pytest
from conftest import ROOT


# ruff comes with the dev extras of the README's test command; without it this test fails.
@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff_clean(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
