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


def test_training_functions_are_short() -> None:
    """No function of the training package, the run directory or the device resolver runs over
    80 lines (the redesign's reading budget)."""
    import ast

    paths = [*(ROOT / "carsynth" / "training").glob("*.py"), ROOT / "carsynth" / "rundir.py",
             ROOT / "carsynth" / "devices.py"]  # fmt: skip
    long = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{path.name}:{node.name} ({length} lines)")
    assert not long, long
