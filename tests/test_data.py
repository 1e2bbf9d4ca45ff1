"""carsynth.data: tensors users train on, DataLoader workers over shards, splits, mixing, bad files.

Known answers come from h5py directly (the fixture's raw ``frames``), not through carsynth's reader.
"""

from __future__ import annotations

import math
import pickle
import shutil

import h5py
import numpy as np
import pytest
import torch
from conftest import FIXTURE
from torch.utils.data import DataLoader

from carsynth import storage
from carsynth.data import FrameDataset, MixedFrames, load_frames
from carsynth.errors import UsageError


@pytest.fixture(scope="module")
def raw() -> np.ndarray:
    """Every frame of the fixture, read with plain h5py (the reference answer)."""
    with h5py.File(FIXTURE, "r") as h5:
        return h5["frames"][:]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, object]:
    """The fixture split into two shard files (episodes 0-3, 4-7), and both merges of them."""
    folder = tmp_path_factory.mktemp("shards")
    paths = [folder / "shard0.h5", folder / "shard1.h5"]
    with storage.open_frame_file(FIXTURE) as source:
        episodes = list(storage.iter_episodes(source))
        attrs = source.attrs
    for path, part in zip(paths, (episodes[:4], episodes[4:]), strict=True):
        storage.create_frame_file(
            path, kind="real", frame_size=(64, 64), action_dim=3, attrs=attrs, schema_version=1
        )
        storage.append_episodes(path, part)
    # Merge in reverse order: merge sorts shards by seed, so the result is still episodes 0-7.
    merged = storage.merge(paths[::-1], folder / "merged.h5")
    virtual = storage.merge(paths[::-1], folder / "virtual.h5", virtual=True)
    return {"paths": paths, "merged": merged, "virtual": virtual}


def synthetic_file(path, frames: np.ndarray):
    storage.create_frame_file(
        path, kind="synthetic", frame_size=frames.shape[1:3], action_dim=None, attrs={}
    )
    storage.append_frames(path, frames)
    return path


def as_tensors(frames: np.ndarray) -> np.ndarray:
    """The documented mapping, by hand: uint8 NHWC -> float32 NCHW, v / 255."""
    return frames.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)


def test_items_are_float_chw_in_unit_range(fixture_file, raw):
    dataset = FrameDataset(fixture_file)
    assert len(dataset) == 1600 and dataset.frame_size == (64, 64)
    for index in (0, 7, 8, 999, -1):
        item = dataset[index]
        assert item.dtype == torch.float32 and item.shape == (3, 64, 64)
        np.testing.assert_array_equal(item.numpy(), as_tensors(raw[[index]])[0])
    items = torch.stack([dataset[i] for i in range(0, 1600, 97)])
    assert items.min() >= 0.0 and items.max() <= 1.0 and items.max() > 0.5
    with pytest.raises(IndexError):
        dataset[1600]
    doubled = FrameDataset(fixture_file, transform=lambda x: 2 * x - 1)
    np.testing.assert_allclose(doubled[5].numpy(), 2 * as_tensors(raw[[5]])[0] - 1, atol=1e-6)


def test_splits_follow_the_episode_holdout_flags(fixture_file, raw):
    with h5py.File(fixture_file, "r") as h5:
        table = h5["episodes"][:]
    # The fixture's holdout episode is seed 3: frames 600..799.
    assert list(table["seed"][table["holdout"]]) == [3]
    assert list(table["start"][table["holdout"]]) == [600] and set(table["length"]) == {200}
    np.testing.assert_array_equal(load_frames(fixture_file, "holdout"), raw[600:800])
    train = np.concatenate([raw[:600], raw[800:]])
    np.testing.assert_array_equal(load_frames(fixture_file, split="train"), train)
    np.testing.assert_array_equal(load_frames(fixture_file, "train", limit=650)[-50:], raw[800:850])
    dataset = FrameDataset(fixture_file, split="train")
    assert len(dataset) == 1400 and len(FrameDataset(fixture_file, split="holdout")) == 200
    np.testing.assert_array_equal(dataset[600].numpy(), as_tensors(raw[[800]])[0])
    assert load_frames(fixture_file).dtype == np.uint8
    assert load_frames(fixture_file, limit=0).shape == (0, 64, 64, 3)


def test_dataloader_with_two_workers_reads_exactly_the_shards(shards, raw):
    dataset = FrameDataset(shards["paths"])
    assert len(dataset) == 1600
    # Read in the parent first: the forked workers must still open handles of their own.
    np.testing.assert_array_equal(dataset[0].numpy(), as_tensors(raw[[0]])[0])
    order = np.random.default_rng(0).permutation(1600)
    loader = DataLoader(dataset, batch_size=100, sampler=order.tolist(), num_workers=2)
    batches = list(loader)
    assert [b.shape for b in batches] == [(100, 3, 64, 64)] * 16
    np.testing.assert_array_equal(torch.cat(batches).numpy(), as_tensors(raw[order]))


def test_pickled_dataset_carries_paths_not_handles(shards, raw):
    dataset = FrameDataset(shards["paths"], split="holdout")
    dataset[0]
    copy = pickle.loads(pickle.dumps(dataset))  # h5py objects refuse to pickle
    assert copy.paths == dataset.paths and len(copy) == 200
    np.testing.assert_array_equal(copy[199].numpy(), as_tensors(raw[[799]])[0])


@pytest.mark.parametrize("merged", ["merged", "virtual"])
def test_merged_file_reads_like_its_shards(shards, merged):
    for split in ("all", "train", "holdout"):
        np.testing.assert_array_equal(
            load_frames(shards[merged], split), load_frames(shards["paths"], split)
        )
    one, many = FrameDataset(shards[merged], "train"), FrameDataset(shards["paths"], "train")
    assert len(one) == len(many) == 1400
    for index in (0, 599, 600, 799, 1399):
        np.testing.assert_array_equal(one[index].numpy(), many[index].numpy())


