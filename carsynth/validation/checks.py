"""``carsynth validate``: are generated frames what new real episodes would look like?

Four calibrated tests judge generated frames against the real file's episodes (see
:mod:`carsynth.validation.gate`): NDB bin shares with episode-cluster-robust variance, sharpness
(noise, blur, dimming), collapse (repeated frames) and copying (training frames), each against a
null distribution from resampled real episodes at the generated set's own size, at level
``level / 4`` (so a perfect generator fails at most ``level`` of the time). Density and
coverage (Naeem et al. 2020) are reported beside them. Below the size at which the NDB test can
tell a perfect generator from one that drops a third of the modes, validation refuses to decide.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from carsynth import storage
from carsynth.errors import UsageError
from carsynth.flags import option
from carsynth.progress import Progress

# The metrics (and torch) are imported where they are used: building the CLI parser reads
# ValidationConfig, and `carsynth info` should not pay for importing torch.
if TYPE_CHECKING:
    from carsynth.validation.gate import GateResult, RealReference

SPACES = ("pixels", "pca")  # carsynth.metrics.neighbours.SPACES, checked equal in the tests


@dataclass
class ValidationConfig:
    """Every setting of ``validate``, with its default."""

    level: float = option(
        0.05, "the gate's false-reject rate for a perfect generator (each of 4 tests: level/4)"
    )
    reps: int = option(500, "null replicates per test (at least 8/level)")
    power: float = option(
        0.9, "refuse fewer frames than give this power against dropping a third of the modes"
    )
    k: int = option(100, "NDB: K-means bins")
    alpha: float = option(0.05, "NDB/K (reported): a bin differs below this two-sided p-value")
    seed: int = option(0, "seeds every subsample, K-means, PCA and null replicate")
    ndb_resolution: int = option(32, "NDB: frames are area-averaged to this size for K-means")
    ndb_fit_samples: int = option(10_000, "NDB: at most this many training frames fit K-means")
    kmeans_iters: int = option(30, "NDB: at most this many Lloyd iterations")
    space: str = option("pca", "neighbour space: pca (default) or pixels (exact, slow)")
    nn_resolution: int = option(32, "pca space: frames are area-averaged to this size first")
    pca_dims: int = option(64, "pca space: principal components kept")
    pca_fit_samples: int = option(5000, "neighbour space: training frames it is fitted on")
    reference_frames: int = option(
        5000, "copying: real frames (across episodes) whose distance to training is the reference"
    )
    copy_quantile: float = option(
        0.05, "copying: a copy is nearer to training than this quantile of new real frames"
    )
    density_k: int = option(5, "density and coverage (reported): k-th neighbour radius")
    pairs: int = option(32, "report: closest generated/training pairs in the grid")
    device: str | None = option(None, "torch device (default: cuda when available, else cpu)")

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise UsageError(f"--space must be one of {', '.join(SPACES)}, got {self.space!r}")
        for name in ("level", "power", "alpha", "copy_quantile"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise UsageError(f"--{name.replace('_', '-')} must be in (0, 1)")
        self._check_ranges()
        if self.device is not None:
            from carsynth.devices import resolve_device

            resolve_device(self.device)  # a UsageError naming --device, before any work

    def _check_ranges(self) -> None:
        """A setting that would switch a check off (0 PCA dimensions, a 0-pixel resolution, too
        few null replicates for the level) is a UsageError naming its flag."""
        at_least = {
            "k": 2, "ndb_resolution": 4, "ndb_fit_samples": 2, "kmeans_iters": 1,
            "nn_resolution": 4, "pca_dims": 1, "pca_fit_samples": 2, "reference_frames": 2,
            "density_k": 1, "pairs": 1, "seed": 0, "reps": math.ceil(8 / self.level),
        }  # fmt: skip
        for name, least in at_least.items():
            if getattr(self, name) < least:
                raise UsageError(f"--{name.replace('_', '-')} must be at least {least}, "
                                 f"got {getattr(self, name)}")  # fmt: skip
        if self.k > self.ndb_fit_samples:
            raise UsageError(
                f"--k {self.k}: more than --ndb-fit-samples {self.ndb_fit_samples} "
                f"(K-means needs at least K frames to fit)"
            )
        for name in ("ndb_resolution", "nn_resolution"):
            if getattr(self, name) > 512:
                raise UsageError(f"--{name.replace('_', '-')} must be at most 512")
        if self.pca_dims > 3 * self.nn_resolution**2:
            raise UsageError(
                f"--pca-dims {self.pca_dims}: more than the {3 * self.nn_resolution**2} pixel "
                f"values of a {self.nn_resolution}x{self.nn_resolution} frame"
            )


@dataclass
class ValidationResult:
    """The gate's tests and reported measures, and the closest generated/training pairs."""

    config: ValidationConfig
    num_train: int
    num_holdout: int
    num_fake: int
    gate: GateResult
    seconds: dict[str, float]
    closest_fake: np.ndarray = field(repr=False)  # uint8 (P, H, W, 3)
    closest_train: np.ndarray = field(repr=False)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        """One line per failed test: statistic, the real-data band and the p-value."""
        return self.gate.failures

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: verdict, failures, settings, counts, each test's statistic, null quantiles
        and p-value, density and coverage, per-bin tables."""
        return {
            "passed": self.passed,
            "failures": self.failures,
            "sources": self.sources,
            "config": dataclasses.asdict(self.config),
            "frames": {"train": self.num_train, "holdout": self.num_holdout, "fake": self.num_fake},
            **self.gate.to_dict(),
            "seconds": self.seconds,
        }

    def summary(self) -> str:
        """The table ``carsynth validate`` prints."""
        from carsynth.validation.report import summary_table

        return summary_table(self)


def _check_inputs(arrays: dict[str, np.ndarray], k: int) -> None:
    """UsageError naming the input unless all are non-empty uint8 frames of one size and the
    training set has at least ``k`` frames."""
    sizes = {}
    for name, x in arrays.items():
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
            raise UsageError(f"{name}: expected uint8 frames (N, H, W, 3), got {x.dtype} {x.shape}")
        if len(x) < 2:
            raise UsageError(f"{name}: {len(x)} frames, need at least 2")
        sizes[name] = x.shape[1:3]
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {h}x{w}" for name, (h, w) in sizes.items())
        raise UsageError(f"frame sizes differ: {listed}")
    train_name, train = next(iter(arrays.items()))
    if len(train) < k:
        raise UsageError(f"{train_name}: {len(train)} frames, too few for K={k} bins (lower --k)")


def validate_frames(
    train: np.ndarray,
    train_episodes: np.ndarray,
    holdout: np.ndarray,
    holdout_episodes: np.ndarray,
    fake: np.ndarray,
    config: ValidationConfig | None = None,
    progress: bool = False,
    fake_episodes: np.ndarray | None = None,
) -> ValidationResult:
    """Judge generated frames against real episodes with the calibrated gate.

    ``train``/``holdout`` are real frames (training split and held-out split) with each frame's
    episode id (``*_episodes``, int (N,)); ``fake`` generated frames, independent unless
    ``fake_episodes`` gives theirs (a real file judged as if generated). All uint8
    (N, H, W, 3) of one size. Bad input, or fewer generated frames than the gate can judge,
    raises :class:`UsageError`. The same as :func:`judge_frames` on :func:`fit_reference`.
    """
    k = (config or ValidationConfig()).k
    _check_inputs({"train": train, "holdout": holdout, "fake": fake}, k)  # before the fit
    _check_episodes({"fake": (fake, fake_episodes)})
    reference = fit_reference(train, train_episodes, holdout, holdout_episodes, config, progress)
    return judge_frames(reference, fake, fake_episodes, progress)


def fit_reference(
    train: np.ndarray,
    train_episodes: np.ndarray,
    holdout: np.ndarray,
    holdout_episodes: np.ndarray,
    config: ValidationConfig | None = None,
    progress: bool = False,
) -> RealReference:
    """Everything the gate derives from the real frames (bins, neighbour space, the tests'
    real-data references and the minimum generated size), for :func:`judge_frames` to judge
    any number of generated sets with; arguments as :func:`validate_frames`'s."""
    from carsynth.metrics.ndb import NDBBins
    from carsynth.metrics.neighbours import neighbour_space
    from carsynth.validation.gate import RealReference

    config = config or ValidationConfig()
    _check_inputs({"train": train, "holdout": holdout}, config.k)
    _check_episodes({"train": (train, train_episodes), "holdout": (holdout, holdout_episodes)})
    with Progress(2, desc="fit real", unit="steps", mode="auto" if progress else "off") as bar:
        t = time.perf_counter()
        bins = NDBBins.fit(
            train, config.k, config.seed, max_fit_samples=config.ndb_fit_samples,
            iters=config.kmeans_iters, resolution=config.ndb_resolution, device=config.device,
        )  # fmt: skip
        space = neighbour_space(
            train, config.space, resolution=config.nn_resolution, dims=config.pca_dims,
            fit_samples=config.pca_fit_samples, seed=config.seed, device=config.device,
        )  # fmt: skip
        fitted = time.perf_counter()
        bar.update()
        reference = RealReference(train, train_episodes, holdout, holdout_episodes, bins, space,
                                  config)  # fmt: skip
        bar.update()
    reference.seconds = {"fit": round(fitted - t, 3),
                         "reference": round(time.perf_counter() - fitted, 3)}  # fmt: skip
    return reference


