"""``carsynth convert --to minari``: a real frame file as a Minari dataset.

Minari (Farama's offline-RL dataset standard) stores one episode per group: T + 1 observations,
T actions, rewards, terminations and truncations, which is what a schema-2 carsynth episode holds.
The conversion writes one Minari episode per carsynth episode (in file order, with its seed) and
keeps every transition, losslessly (no JPEG encoding of the frames). A version-1 file has no final
observations: each episode then loses its last step, with a warning.

The dataset's env spec recreates what was recorded: the file's env (the fast renderer's id when it
was used; it draws the same frames) with its settings (``domain_randomize``,
``lap_complete_percent``, ``max_steps``) and the frame processing as the wrapper
:class:`carsynth.collect.frames.RecordedFrames` (size, HUD crop, zoom-in skip, frame skip), so
``minari.load_dataset(ID).recover_environment()`` gives the recorded 64x64 observations.

Minari is an optional extra: ``pip install carsynth[minari]``. Datasets go where Minari puts them
(``MINARI_DATASETS_PATH``, default ``~/.minari/datasets``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import EnvSpec, WrapperSpec

from carsynth.collect.frames import EnvSettings
from carsynth.errors import UsageError
from carsynth.flags import option, required
from carsynth.storage import Episode, FrameFile, open_frame_file

FORMATS = ("minari",)


@dataclass
class ConvertConfig:
    """Every setting of ``carsynth convert`` (the CLI flags map one to one onto these fields)."""

    source: str = required("real frame file to convert", positional=True)
    dataset_id: str = required("Minari dataset id, (namespace/)name-vN, e.g. carsynth/pilot-v0")
    to: str = option("minari", "output format", choices=FORMATS)
    split: str = option("all", "episodes to convert", choices=("all", "train", "holdout"))
    overwrite: bool = option(False, "replace an existing dataset with this id")


def _minari() -> Any:
    """The minari module, or a UsageError saying how to install it."""
    try:
        import minari
    except ImportError:
        raise UsageError(
            "converting to Minari needs the minari package: pip install 'carsynth[minari]'"
        ) from None
    return minari


def recorded_env_spec(attrs: dict[str, Any]) -> EnvSpec:
    """The gymnasium EnvSpec of the env a real file was recorded from, frame processing included."""
    settings = EnvSettings(
        attrs["env_id"],
        bool(attrs["domain_randomize"]),
        float(attrs["lap_complete_percent"]),
        int(attrs["max_steps"]),
        attrs.get("renderer", "stock"),
    )
    spec = gym.spec(settings.resolved_id)
    kwargs = dict(spec.kwargs)
    if settings.is_car_racing:
        kwargs.update(
            domain_randomize=settings.domain_randomize,
            lap_complete_percent=settings.lap_complete_percent,
        )
    height, width = attrs["frame_size"]
    if height != width:
        raise UsageError(f"frames are {height}x{width}; RecordedFrames makes square frames")
    frames = WrapperSpec(
        "RecordedFrames",
        "carsynth.collect.frames:RecordedFrames",
        {
            "size": int(height),
            "crop_hud": bool(attrs["crop_hud"]),
            "skip_frames": int(attrs["skip_frames"]),
            "frame_skip": int(attrs.get("frame_skip", 1)),
        },
    )
    return dataclasses.replace(
        spec, kwargs=kwargs, max_episode_steps=settings.max_steps, additional_wrappers=(frames,)
    )


def _buffer(episode: Episode, index: int, complete: bool) -> Any:
    """A carsynth episode as Minari's EpisodeBuffer (the last step dropped when incomplete)."""
    from minari.data_collector.episode_buffer import EpisodeBuffer

    steps = len(episode) if complete else max(len(episode) - 1, 0)
    return EpisodeBuffer(
        id=index,
        seed=episode.seed,
        observations=episode.observations[: steps + 1],
        actions=episode.actions[:steps],
        rewards=episode.rewards[:steps].tolist(),
        terminations=episode.terminations[:steps].tolist(),
        truncations=episode.truncations[:steps].tolist(),
        infos={},
    )