def test_mixing_ratio_holds(fixture_file, tmp_path, raw):
    fake = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 64, 64, 3), np.uint8)
    mixed = MixedFrames(
        FrameDataset(fixture_file, split="holdout"),
        synthetic_file(tmp_path / "fake.h5", fake),
        synthetic_fraction=0.3,
    )
    assert len(mixed) == 210 and mixed.num_real == 200
    frame, is_synthetic = mixed[0]
    np.testing.assert_array_equal(frame.numpy(), as_tensors(raw[[600]])[0])
    assert is_synthetic is False
    frame, is_synthetic = mixed[203]
    np.testing.assert_array_equal(frame.numpy(), as_tensors(fake[[3]])[0])
    assert is_synthetic is True

    n, p = 20_000, 0.3
    sampler = mixed.sampler(n, seed=1)
    first = np.array(list(sampler))
    assert len(sampler) == n and first.min() >= 0 and first.max() < 210
    is_fake = first >= 200
    assert abs(is_fake.sum() - n * p) <= 4 * math.sqrt(n * p * (1 - p))
    # Within each set, uniform: each of the 10 synthetic frames is drawn Binomial(n, p / 10).
    counts = np.bincount(first[is_fake] - 200, minlength=10)
    assert np.all(np.abs(counts - n * p / 10) <= 4 * math.sqrt(n * p / 10 * (1 - p / 10)))
    assert len(np.unique(first[~is_fake])) == 200
    # A pass draws fresh indices; the sequence of passes is fixed by the seed.
    assert not np.array_equal(first, list(sampler))
    np.testing.assert_array_equal(first, list(mixed.sampler(n, seed=1)))

    loader = DataLoader(mixed, batch_size=50, sampler=mixed.sampler(400, seed=2))
    batches = list(loader)
    frames = torch.cat([b[0] for b in batches])
    flags = torch.cat([b[1] for b in batches])
    drawn = np.array(list(mixed.sampler(400, seed=2)))
    assert flags.dtype == torch.bool
    np.testing.assert_array_equal(flags.numpy(), drawn >= 200)  # each item says which it is
    synthetic_values = (drawn[drawn >= 200] - 200).astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(frames[drawn >= 200, 0, 0, 0], synthetic_values)

    assert not any(i >= 200 for i in MixedFrames(mixed.real, mixed.synthetic, 0.0).sampler(500))
    assert all(i >= 200 for i in MixedFrames(mixed.real, mixed.synthetic, 1.0).sampler(500))
    with pytest.raises(UsageError, match=r"synthetic_fraction must be in \[0, 1\], got 1.5"):
        MixedFrames(mixed.real, mixed.synthetic, 1.5)


def bad_frames(path, fixture_file, change):
    shutil.copy(fixture_file, path)
    with h5py.File(path, "a") as h5:
        change(h5)
    return path


def replace_frames(h5, data):
    del h5["frames"]
    h5["frames"] = data


BAD_FILES = {
    "missing frames": (lambda h5: h5.__delitem__("frames"), "no 'frames' dataset"),
    "wrong dtype": (
        lambda h5: replace_frames(h5, np.zeros((1600, 64, 64, 3), np.float32)),
        r"'frames' must be uint8 \(N, H, W, 3\), got float32",
    ),
    "wrong shape": (
        lambda h5: replace_frames(h5, np.zeros((1600, 64, 64), np.uint8)),
        r"'frames' must be uint8 \(N, H, W, 3\), got uint8 \(1600, 64, 64\)",
    ),
}


@pytest.mark.parametrize("case", [*BAD_FILES, "truncated", "not hdf5", "missing"])
def test_bad_files_name_the_path(case, tmp_path, fixture_file):
    path = tmp_path / "bad.h5"
    if case in BAD_FILES:
        change, message = BAD_FILES[case]
        bad_frames(path, fixture_file, change)
    elif case == "truncated":
        data = fixture_file.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        message = "not an HDF5 file or damaged .*truncated file"
    elif case == "not hdf5":
        path.write_text("frame,pixels\n")
        message = "not an HDF5 file or damaged"
    else:
        message = "no such file"
    for load in (FrameDataset, load_frames, lambda p: MixedFrames(fixture_file, p)):
        with pytest.raises(UsageError, match=f"^{path}: .*{message}"):
            load([fixture_file, path])


def test_bad_arguments(fixture_file, tmp_path):
    fake = synthetic_file(tmp_path / "fake.h5", np.zeros((4, 64, 64, 3), np.uint8))
    with pytest.raises(UsageError, match=f"^{fake}: a synthetic file has no train split"):
        FrameDataset([fixture_file, fake], split="train")
    assert len(FrameDataset([fixture_file, fake], split="all")) == 1604
    with pytest.raises(UsageError, match="split must be one of all, train, holdout .*'test'"):
        load_frames(fixture_file, split="test")
    small = synthetic_file(tmp_path / "small.h5", np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(UsageError, match=rf"^{small}: frames are \(32, 32\), .* \(64, 64\)"):
        FrameDataset([fixture_file, small])
    with pytest.raises(UsageError, match=rf"^{small}: synthetic frames are \(32, 32\)"):
        MixedFrames(fixture_file, small)
    empty = synthetic_file(tmp_path / "empty.h5", np.zeros((0, 64, 64, 3), np.uint8))
    with pytest.raises(UsageError, match=f"^{empty}: no synthetic frames to mix in"):
        MixedFrames(fixture_file, empty, synthetic_fraction=0.1)
    with pytest.raises(UsageError, match="give at least one frame file"):
        load_frames([])