def judge_frames(
    reference: RealReference,
    fake: np.ndarray,
    fake_episodes: np.ndarray | None = None,
    progress: bool = False,
) -> ValidationResult:
    """The gate's verdict on generated frames ``fake`` against a :func:`fit_reference`;
    ``fake_episodes`` as in :func:`validate_frames`. Frames of another size than the real ones,
    or fewer than the gate can judge, raise :class:`UsageError`."""
    train, holdout = reference.train, reference.holdout
    _check_inputs({"train": train, "holdout": holdout, "fake": fake}, reference.config.k)
    _check_episodes({"fake": (fake, fake_episodes)})
    with Progress(1, desc="validate", unit="checks", mode="auto" if progress else "off") as bar:
        t = time.perf_counter()
        gate = reference.judge(fake, fake_episodes)
        bar.update()
    seconds = {**reference.seconds, "tests": round(time.perf_counter() - t, 3)}
    seconds["total"] = round(sum(seconds.values()), 3)
    fake_index, train_index = gate.copying.closest_pairs(reference.config.pairs)
    return ValidationResult(
        config=reference.config,
        num_train=len(train),
        num_holdout=len(holdout),
        num_fake=len(fake),
        gate=gate,
        seconds=seconds,
        closest_fake=fake[fake_index],
        closest_train=train[train_index],
    )