def _check_source(frame_file: FrameFile) -> None:
    if frame_file.kind != "real":
        raise UsageError(f"{frame_file.path}: a {frame_file.kind} file has no episodes to convert")
    missing = [
        k for k in ("env_id", "max_steps", "skip_frames", "crop_hud") if k not in frame_file.attrs
    ]
    if missing:
        raise UsageError(f"{frame_file.path}: no collection settings ({', '.join(missing)})")
    if not frame_file.final_observations:
        warnings.warn(
            f"{frame_file.path}: schema version 1 stores no final observation, so each Minari "
            "episode loses its last step; collect again for schema version 2",
            UserWarning,
            stacklevel=3,
        )


def to_minari(
    source: str | os.PathLike,
    dataset_id: str,
    split: str = "all",
    overwrite: bool = False,
) -> Any:
    """Convert the episodes of ``split`` of a real frame file into Minari dataset ``dataset_id``.

    Returns the ``minari.MinariDataset``. Raises :class:`UsageError` (nothing written) for a
    synthetic or bad file, an unknown split, a malformed id, or an existing dataset without
    ``overwrite``; a conversion that fails part-way removes what it wrote.
    """
    minari = _minari()
    from minari.dataset.minari_dataset import parse_dataset_id
    from minari.storage import get_dataset_path

    if split not in ("all", "train", "holdout"):
        raise UsageError(f"--split must be all, train or holdout, got {split!r}")
    try:
        parse_dataset_id(dataset_id)
    except ValueError as error:
        raise UsageError(f"--dataset-id {dataset_id!r}: {error}") from None
    with open_frame_file(source) as frame_file:
        _check_source(frame_file)
        spec = recorded_env_spec(frame_file.attrs)
        rows = np.flatnonzero(frame_file.episode_mask(split))
        if not len(rows):
            raise UsageError(f"{source}: no episodes in split {split!r} to convert")
        folder = get_dataset_path(dataset_id)
        if folder.exists():
            if not overwrite:
                raise UsageError(f"Minari dataset {dataset_id} exists ({folder}); pass --overwrite")
            shutil.rmtree(folder)
        complete = frame_file.final_observations
        buffers = (
            _buffer(frame_file.episode(int(row)), index, complete) for index, row in enumerate(rows)
        )
        try:
            dataset = _create(minari, dataset_id, next(buffers), spec, frame_file)
            for buffer in buffers:  # one episode in memory at a time
                dataset.update_dataset_from_buffer([buffer])
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # nothing half-written stays
            raise
    return dataset


def _create(minari: Any, dataset_id: str, buffer: Any, spec: EnvSpec, frame_file: FrameFile) -> Any:
    """A new Minari dataset holding its first episode, with the recorded env and provenance."""
    env = gym.make(spec)
    settings = json.dumps({k: frame_file.attrs[k] for k in sorted(frame_file.attrs)}, default=str)
    try:
        with warnings.catch_warnings():
            # carsynth records provenance in the description; Minari's advice to add an author, an
            # email and a code link would be noise on every conversion.
            warnings.filterwarnings(
                "ignore", message=r"`(code_permalink|author|author_email)` is set"
            )
            return minari.create_dataset_from_buffers(
                dataset_id=dataset_id,
                buffer=[buffer],
                env=spec,
                eval_env=spec,
                observation_space=env.observation_space,
                action_space=env.action_space,
                algorithm_name=f"carsynth collect --policy {frame_file.attrs.get('policy')}",
                description=(
                    f"Converted by carsynth from {Path(frame_file.path).name} (schema version "
                    f"{frame_file.version}); collection settings: {settings}"
                ),
                jpeg_encoding=False,  # lossless: the observations are the file's bytes
            )
    finally:
        env.close()


def convert(config: ConvertConfig) -> Any:
    """``carsynth convert``: the API call behind the command (one format so far: Minari)."""
    if config.to not in FORMATS:
        raise UsageError(f"--to {config.to}: unknown format; choose {', '.join(FORMATS)}")
    return to_minari(config.source, config.dataset_id, config.split, config.overwrite)
