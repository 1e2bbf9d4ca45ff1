"""carsynth.data: frames, episodes, windows, transitions, workers, ranks, splits, mixing, bad files.

Known answers come from h5py directly (the fixture's raw ``frames``), not through carsynth's reader.
"""

from __future__ import annotations

import math
import pickle
import shutil
import warnings

import h5py
import numpy as np
import pytest
import torch
from conftest import FIXTURE
from torch.utils.data import DataLoader, DistributedSampler

from carsynth import storage
from carsynth.data import (
    ChunkBatchSampler,
    FrameDataset,
    MixedFrames,
    TransitionDataset,
    WindowDataset,
    load_episodes,
    load_frames,
    to_float,
)
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


# ----------------------------------------------------------------------------- sequences
LENGTHS = (5, 7, 0, 3)  # steps per episode; the episode with 7 steps is the holdout one


def v2_episode(e: int, steps: int) -> storage.Episode:
    """Episode ``e``: observation t has every pixel 10 e + t, action t is (e, t, 0), reward t is
    e + t / 100, terminated on its last step; so a window or transition shows where it came from."""
    observations = (10 * e + np.arange(steps + 1, dtype=np.uint8))[:, None, None, None]
    actions = np.stack([np.full(steps, e), np.arange(steps), np.zeros(steps)], axis=1)
    return storage.Episode(
        seed=e, observations=np.broadcast_to(observations, (steps + 1, 8, 8, 3)).copy(),
        actions=actions.astype(np.float32), rewards=(e + np.arange(steps) / 100).astype(np.float32),
        terminations=np.arange(steps) == steps - 1, truncations=np.zeros(steps, bool),
        holdout=e == 1,
    )  # fmt: skip


@pytest.fixture(scope="module")
def v2_file(tmp_path_factory):
    """A small schema-2 real file made on the fly (the shipped fixture is schema 1)."""
    path = tmp_path_factory.mktemp("v2") / "v2.h5"
    storage.create_frame_file(path, kind="real", frame_size=(8, 8), action_dim=3, attrs={})
    storage.append_episodes(path, [v2_episode(e, n) for e, n in enumerate(LENGTHS)])
    return path


def test_episodes_as_numpy_and_torch(v2_file):
    episodes = list(load_episodes(v2_file))
    assert [len(e) for e in episodes] == list(LENGTHS)
    for e, episode in enumerate(episodes):
        expected = v2_episode(e, LENGTHS[e])
        np.testing.assert_array_equal(episode.observations, expected.observations)  # T + 1
        np.testing.assert_array_equal(episode.actions, expected.actions)
        assert (episode.seed, episode.holdout) == (e, e == 1)
    (held,) = load_episodes(v2_file, split="holdout", as_torch=True)
    assert held.observations.shape == (8, 3, 8, 8) and held.observations.dtype == torch.float32
    np.testing.assert_allclose(held.observations[:, 0, 0, 0].numpy(), (10 + np.arange(8)) / 255)
    assert held.actions.shape == (7, 3) and held.terminations.dtype == torch.bool
    (raw_held,) = load_episodes(v2_file, split="holdout", as_torch=True, dtype="uint8")
    assert raw_held.observations.dtype == torch.uint8
    assert torch.equal(to_float(raw_held.observations), held.observations)


def test_windows_stay_inside_one_episode(v2_file):
    windows = WindowDataset(v2_file, steps=3)
    # An episode of T steps holds T + 1 - 3 windows of 3 steps (4 observations); T = 0 none.
    assert len(windows) == sum(max(n + 1 - 3, 0) for n in LENGTHS) == 9
    loader = DataLoader(
        windows, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    seen = []
    for batch in loader:
        assert batch["observations"].shape[1:] == (4, 3, 8, 8) and batch["actions"].shape[1:] == (
            3,
            3,
        )
        values = (batch["observations"][:, :, 0, 0, 0] * 255).round().long()  # 10 e + t
        episode, t = values // 10, values % 10
        assert (episode == episode[:, :1]).all(), "a window crossed an episode boundary"
        assert (t[:, 1:] - t[:, :-1] == 1).all()
        # action t of the window was taken on observation t: same episode and step
        assert torch.equal(batch["actions"][:, :, 0].long(), episode[:, :3])
        assert torch.equal(batch["actions"][:, :, 1].long(), t[:, :3])
        seen += [(int(e), int(s)) for e, s in zip(episode[:, 0], t[:, 0], strict=True)]
    assert sorted(seen) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (3, 0)]
    assert len(WindowDataset(v2_file, steps=3, stride=3)) == 1 + 2 + 0 + 1
    assert len(WindowDataset(v2_file, steps=3, split="holdout")) == 5


