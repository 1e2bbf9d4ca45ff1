"""carsynth.frame_cache through the datasets: cached reads equal the file's, the cache is reused
until its file changes, builds are whole or invisible and built once, and a folder that cannot be
written costs one warning and nothing else."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import signal
import time
import warnings

import numpy as np
import pytest
import torch
from conftest import FIXTURE
from test_data import LENGTHS, v2_episode
from torch.utils.data import DataLoader

from carsynth import data, frame_cache, storage
from carsynth.data import ChunkBatchSampler, FrameDataset, TransitionDataset, WindowDataset


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """carsynth.data warns once per file and process: keep this file's warnings to itself, so a
    later test that expects the fixture's version-1 warning still sees it."""
    monkeypatch.setattr(data, "_warned", set())


@pytest.fixture
def v2_file(tmp_path):
    """A small schema-2 real file (pixel values say episode and step), its own copy per test."""
    path = tmp_path / "v2.h5"
    storage.create_frame_file(path, kind="real", frame_size=(8, 8), action_dim=3, attrs={})
    storage.append_episodes(path, [v2_episode(e, n) for e, n in enumerate(LENGTHS)])
    return path


def caches(folder) -> list:
    """The visible caches in ``folder`` (not lock or temporary files)."""
    return sorted(folder.glob("*.npy"))