def _check_episodes(sets: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> None:
    """UsageError unless every given episode-id array has one id per frame."""
    for name, (frames, episodes) in sets.items():
        if episodes is not None and np.shape(episodes) != (len(frames),):
            raise UsageError(
                f"{name}: {np.shape(episodes)} episode ids for {len(frames)} frames (one per frame)"
            )
    if "train" in sets and len(np.unique(sets["train"][1])) < 2:
        raise UsageError("train: needs frames of at least 2 episodes to estimate a variance")


REPORT_FILES = (
    "report.json", "ndb_bins.png", "nn_distances.png", "closest_pairs.png", "report.html",
)  # fmt: skip


def check_report_dir(report_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a report folder that holds a report already (unless ``overwrite``) or is a file."""
    report_dir = Path(report_dir)
    if report_dir.exists() and not report_dir.is_dir():
        raise UsageError(f"{report_dir}: exists and is not a folder")
    if not report_dir.parent.is_dir():
        raise UsageError(f"{report_dir}: folder {report_dir.parent} does not exist")
    folder = report_dir if report_dir.exists() else report_dir.parent
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{report_dir}: folder {folder} is not writable")
    existing = [name for name in REPORT_FILES if (report_dir / name).exists()]
    if existing and not overwrite:
        raise UsageError(f"{report_dir} holds {existing[0]}; pass --overwrite to replace it")
    return report_dir


def write_report(
    result: ValidationResult, report_dir: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write report.json and the figures into ``report_dir`` (created), each file atomically.

    Figures: ``ndb_bins.png`` (bin proportions, different bins marked), ``nn_distances.png``
    (nearest-neighbour distance histograms with the thresholds) and ``closest_pairs.png`` (the
    generated frames nearest to a training frame, each beside that training frame, labelled
    with their distance). ``report.html`` shows all of it on one self-contained page.
    """
    from carsynth import report_html
    from carsynth.validation import report

    report_dir = check_report_dir(report_dir, overwrite)
    report_dir.mkdir(exist_ok=True)
    report.write_json(result.to_dict(), report_dir / "report.json")
    gate = result.gate
    report.plot_bins(gate.ndb, result.config.alpha, report_dir / "ndb_bins.png")
    report.plot_distances(gate.collapse, gate.copying, report_dir / "nn_distances.png")
    distances = np.sort(gate.copying.fake_distances)[: len(result.closest_fake)]
    report.save_pairs(result.closest_fake, result.closest_train, report_dir / "closest_pairs.png",
                      distances, gate.copying.threshold)  # fmt: skip
    report_html.write_validation_page(report_dir)
    return report_dir


def real_splits(f: storage.FrameFile) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training frames, their episode ids, held-out frames and theirs, of a real file.

    THE split (``FrameFile.split_ranges``): the file's holdout episodes, whole episodes because
    consecutive frames of one episode are near-duplicates. A file without any is a UsageError:
    there is no honest held-out set to judge generated frames against.
    """
    if f.kind != "real" or f.episodes is None:
        raise UsageError(f"{f.path}: --real must be a real frame file, this one is {f.kind}")
    ranges = f.split_ranges()
    if not ranges["holdout"]:
        raise UsageError(
            f"{f.path}: no holdout episodes to validate against; collect with --holdout F "
            f"(or validate a run's samples with carsynth export, which uses the split that "
            f"train --holdout F chose)"
        )
    train, holdout = ranges["train"], ranges["holdout"]
    return (f.read_ranges(train), storage.episode_ids(train), f.read_ranges(holdout),
            storage.episode_ids(holdout))  # fmt: skip


def validate_files(
    real: str | os.PathLike,
    fake: str | os.PathLike,
    report_dir: str | os.PathLike | None = None,
    config: ValidationConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ValidationResult:
    """Validate the frames of ``fake`` against the real file ``real``; optionally write a report.

    The real file's holdout episodes are the held-out set (see :func:`real_splits`). When
    ``fake`` is a real file, its episode table is used (its episodes are the independent units).
    The report folder is checked before any work, so a refused ``--report`` costs nothing.
    """
    config = config or ValidationConfig()
    if report_dir is not None:
        check_report_dir(report_dir, overwrite)
    with storage.open_frame_file(real) as f:
        train, train_episodes, holdout, holdout_episodes = real_splits(f)
    with storage.open_frame_file(fake) as f:
        generated = f.read("all")
        # A real file judged as if generated: its episodes, not its frames, are independent.
        fake_episodes = storage.episode_ids(f.frame_ranges("all")) if f.kind == "real" else None
    _check_inputs(
        {
            f"{real} (training split)": train,
            f"{real} (holdout split)": holdout,
            str(fake): generated,
        },
        config.k,
    )
    result = validate_frames(train, train_episodes, holdout, holdout_episodes, generated, config,
                             progress, fake_episodes)  # fmt: skip
    result.sources = {
        "real": str(real),
        "fake": str(fake),
        "holdout": "holdout episodes of the file",
    }
    if report_dir is not None:
        write_report(result, report_dir, overwrite)
    return result
