"""Bad input to train, validate, export and run: one line naming the flag or file, exit 2, nothing
written or rewritten (collect, merge and info: tests/test_bad_inputs.py).

Each case runs the command in-process (``cli.main``) against a folder of small files and runs:
a real file, a finished 2-step run, runs whose config.json is not JSON or whose checkpoints are
all damaged, a read-only folder. The folder is checked unchanged after every case.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
from conftest import FIXTURE
from test_bad_inputs import (
    assert_one_line_exit_2_nothing_written,
    read_only_folder,
    real_file,
)

from carsynth import storage
from carsynth.training import TrainConfig, train

torch.set_num_threads(1)
TINY = "--nz 8 --ngf 8 --ndf 8 --batch-size 16 --steps 2 --device cpu --no-progress"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    shutil.copy(FIXTURE, d / "real.h5")
    real_file(d / "small.h5")  # 8x8 frames
    storage.create_frame_file(d / "synthetic.h5", kind="synthetic", frame_size=(64, 64),
                              action_dim=None, attrs={})  # fmt: skip
    storage.append_frames(d / "synthetic.h5", storage.open_frame_file(FIXTURE).frames[:50])
    (d / "text.h5").write_text("hello")
    (d / "notarun").mkdir()
    (d / "notarun" / "thesis.tex").write_text("mine")
    train(TrainConfig(data=str(d / "real.h5"), out=str(d / "run"), nz=8, ngf=8, ndf=8,
                      batch_size=16, steps=2, checkpoint_interval=1, progress=False,
                      device="cpu"))  # fmt: skip
    shutil.copytree(d / "run", d / "badjson")
    (d / "badjson" / "config.json").write_text('{"config": ')
    shutil.copytree(d / "run", d / "allbad")
    for checkpoint in (d / "allbad" / "checkpoints").glob("*.pt"):
        checkpoint.write_bytes(b"")
    read_only_folder(d / "ro")
    yield d
    if os.geteuid() == 0:
        subprocess.run(["umount", str(d / "ro")], capture_output=True)


TRAIN = "train --data {d}/real.h5 --out {d}/new " + TINY
VALIDATE = "validate --real {d}/real.h5 --fake {d}/synthetic.h5 --no-progress"
EXPORT = "export --run {d}/run --out {d}/s.h5 --num 50 --device cpu --no-progress"
CASES = [
    # train: learning rate and Adam
    (f"{TRAIN} --lr nan", "--lr must be in (0, 1], got nan"),
    (f"{TRAIN} --lr inf", "--lr must be in (0, 1], got inf"),
    (f"{TRAIN} --lr 1e6", "--lr must be in (0, 1], got 1000000.0"),
    (f"{TRAIN} --lr 0", "--lr must be in (0, 1], got 0.0"),
    (f"{TRAIN} --lr=-2e-4", "--lr must be in (0, 1], got -0.0002"),
    (f"{TRAIN} --beta1 1", "--beta1 must be in [0, 1), got 1.0"),
    (f"{TRAIN} --beta2 nan", "--beta2 must be in [0, 1), got nan"),
    (f"{TRAIN} --lr abc", "carsynth train: argument --lr: invalid float value"),
    # train: sizes
    (f"{TRAIN} --ngf 100000", "--ngf 100000 is above the most, 1024: the networks would have"),
    (f"{TRAIN} --ndf 5000", "--ndf 5000 is above the most, 1024"),
    (f"{TRAIN} --nz 100000", "--nz 100000 is above the most, 4096"),
    (f"{TRAIN} --ngf 0", "--ngf must be >= 1, got 0"),
    (f"{TRAIN} --nz -1", "--nz must be >= 1, got -1"),
    (f"{TRAIN} --batch-size 0", "--batch-size must be >= 1, got 0"),
    (f"{TRAIN} --batch-size 5000", "--batch-size 5000 x 1 processes is larger than the"),
    (f"{TRAIN} --minibatch-kernels -1", "--minibatch-kernels must be >= 0"),
    # train: budget and bookkeeping
    (f"{TRAIN} --steps 0", "--steps must be >= 1, got 0"),
    (f"{TRAIN} --steps -5", "--steps must be >= 1, got -5"),
    (f"{TRAIN} --epochs nan".replace(" --steps 2", ""), "--epochs must be a finite number"),
    (f"{TRAIN} --epochs 0".replace(" --steps 2", ""), "--epochs must be > 0, got 0.0"),
    (f"{TRAIN} --epochs 1", "give --steps or --epochs, not both"),
    (f"{TRAIN} --seed -1", "--seed must be >= 0, got -1"),
    (f"{TRAIN} --log-interval 0", "--log-interval must be >= 1, got 0"),
    (f"{TRAIN} --checkpoint-interval 0", "--checkpoint-interval must be >= 1, got 0"),
    (f"{TRAIN} --keep-checkpoints 0", "--keep-checkpoints must be >= 1, got 0"),
    (f"{TRAIN} --monitor-interval 3", "--monitor-interval must be a multiple of --log-interval"),
    (f"{TRAIN} --stop-on-collapse", "--stop-on-collapse needs --monitor-interval"),
    # train: objective
    (f"{TRAIN} --gp-weight nan", "--gp-weight must be a finite number, got nan"),
    (f"{TRAIN} --historical-weight -1", "--historical-weight must be >= 0, got -1.0"),
    (f"{TRAIN} --adv-weight inf", "--adv-weight must be a finite number, got inf"),
    (f"{TRAIN} --ema-decay 1", "--ema-decay must be in [0, 1), got 1.0"),
    (f"{TRAIN} --ema-decay nan", "--ema-decay must be in [0, 1), got nan"),
    (f"{TRAIN} --real-label 0", "--real-label must be in (0, 1], got 0.0"),
    (f"{TRAIN} --real-label nan", "--real-label must be in (0, 1], got nan"),
    (f"{TRAIN} --holdout 1", "--holdout must be in [0, 1), got 1.0"),
    (f"{TRAIN} --fm-layer 7", "--fm-layer must be a comma list of (1, 2, 3, 4), got '7'"),
    (f"{TRAIN} --fm-layer 1,x", "--fm-layer must be a comma list of (1, 2, 3, 4), got '1,x'"),
    (f"{TRAIN} --lr-decay 2", "--lr-decay must be in [0, 1], got 2.0"),
    (f"{TRAIN} --critic-steps 0", "--critic-steps must be >= 1, got 0"),
    (f"{TRAIN} --unrolled-steps -1", "--unrolled-steps must be >= 0, got -1"),
    (f"{TRAIN} --loss hinge", "carsynth train: argument --loss: invalid choice"),
    (f"{TRAIN} --amp fp8", "--amp must be auto, bf16, fp16 or off, got 'fp8'"),
    # train: device
    ("train --data {d}/real.h5 --out {d}/new --device bogus", "--device must be auto, cuda, mps"),
    ("train --data {d}/real.h5 --out {d}/new --device mps", "--device mps: not available"),
    # train: data and run directory
    ("train --data {d}/missing.h5 --out {d}/new " + TINY, "{d}/missing.h5: no such file"),
    ("train --data {d}/text.h5 --out {d}/new " + TINY, "{d}/text.h5: not an HDF5 file"),
    ("train --data {d}/small.h5 --out {d}/new " + TINY, "{d}/small.h5: frames are 8x8"),
    ("train --data {d}/real.h5 --out {d}/ro/new " + TINY, "--out {d}/ro/new: {d}/ro is not wri"),
    ("train --data {d}/real.h5 --out {d}/text.h5 " + TINY, "{d}/text.h5 exists and is not a dir"),
    ("train --data {d}/real.h5 --out {d}/notarun " + TINY, "{d}/notarun exists; pass --overwr"),
    (
        "train --data {d}/real.h5 --out {d}/notarun --overwrite " + TINY,
        "{d}/notarun: not a carsynth run directory; refusing to replace it",
    ),  # fmt: skip
    ("train --data {d}/real.h5 --out {d}/run " + TINY, "{d}/run exists; pass --overwrite"),
    (
        "train --data {d}/real.h5 --out {d}/run --resume --lr 1e-3 " + TINY,
        "{d}/run: --resume with settings that differ from the run: ['lr']",
    ),  # fmt: skip
    (
        "train --data {d}/small.h5 --out {d}/run --resume " + TINY,
        "{d}/small.h5: frames are 8x8",
    ),  # fmt: skip
    ("train --data {d}/real.h5 --out {d}/badjson --resume " + TINY, "{d}/badjson/config.json: "),
    ("train --data {d}/real.h5 --out {d}/allbad --resume " + TINY, "{d}/allbad: no checkpoint lo"),
    # validate: settings that would switch a check off, and the rest
    (f"{VALIDATE} --pca-dims 0", "--pca-dims must be at least 1, got 0"),
    (f"{VALIDATE} --pca-dims 100000", "--pca-dims 100000: more than the 3072 pixel values"),
    (f"{VALIDATE} --nn-resolution 0", "--nn-resolution must be at least 4, got 0"),
    (f"{VALIDATE} --nn-resolution 100000", "--nn-resolution must be at most 512"),
    (f"{VALIDATE} --ndb-resolution 0", "--ndb-resolution must be at least 4, got 0"),
    (f"{VALIDATE} --k 1", "--k must be at least 2, got 1"),
    (f"{VALIDATE} --k 100000", "--k 100000: more than --ndb-fit-samples 10000"),
    (
        f"{VALIDATE} --k 5000 --ndb-fit-samples 5000",
        "{d}/real.h5 (training split): 1400 frames, too",
    ),
    (f"{VALIDATE} --alpha 0", "--alpha must be in (0, 1)"),
    (f"{VALIDATE} --alpha nan", "--alpha must be in (0, 1)"),
    (f"{VALIDATE} --copy-quantile 0", "--copy-quantile must be in (0, 1)"),
    (f"{VALIDATE} --copy-quantile 1", "--copy-quantile must be in (0, 1)"),
    (f"{VALIDATE} --level 0", "--level must be in (0, 1)"),
    (f"{VALIDATE} --level 1", "--level must be in (0, 1)"),
    (f"{VALIDATE} --level nan", "--level must be in (0, 1)"),
    (f"{VALIDATE} --power 1.5", "--power must be in (0, 1)"),
    (f"{VALIDATE} --reps 10", "--reps must be at least 160, got 10"),
    (f"{VALIDATE} --reference-frames 1", "--reference-frames must be at least 2, got 1"),
    (f"{VALIDATE} --density-k 0", "--density-k must be at least 1, got 0"),
    (f"{VALIDATE} --kmeans-iters 0", "--kmeans-iters must be at least 1, got 0"),
    (f"{VALIDATE} --ndb-fit-samples 1", "--ndb-fit-samples must be at least 2, got 1"),
    (f"{VALIDATE} --pca-fit-samples 0", "--pca-fit-samples must be at least 2, got 0"),
    (f"{VALIDATE} --pairs 0", "--pairs must be at least 1, got 0"),
    (f"{VALIDATE} --seed -1", "--seed must be at least 0, got -1"),
    (f"{VALIDATE} --space cosine", "--space must be one of pixels, pca, got 'cosine'"),
    (f"{VALIDATE} --device bogus", "--device must be auto, cuda, mps or cpu, got 'bogus'"),
    (f"{VALIDATE} --report {{d}}/ro/rep", "{d}/ro/rep: folder {d}/ro is not writable"),
    (f"{VALIDATE} --report {{d}}/text.h5", "{d}/text.h5: exists and is not a folder"),
    (f"{VALIDATE} --report {{d}}/no/rep", "{d}/no/rep: folder {d}/no does not exist"),
    ("validate --real {d}/missing.h5 --fake {d}/synthetic.h5", "{d}/missing.h5: no such file"),
    ("validate --real {d}/real.h5 --fake {d}/text.h5", "{d}/text.h5: not an HDF5 file"),
    ("validate --real {d}/synthetic.h5 --fake {d}/synthetic.h5", "{d}/synthetic.h5: --real must"),
    ("validate --real {d}/real.h5 --fake {d}/small.h5", "frame sizes differ"),
    # export
    (f"{EXPORT} --num 0", "--num must be at least 1, got 0"),
    (f"{EXPORT} --num -5", "--num must be at least 1, got -5"),
    (f"{EXPORT} --num 100000000000", "--num 100000000000: the frames would take 1144409.2 GiB"),
    (f"{EXPORT} --batch-size 0", "--batch-size must be at least 1, got 0"),
    (f"{EXPORT} --seed -1", "--seed must be at least 0, got -1"),
    (f"{EXPORT} --device bogus", "--device must be auto, cuda, mps or cpu, got 'bogus'"),
    (f"{EXPORT} --pca-dims 0", "--pca-dims must be at least 1, got 0"),
    (f"{EXPORT} --level 5", "--level must be in (0, 1)"),
    (f"{EXPORT} --report {{d}}/ro/rep", "{d}/ro/rep: folder {d}/ro is not writable"),
    ("export --run {d}/missing --out {d}/s.h5", "--run {d}/missing: not a carsynth training run"),
    ("export --run {d}/notarun --out {d}/s.h5", "--run {d}/notarun: not a carsynth training run"),
    ("export --run {d}/badjson --out {d}/s.h5", "{d}/badjson/config.json: not JSON"),
    ("export --run {d}/allbad --out {d}/s.h5 --device cpu", "{d}/allbad: no checkpoint loads"),
    ("export --run {d}/run --out {d}/synthetic.h5", "{d}/synthetic.h5 exists; pass --overwrite"),
    ("export --run {d}/run --out {d}/ro/s.h5", "{d}/ro/s.h5: folder {d}/ro is not writable"),
    ("export --run {d}/run --out {d}/notarun --overwrite", "{d}/notarun is a directory"),
    ("export --run {d}/run --out {d}/no/s.h5", "{d}/no/s.h5: folder {d}/no does not exist"),
    # run: every step's settings before collecting
    ("run --out {d}/p --device bogus", "--device must be auto, cuda, mps or cpu, got 'bogus'"),
    ("run --out {d}/p --device mps", "--device mps: not available on this machine"),
    ("run --out {d}/p --seed -1", "--seed must be at least 0, got -1"),
    ("run --out {d}/p --preset huge", "carsynth run: argument --preset: invalid choice"),
    ("run --out {d}/ro/p", "--out {d}/ro/p: {d}/ro is not writable"),
    ("run --out {d}/text.h5", "--out {d}/text.h5: exists and is not a directory"),
]


@pytest.mark.parametrize(("command", "message"), CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(world, capsys, command, message):
    assert_one_line_exit_2_nothing_written(world, capsys, command, message)