def same_items(a, b) -> None:
    """Two items (tensors or dicts of tensors) equal in dtype and value."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            same_items(a[key], b[key])
    else:
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_cached_reads_equal_direct_reads(v2_file, tmp_path, dtype):
    folder = tmp_path / "cache"
    rng = np.random.default_rng(0)
    for make in (
        lambda cache: FrameDataset([FIXTURE, FIXTURE], split="train", dtype=dtype, cache=cache),
        lambda cache: FrameDataset(v2_file, split="holdout", dtype=dtype, cache=cache),
        lambda cache: WindowDataset(v2_file, steps=3, dtype=dtype, cache=cache),
        lambda cache: WindowDataset(FIXTURE, steps=5, stride=7, dtype=dtype, cache=cache),
        lambda cache: TransitionDataset([v2_file, v2_file], dtype=dtype, cache=cache),
    ):
        cached, direct = make(folder), make(False)
        assert cached._caches[0] is not None and direct._caches == [None] * len(direct.paths)
        assert len(cached) == len(direct)
        for i in (0, len(direct) - 1, -1):
            same_items(cached[i], direct[i])
        if hasattr(direct, "__getitems__"):  # any order, repeats, both files of a pair
            batch = rng.integers(-len(direct), len(direct), 40).tolist()
            for a, b in zip(cached.__getitems__(batch), direct.__getitems__(batch), strict=True):
                same_items(a, b)
    assert len(caches(folder)) == 2  # one per file, whatever reads it


def test_a_second_dataset_reuses_the_cache(tmp_path):
    folder = tmp_path / "cache"
    FrameDataset(FIXTURE, cache=folder)
    (cache,) = caches(folder)
    before = cache.stat()
    copy = tmp_path / "copy.h5"
    shutil.copy(FIXTURE, copy)  # same contents, another path and mtime
    os.utime(copy, (0, 0))
    for dataset in (
        FrameDataset(FIXTURE, split="holdout", cache=folder),
        TransitionDataset(FIXTURE, cache=folder),
        WindowDataset(copy, steps=4, cache=folder),
    ):
        assert dataset._caches == [cache]
        dataset[0]
    after = cache.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert caches(folder) == [cache]
    # The cache is channels-first uint8, every frame of the file in file order.
    frames = np.load(cache, mmap_mode="r")
    with storage.open_frame_file(FIXTURE) as f:
        np.testing.assert_array_equal(frames, f.read().transpose(0, 3, 1, 2))


def test_an_appended_file_gets_a_new_cache(v2_file, tmp_path):
    folder = tmp_path / "cache"
    old = FrameDataset(v2_file, dtype="uint8", cache=folder)
    (first,) = caches(folder)
    storage.append_episodes(v2_file, [v2_episode(9, 4)])
    new = FrameDataset(v2_file, dtype="uint8", cache=folder)
    assert len(new) == len(old) + 5 and len(caches(folder)) == 2
    assert new._caches[0] != first
    assert int(new[-1][0, 0, 0]) == 94  # episode 9's final observation: 10 * 9 + 4
    direct = FrameDataset(v2_file, dtype="uint8", cache=False)
    assert torch.equal(
        torch.stack(new.__getitems__(range(len(new)))), direct._read(range(len(new)))
    )
    assert torch.equal(old[-1], direct[len(old) - 1])  # the old dataset still reads its own frames


def test_a_cache_shorter_than_its_file_is_rebuilt(v2_file, tmp_path, monkeypatch):
    # A writer appended between the fingerprint and the read: the name matches, the length not.
    folder = tmp_path / "cache"
    dataset = FrameDataset(v2_file, dtype="uint8", cache=folder)
    (cache,) = caches(folder)
    np.save(cache, np.load(cache)[:-1])
    again = FrameDataset(v2_file, dtype="uint8", cache=folder)
    assert again._caches == [cache] and len(np.load(cache)) == len(dataset)
    assert torch.equal(again[-1], FrameDataset(v2_file, dtype="uint8", cache=False)[-1])


def test_a_virtual_file_cache_follows_its_shards(tmp_path):
    shards = [tmp_path / "a.h5", tmp_path / "b.h5"]
    for e, shard in enumerate(shards):
        storage.create_frame_file(shard, kind="real", frame_size=(8, 8), action_dim=3, attrs={})
        storage.append_episodes(shard, [v2_episode(e, 3)])
    merged = storage.merge(shards, tmp_path / "virtual.h5", virtual=True)
    with storage.open_frame_file(merged) as f:
        before = frame_cache.cache_path(f, tmp_path)
    storage.append_episodes(shards[1], [v2_episode(5, 3)])  # the shard changed, not the file
    with storage.open_frame_file(merged) as f:
        assert frame_cache.cache_path(f, tmp_path) != before
    cached = FrameDataset(merged, dtype="uint8", cache=tmp_path / "cache")
    assert torch.equal(
        cached._read(range(8)), FrameDataset(merged, cache=False, dtype="uint8")._read(range(8))
    )


def test_two_workers_read_every_frame_once_from_the_cache(tmp_path):
    dataset = FrameDataset(FIXTURE, split="train", dtype="uint8", cache=tmp_path / "cache")
    dataset[0]  # the parent maps the cache before the workers fork: they map their own
    state = pickle.loads(pickle.dumps(dataset)).__dict__  # spawn workers: paths, no maps
    assert state["_maps"] == {} and state["_caches"] == dataset._caches
    expected = FrameDataset(FIXTURE, split="train", dtype="uint8", cache=False)
    expected = expected._read(range(len(dataset)))

    def ordered(x):  # the frames sorted by their bytes: equal multisets give equal arrays
        flat = x.reshape(len(x), -1).numpy()
        return flat[np.lexsort(flat.T[::-1])]

    sampler = ChunkBatchSampler(dataset, batch_size=64, seed=1, num_replicas=1, rank=0)
    for loader in (
        DataLoader(dataset, batch_sampler=sampler, num_workers=2),
        DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=2),  # a tensor a batch
    ):
        batches = list(loader)
        assert [len(b) for b in batches] == [64] * 21 + [56]
        frames = torch.cat(batches)
        assert frames.shape == expected.shape == (1400, 3, 64, 64)
        np.testing.assert_array_equal(ordered(frames), ordered(expected))
    # A sequence of indices gives those items as one tensor, in order, transform applied.
    doubled = FrameDataset(FIXTURE, split="train", dtype="uint8", transform=lambda x: x // 2)
    assert torch.equal(dataset[[5, 3, 5]], expected[[5, 3, 5]])
    assert torch.equal(dataset[torch.tensor(4)], expected[4])  # a scalar is one item
    assert torch.equal(doubled[np.array([7, 0])], expected[[7, 0]] // 2)


def slow_rows(frame_file_rows, delay):
    """``FrameFile.rows`` taking ``delay`` seconds per call: a build long enough to meet."""

    def rows(self, name, index):
        time.sleep(delay)
        return frame_file_rows(self, name, index)

    return rows


def build(folder, log):
    """Build the fixture's cache in ``folder`` (a child process), noting each build in ``log``."""
    real = frame_cache._build

    def noted(frame_file, path):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        real(frame_file, path)

    frame_cache._build = noted
    with storage.open_frame_file(FIXTURE) as f:
        frame_cache.cached_frames(f, folder)