def test_windows_with_workers_and_ranks_are_seeded_and_disjoint(v2_file):
    windows = WindowDataset(v2_file, steps=2, dtype="uint8")
    ranks = [list(DistributedSampler(windows, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(len(windows)))  # each window on one rank
    assert ranks[0] == list(DistributedSampler(windows, num_replicas=2, rank=0, seed=3))

    def batches(workers):
        loader = DataLoader(
            windows, batch_size=2, sampler=DistributedSampler(windows, 2, 0, seed=3),
            num_workers=workers,
        )  # fmt: skip
        return [b["observations"] for b in loader]

    single, parallel = batches(0), batches(2)
    assert single[0].dtype == torch.uint8
    assert all(torch.equal(a, b) for a, b in zip(single, parallel, strict=True))


def test_transitions_count_every_step(v2_file, fixture_file, raw):
    transitions = TransitionDataset(v2_file)
    assert len(transitions) == sum(LENGTHS) == 15
    batch = next(iter(DataLoader(transitions, batch_size=15)))
    observation = (batch["observation"][:, 0, 0, 0] * 255).round().long()
    following = (batch["next_observation"][:, 0, 0, 0] * 255).round().long()
    assert torch.equal(following, observation + 1)  # the next observation of the same episode
    episode, t = observation // 10, observation % 10
    assert torch.equal(batch["action"][:, 1].long(), t) and torch.equal(
        batch["action"][:, 0].long(), episode
    )
    np.testing.assert_allclose(batch["reward"].numpy(), (episode + t / 100).numpy(), rtol=1e-6)
    last = t == torch.tensor([LENGTHS[e] - 1 for e in episode])
    assert torch.equal(batch["terminated"], last) and not batch["truncated"].any()
    assert last.sum() == 3  # every episode's last step is a transition (v1 loses it)
    assert len(TransitionDataset(v2_file, split="train")) == 8

    with pytest.warns(UserWarning, match="schema version 1 .* one transition fewer"):
        old = TransitionDataset(fixture_file)
    assert len(old) == 1600 - 8
    # Episode 0 gives transitions 0..198 (its step 199 has no next frame); 199 is episode 1's first.
    np.testing.assert_array_equal(old[198]["next_observation"].numpy(), as_tensors(raw[[199]])[0])
    np.testing.assert_array_equal(old[199]["observation"].numpy(), as_tensors(raw[[200]])[0])


def test_sequences_refuse_synthetic_files(tmp_path):
    fake = synthetic_file(tmp_path / "fake.h5", np.zeros((4, 8, 8, 3), np.uint8))
    for load in (
        lambda p: WindowDataset(p, 2),
        TransitionDataset,
        lambda p: list(load_episodes(p)),
    ):
        with pytest.raises(UsageError, match=f"^{fake}: a synthetic file has no episodes"):
            load(fake)


# ----------------------------------------------------------------------- fast frame loading
def test_uint8_items_and_batched_reads_match_single_reads(fixture_file, raw):
    dataset = FrameDataset(fixture_file, split="train", dtype="uint8")
    item = dataset[600]  # train item 600 is frame 800 (after the holdout episode)
    assert item.dtype == torch.uint8 and item.shape == (3, 64, 64)
    np.testing.assert_array_equal(item.permute(1, 2, 0).numpy(), raw[800])
    indices = [5, 1399, 5, 600, 0, 7, 8]  # any order, repeats, across the split's gap
    batch = torch.stack(dataset.__getitems__(indices))
    np.testing.assert_array_equal(batch.numpy(), torch.stack([dataset[i] for i in indices]).numpy())
    np.testing.assert_array_equal(
        to_float(batch).numpy(), as_tensors(raw[[5, 1599, 5, 800, 0, 7, 8]])
    )
    with pytest.raises(UsageError, match="dtype must be one of float32, uint8"):
        FrameDataset(fixture_file, dtype="float16")


def train_rows(items) -> np.ndarray:
    """File rows of the fixture's train items (the holdout episode, rows 600..799, is skipped)."""
    items = np.asarray(items)
    return np.where(items < 600, items, items + 200)


def test_chunk_batch_sampler_covers_each_frame_once_in_whole_chunks(fixture_file, raw):
    dataset = FrameDataset(fixture_file, split="train", dtype="uint8")
    whole = ChunkBatchSampler(dataset, batch_size=64, seed=0, num_replicas=1, rank=0, mix=1)
    batches = list(whole)
    assert len(batches) == len(whole) == 22 and all(len(b) == 64 for b in batches[:-1])
    items = np.concatenate(batches)
    assert sorted(items) == list(range(1400))
    rows = train_rows(items).reshape(-1, 8)
    assert (rows[:, 0] % storage.FRAME_CHUNK == 0).all() and (np.diff(rows, axis=1) == 1).all()
    assert not np.array_equal(items, np.arange(1400))  # chunks in random order

    # mix=4: the frames of each 4 batches (256 frames: 32 whole chunks) shuffled among them.
    sampler = ChunkBatchSampler(dataset, batch_size=64, seed=0, num_replicas=1, rank=0, mix=4)
    items = np.concatenate(list(sampler))
    assert sorted(items) == list(range(1400))
    for group in np.split(train_rows(items), range(256, 1400, 256)):
        chunks, counts = np.unique(group // 8, return_counts=True)
        assert len(group) < 256 or (len(chunks) == 32 and (counts == 8).all())
    assert len(np.unique(train_rows(items[:64]) // 8)) > 16  # a batch mixes many chunks
    np.testing.assert_array_equal(
        items, np.concatenate(list(ChunkBatchSampler(dataset, 64, mix=4)))
    )
    sampler.set_epoch(1)
    assert not np.array_equal(items, np.concatenate(list(sampler)))  # a new order each epoch
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2)
    for batch, indices in zip(loader, sampler, strict=True):
        np.testing.assert_array_equal(batch.permute(0, 2, 3, 1).numpy(), raw[train_rows(indices)])
    ranks = [np.concatenate(list(ChunkBatchSampler(dataset, 64, 0, 2, r))) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and not set(ranks[0]) & set(ranks[1])


def test_forced_synthetic_file_warns_once(tmp_path, fixture_file):
    path = tmp_path / "forced.h5"
    storage.create_frame_file(
        path, kind="synthetic", frame_size=(64, 64), action_dim=None,
        attrs={"validation_passed": False, "forced": True},
    )  # fmt: skip
    storage.append_frames(path, np.zeros((4, 64, 64, 3), np.uint8))
    with pytest.warns(
        UserWarning, match="forced.h5: its frames failed validation and were written with --force"
    ):
        MixedFrames(fixture_file, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second load of the same file stays quiet
        FrameDataset(path)
        load_frames(path)
        FrameDataset(fixture_file)  # and a passing or real file never warns
