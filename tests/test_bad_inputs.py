"""Bad input to collect, merge and info: one line naming the flag or file, exit 2, nothing written.

Each case runs the command in-process (``cli.main``) on a folder of small hand-made files and
checks the exit code, that stderr is exactly one line matching the expected message, and that
no file in the folder was created, changed or removed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from carsynth import cli, storage

SIZE = 8


def episode(seed: int, length: int = 12) -> storage.Episode:
    return storage.Episode(
        seed=seed,
        observations=np.full((length + 1, SIZE, SIZE, 3), seed * 10, np.uint8),
        actions=np.zeros((length, 3), np.float32),
        rewards=np.ones(length, np.float32),
        terminations=np.arange(length) == length - 1,
        truncations=np.zeros(length, bool),
    )


def real_file(path: Path, seeds=(0, 1), **attrs) -> Path:
    storage.create_frame_file(path, kind="real", frame_size=(SIZE, SIZE), action_dim=3, attrs=attrs)
    storage.append_episodes(path, [episode(s) for s in seeds])
    return path


def edit_table(path: Path, column: str, values: list[int]) -> None:
    with h5py.File(path, "a") as h5:
        table = h5["episodes"][:]
        table[column] = values
        h5["episodes"][:] = table


def corrupt_a_chunk(path: Path) -> None:
    """Overwrite the compressed bytes of one frame chunk (what a bad disk sector leaves)."""
    with h5py.File(path, "r") as h5:
        chunk = h5["observations"].id.get_chunk_info(1)
    with open(path, "r+b") as handle:
        handle.seek(chunk.byte_offset + 2)
        handle.write(b"\xff" * (chunk.size - 4))


def read_only_folder(path: Path) -> Path:
    """A folder nobody may write to: a read-only tmpfs as root, else one without write bits."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return path
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)])
    if mounted.returncode != 0:
        pytest.skip("root without mount: no folder is read-only to root here")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The small files every case reads; built once, checked unchanged after every case."""
    d = tmp_path_factory.mktemp("world")
    real_file(d / "real.h5")
    real_file(d / "other.h5", seeds=(2,), skip_frames=10)
    real_file(d / "overlap.h5", seeds=(1, 2))
    storage.create_frame_file(
        d / "synthetic.h5", kind="synthetic", frame_size=(SIZE, SIZE), action_dim=None, attrs={}
    )
    storage.append_frames(d / "synthetic.h5", np.zeros((5, SIZE, SIZE, 3), np.uint8))
    storage.create_frame_file(
        d / "empty.h5", kind="real", frame_size=(SIZE, SIZE), action_dim=3, attrs={}
    )
    edit_table(real_file(d / "negative.h5"), "length", [14, -2])  # starts [0, 13] ...
    edit_table(d / "negative.h5", "start", [0, 15])  # ... made to agree with the lengths
    edit_table(d / "negative.h5", "step_start", [0, 14])
    edit_table(real_file(d / "gap.h5"), "start", [0, 14])  # 12 steps: 13 observations
    edit_table(real_file(d / "long.h5"), "length", [12, 40])
    edit_table(real_file(d / "negative_start.h5"), "start", [0, -5])
    corrupt_a_chunk(real_file(d / "corrupt.h5", seeds=(0, 1, 2)))
    (d / "text.h5").write_text("hello")
    with h5py.File(d / "plain.h5", "w") as h5:
        h5["frames"] = np.zeros((2, SIZE, SIZE, 3), np.uint8)
    (d / "sheet.png").write_bytes(b"an existing picture")
    (d / "folder.h5").mkdir()
    read_only_folder(d / "ro")
    yield d
    if os.geteuid() == 0:
        subprocess.run(["umount", str(d / "ro")], capture_output=True)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


# (arguments with {d} for the folder, expected start of the message after "carsynth: error: ")
CASES = [
    # collect: flags
    ("collect --out {d}/n.h5 --episodes 0", "--episodes must be at least 1"),
    ("collect --out {d}/n.h5 --episodes -3", "--episodes must be at least 1"),
    ("collect --out {d}/n.h5 --episodes abc", "carsynth collect: argument --episodes: invalid int"),
    ("collect --out {d}/n.h5 --skip-frames 1000", "--skip-frames 1000 must be less than --max-st"),
    ("collect --out {d}/n.h5 --skip-frames 60 --max-steps 60", "--skip-frames 60 must be less"),
    ("collect --out {d}/n.h5 --skip-frames -1", "--skip-frames must be 0 or more"),
    ("collect --out {d}/n.h5 --seed -1", "--seed must be 0 or more"),
    ("collect --out {d}/n.h5 --size 7", "--size must be between 8 and 512"),
    ("collect --out {d}/n.h5 --size 100000", "--size must be between 8 and 512"),
    ("collect --out {d}/n.h5 --holdout 1", "--holdout must be in [0, 1)"),
    ("collect --out {d}/n.h5 --holdout nan", "--holdout must be in [0, 1)"),
    ("collect --out {d}/n.h5 --frame-skip 0", "--frame-skip must be at least 1"),
    ("collect --out {d}/n.h5 --max-steps 0", "--max-steps must be at least 1"),
    ("collect --out {d}/n.h5 --lap-complete-percent 0", "--lap-complete-percent must be in"),
    ("collect --out {d}/n.h5 --workers -1", "--workers must be 0 (all cores) or more"),
    ("collect --out {d}/n.h5 --renderer slow", "carsynth collect: argument --renderer"),
    ("collect --out {d}/n.h5 --policy nope", "--policy nope: unknown policy"),
    ("collect --out {d}/n.h5 --shard 3/2", "--shard 3/2: need 0 <= I < N"),
    ("collect --out {d}/n.h5 --resume --overwrite", "--resume and --overwrite contradict"),
    ("collect --out {d}/n.h5 --env Bogus-v1", "--env Bogus-v1: cannot make env"),
    # collect: outputs
    ("collect --out {d}/real.h5", "{d}/real.h5 exists; pass --overwrite"),
    ("collect --out {d}/folder.h5 --overwrite", "{d}/folder.h5 is a directory"),
    ("collect --out {d}/nowhere/n.h5", "{d}/nowhere/n.h5: folder {d}/nowhere does not exist"),
    ("collect --out {d}/ro/n.h5", "{d}/ro/n.h5: cannot create the lock file"),
    ("collect --out {d}/n.h5 --resume", "--resume: {d}/n.h5 does not exist"),
    ("collect --out {d}/text.h5 --resume", "{d}/text.h5: not an HDF5 file"),
    ("collect --out {d}/synthetic.h5 --resume", "--resume: {d}/synthetic.h5 is a synthetic file"),
    (
        "collect --out {d}/negative.h5 --resume",
        "{d}/negative.h5: not a carsynth frame file (episode 1 (seed 1) has length -2)",
    ),  # fmt: skip
    ("collect --out {d}/real.h5 --resume --size 32", "--resume: {d}/real.h5 was collected with"),
    # merge
    ("merge {d}/real.h5 {d}/missing.h5 --out {d}/m.h5", "{d}/missing.h5: no such file"),
    ("merge {d}/real.h5 {d}/text.h5 --out {d}/m.h5", "{d}/text.h5: not an HDF5 file"),
    ("merge {d}/real.h5 {d}/synthetic.h5 --out {d}/m.h5", "{d}/synthetic.h5: merge joins real"),
    ("merge {d}/real.h5 {d}/other.h5 --out {d}/m.h5", "{d}/other.h5: settings differ"),
    ("merge {d}/real.h5 {d}/overlap.h5 --out {d}/m.h5", "merge: the inputs share episode seeds"),
    ("merge {d}/real.h5 --out {d}/real.h5 --overwrite", "{d}/real.h5: the output must not be"),
    ("merge {d}/overlap.h5 --out {d}/real.h5", "{d}/real.h5 exists; pass --overwrite"),
    ("merge {d}/real.h5 --out {d}/nowhere/m.h5", "{d}/nowhere/m.h5: folder {d}/nowhere does"),
    ("merge {d}/real.h5 --out {d}/ro/m.h5", "{d}/ro/m.h5: cannot create the lock file"),
    ("merge {d}/corrupt.h5 --out {d}/m.h5", "{d}/corrupt.h5: cannot read 'observations' (damaged?"),
    ("merge {d}/negative.h5 --out {d}/m.h5", "{d}/negative.h5: not a carsynth frame file"),
    ("merge --out {d}/m.h5", "carsynth merge: the following arguments are required: inputs"),
    # info: files
    ("info {d}/missing.h5", "{d}/missing.h5: no such file"),
    ("info {d}/text.h5", "{d}/text.h5: not an HDF5 file"),
    ("info {d}/plain.h5", "{d}/plain.h5: not a carsynth frame file"),
    (
        "info {d}/negative.h5",
        "{d}/negative.h5: not a carsynth frame file (episode 1 (seed 1) has length -2)",
    ),  # fmt: skip
    ("info {d}/gap.h5", "{d}/gap.h5: not a carsynth frame file (episode table is not contiguous"),
    (
        "info {d}/negative_start.h5",
        "{d}/negative_start.h5: not a carsynth frame file (episode table is not contiguous",
    ),  # fmt: skip
    ("info {d}/long.h5", "{d}/long.h5: not a carsynth frame file ('observations' is shorter"),
    ("info {d}/corrupt.h5", "{d}/corrupt.h5: cannot read 'observations' (damaged?"),
    # info --grid
    ("info {d}/real.h5 --grid {d}/sheet.png", "{d}/sheet.png exists; pass --overwrite"),
    ("info {d}/real.h5 --grid {d}/g.png --grid-size 0", "--grid-size must be at least 1, got 0"),
    ("info {d}/real.h5 --grid {d}/g.png --grid-size -4", "--grid-size must be at least 1, got -4"),
    ("info {d}/real.h5 --grid {d}/nowhere/g.png", "{d}/nowhere/g.png: folder {d}/nowhere does"),
    ("info {d}/real.h5 --grid {d}/folder.h5 --overwrite", "{d}/folder.h5 is a directory"),
    ("info {d}/real.h5 --grid {d}/ro/g.png", "{d}/ro/g.png: "),
    ("info {d}/empty.h5 --grid {d}/g.png", "{d}/empty.h5: no frames to show"),
    ("info {d}/corrupt.h5 --grid {d}/g.png --grid-size 100", "{d}/corrupt.h5: cannot read"),
]


@pytest.mark.parametrize(("command", "message"), CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(world, capsys, command, message):
    assert_one_line_exit_2_nothing_written(world, capsys, command, message)


def assert_one_line_exit_2_nothing_written(world: Path, capsys, command: str, message: str) -> None:
    """``carsynth COMMAND`` (``{d}`` = ``world``) exits 2 with one line starting with ``message``,
    no traceback or unsafe advice, and leaves every file in ``world`` as it was."""
    before = snapshot(world)
    code = cli.main(command.format(d=world).split())
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = err.splitlines()
    assert line.startswith(f"carsynth: error: {message.format(d=world)}"), line
    assert "Traceback" not in err and "weights_only=False" not in err
    assert snapshot(world) == before


def test_info_grid_overwrites_only_when_asked(world, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    sheet.write_bytes(b"old")
    assert cli.main(["info", str(world / "real.h5"), "--grid", str(sheet), "--overwrite"]) == 0
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.png"]  # no temporary file left