def test_concurrent_builds_build_once_and_a_killed_build_leaves_no_cache(tmp_path, monkeypatch):
    folder, log = tmp_path / "cache", tmp_path / "builds.log"
    monkeypatch.setattr(frame_cache, "BLOCK_FRAMES", 64)  # 25 blocks
    rows = storage.FrameFile.rows
    monkeypatch.setattr(storage.FrameFile, "rows", slow_rows(rows, 0.5))  # about 12 s
    fork = multiprocessing.get_context("fork")
    # SIGKILL a build early on: no cache visible, only its temporary file.
    killed = fork.Process(target=build, args=(folder, log))
    killed.start()
    deadline = time.monotonic() + 30
    while not list(folder.glob(".*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    os.kill(killed.pid, signal.SIGKILL)
    killed.join()
    assert caches(folder) == [] and len(list(folder.glob(".*.tmp"))) == 1
    # Two builders at once: one builds (and removes the killed one's file), the other waits.
    log.unlink()
    monkeypatch.setattr(storage.FrameFile, "rows", slow_rows(rows, 0.05))  # about 1.3 s
    both = [fork.Process(target=build, args=(folder, log)) for _ in range(2)]
    for p in both:
        p.start()
    for p in both:
        p.join(60)
        assert p.exitcode == 0
    assert len(log.read_text().split()) == 1, "the cache was built twice"
    assert list(folder.glob(".*.tmp")) == []
    (cache,) = caches(folder)
    with storage.open_frame_file(FIXTURE) as f:
        np.testing.assert_array_equal(np.load(cache), f.read().transpose(0, 3, 1, 2))


def test_an_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setattr(frame_cache, "BLOCK_FRAMES", 64)
    calls = []

    def interrupted(self, name, index):
        calls.append(index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return self.h5[self.names[name]][index]

    monkeypatch.setattr(storage.FrameFile, "rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        FrameDataset(FIXTURE, cache=folder)
    assert [p.name for p in folder.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize("case", ["folder is a file", "too little space", "cache deleted"])
def test_a_cache_that_cannot_be_used_warns_once_and_reads_the_file(
    case, v2_file, tmp_path, monkeypatch
):
    folder = tmp_path / "cache"
    if case == "folder is a file":  # like a read-only folder, also for root
        (tmp_path / "plain").write_text("")
        folder = tmp_path / "plain" / "cache"
    if case == "too little space":
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    direct = WindowDataset(v2_file, steps=2, dtype="uint8", cache=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        windows = WindowDataset(v2_file, steps=2, dtype="uint8", cache=folder)
        if case == "cache deleted":
            shutil.rmtree(folder)
        items = [windows[i] for i in range(len(windows))] + [windows[0]]
        FrameDataset(v2_file, cache=folder)  # one warning per file and process, not per dataset
    for a, b in zip(items, [direct[i] for i in range(len(direct))], strict=False):
        same_items(a, b)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    expected = {
        "folder is a file": f"{v2_file}: cannot write its frame cache in {folder} (",
        "too little space": "MiB are free); reading the compressed file instead (slower)",
        "cache deleted": f"{v2_file}: cannot open its frame cache (",
    }[case]
    assert expected in messages[0], messages


def test_cache_folder_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("CARSYNTH_CACHE", str(tmp_path / "env"))
    assert frame_cache.cache_folder(True) == tmp_path / "env"
    monkeypatch.delenv("CARSYNTH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert frame_cache.cache_folder(True) == tmp_path / "xdg" / "carsynth"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert frame_cache.cache_folder(True) == frame_cache.Path.home() / ".cache" / "carsynth"
    assert frame_cache.cache_folder(str(tmp_path)) == tmp_path
    assert frame_cache.cache_folder(False) is None and frame_cache.cache_folder(None) is None
