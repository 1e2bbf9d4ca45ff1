"""``carsynth validate``: do generated frames cover the real data without collapsing or copying?

Three checks, each judged against held-out real frames (what a perfect generator would produce):

1. NDB (Richardson & Weiss 2018): K-means bins on the training frames; the share of bins whose
   generated proportion differs significantly from the training proportion. The same score for
   the held-out real frames is the real-vs-real baseline; generated frames fail when their score
   exceeds the baseline by more than ``max_ndb_excess``.
2. Collapse: generated frames much nearer to each other than held-out real frames are.
3. Copying: generated frames nearer to a training frame than held-out real frames ever are.

See :mod:`carsynth.metrics.ndb` and :mod:`carsynth.metrics.neighbours` for the statistics.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from carsynth import storage
from carsynth.errors import UsageError
from carsynth.flags import option

# The metrics (and torch) are imported where they are used: building the CLI parser reads
# ValidationConfig, and `carsynth info` should not pay for importing torch.
if TYPE_CHECKING:
    from carsynth.metrics.ndb import NDBResult
    from carsynth.metrics.neighbours import CollapseResult, CopyResult

SPACES = ("pixels", "pca")  # carsynth.metrics.neighbours.SPACES, checked equal in the tests


@dataclass
class ValidationConfig:
    """Every setting and threshold of ``validate``, with its default."""

    k: int = option(100, "NDB: K-means bins")
    alpha: float = option(0.05, "NDB: significance level of each bin's two-proportion z-test")
    seed: int = option(0, "seeds every subsample, K-means and PCA")
    max_ndb_excess: float = option(
        0.10, "fail when generated NDB/K exceeds the real-vs-real NDB/K by more than this"
    )
    ndb_resolution: int = option(32, "NDB: frames are area-averaged to this size for K-means")
    ndb_fit_samples: int = option(10_000, "NDB: at most this many training frames fit K-means")
    kmeans_iters: int = option(30, "NDB: at most this many Lloyd iterations")
    space: str = option("pca", "neighbour space: pca (default) or pixels (exact, slow)")
    nn_resolution: int = option(32, "pca space: frames are area-averaged to this size first")
    pca_dims: int = option(64, "pca space: principal components kept")
    pca_fit_samples: int = option(5000, "neighbour space: training frames it is fitted on")
    min_collapse_ratio: float = option(
        0.5, "collapse: fail when median NN distance (generated / held-out) is below this"
    )
    duplicate_quantile: float = option(
        0.01, "collapse: near-duplicate = nearer than this quantile of held-out NN distances"
    )
    max_duplicate_share: float = option(
        0.05, "collapse: fail when a larger share of generated frames are near-duplicates"
    )
    copy_quantile: float = option(
        0.01, "copying: copy = nearer to training than this quantile of held-out frames are"
    )
    max_copy_share: float = option(
        0.05, "copying: fail when a larger share of generated frames are copies"
    )
    pairs: int = option(32, "report: closest generated/training pairs in the grid")
    device: str | None = option(None, "torch device (default: cuda when available, else cpu)")

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise UsageError(f"--space must be one of {', '.join(SPACES)}, got {self.space!r}")
        if self.k < 2:
            raise UsageError(f"--k must be at least 2, got {self.k}")
        for name in ("alpha", "duplicate_quantile", "copy_quantile"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise UsageError(f"--{name.replace('_', '-')} must be in (0, 1)")
        if self.device is not None:
            from carsynth.devices import resolve_device

            resolve_device(self.device)  # a UsageError naming --device, before any work


@dataclass
class ValidationResult:
    """The three checks, the real-vs-real NDB baseline, and the closest generated/training pairs."""

    config: ValidationConfig
    num_train: int
    num_holdout: int
    num_fake: int
    ndb: NDBResult  # generated vs training
    ndb_baseline: NDBResult  # held-out real vs training
    collapse: CollapseResult
    copying: CopyResult
    seconds: dict[str, float]
    closest_fake: np.ndarray = field(repr=False)  # uint8 (P, H, W, 3)
    closest_train: np.ndarray = field(repr=False)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def ndb_limit(self) -> float:
        return self.ndb_baseline.score + self.config.max_ndb_excess

    @property
    def failures(self) -> list[str]:
        """One line per failed check: which check and by how much."""
        out = []
        if self.ndb.score > self.ndb_limit:
            out.append(
                f"ndb: {self.ndb.num_different_bins} of {self.ndb.k} bins differ (NDB/K "
                f"{self.ndb.score:.3f}), above the real-vs-real {self.ndb_baseline.score:.3f} + "
                f"{self.config.max_ndb_excess:.3f} = {self.ndb_limit:.3f}"
            )
        return out + self.collapse.failures + self.copying.failures

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: verdict, failures, settings, counts, every score and the per-bin tables."""
        return {
            "passed": self.passed,
            "failures": self.failures,
            "sources": self.sources,
            "config": dataclasses.asdict(self.config),
            "frames": {"train": self.num_train, "holdout": self.num_holdout, "fake": self.num_fake},
            "ndb": {**self.ndb.to_dict(), "limit": self.ndb_limit},
            "ndb_real_baseline": self.ndb_baseline.to_dict(),
            "collapse": self.collapse.to_dict(),
            "copying": self.copying.to_dict(),
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
    holdout: np.ndarray,
    fake: np.ndarray,
    config: ValidationConfig | None = None,
    progress: bool = False,
) -> ValidationResult:
    """Run NDB (with its real-vs-real baseline), the collapse and the copying check.

    ``train``/``holdout`` are real frames (training split and held-out split), ``fake`` generated
    frames, all uint8 (N, H, W, 3) of one size. Bad input raises :class:`UsageError`.
    """
    from carsynth.metrics.ndb import NDBBins
    from carsynth.metrics.neighbours import collapse_check, copy_check, neighbour_space

    config = config or ValidationConfig()
    _check_inputs({"train": train, "holdout": holdout, "fake": fake}, config.k)
    seconds: dict[str, float] = {}
    bar = tqdm(total=4, desc="validate", disable=not progress, leave=False)

    def stage(name: str, start: float) -> float:
        now = time.perf_counter()
        seconds[name] = round(now - start, 3)
        bar.update()
        return now

    t = time.perf_counter()
    bins = NDBBins.fit(
        train, config.k, config.seed, max_fit_samples=config.ndb_fit_samples,
        iters=config.kmeans_iters, resolution=config.ndb_resolution, device=config.device,
    )  # fmt: skip
    t = stage("ndb_bins", t)
    ndb_fake, ndb_baseline = bins.compare(fake, config.alpha), bins.compare(holdout, config.alpha)
    t = stage("ndb_compare", t)
    space = neighbour_space(
        train, config.space, resolution=config.nn_resolution, dims=config.pca_dims,
        fit_samples=config.pca_fit_samples, seed=config.seed, device=config.device,
    )  # fmt: skip
    collapse = collapse_check(
        fake, holdout, space, min_ratio=config.min_collapse_ratio,
        duplicate_quantile=config.duplicate_quantile,
        max_duplicate_share=config.max_duplicate_share, seed=config.seed,
    )  # fmt: skip
    t = stage("collapse", t)
    copying = copy_check(
        fake, holdout, train, space, copy_quantile=config.copy_quantile,
        max_copy_share=config.max_copy_share,
    )  # fmt: skip
    stage("copying", t)
    bar.close()
    fake_index, train_index = copying.closest_pairs(config.pairs)
    seconds["total"] = round(sum(seconds.values()), 3)
    return ValidationResult(
        config=config,
        num_train=len(train),
        num_holdout=len(holdout),
        num_fake=len(fake),
        ndb=ndb_fake,
        ndb_baseline=ndb_baseline,
        collapse=collapse,
        copying=copying,
        seconds=seconds,
        closest_fake=fake[fake_index],
        closest_train=train[train_index],
    )


REPORT_FILES = ("report.json", "ndb_bins.png", "nn_distances.png", "closest_pairs.png")


def check_report_dir(report_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a report folder that holds a report already (unless ``overwrite``) or is a file."""
    report_dir = Path(report_dir)
    if report_dir.exists() and not report_dir.is_dir():
        raise UsageError(f"{report_dir}: exists and is not a folder")
    if not report_dir.parent.is_dir():
        raise UsageError(f"{report_dir}: folder {report_dir.parent} does not exist")
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
    generated frames nearest to a training frame, each beside that training frame).
    """
    from carsynth.validation import report

    report_dir = check_report_dir(report_dir, overwrite)
    report_dir.mkdir(exist_ok=True)
    report.write_json(result.to_dict(), report_dir / "report.json")
    report.plot_bins(result.ndb, result.ndb_baseline, report_dir / "ndb_bins.png")
    report.plot_distances(result.collapse, result.copying, report_dir / "nn_distances.png")
    report.save_pairs(result.closest_fake, result.closest_train, report_dir / "closest_pairs.png")
    return report_dir


def real_splits(f: storage.FrameFile) -> tuple[np.ndarray, np.ndarray, str]:
    """Training and held-out frames of a real file, and how the split was made.

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
    train, holdout = f.read_ranges(ranges["train"]), f.read_ranges(ranges["holdout"])
    return train, holdout, "holdout episodes of the file"


def validate_files(
    real: str | os.PathLike,
    fake: str | os.PathLike,
    report_dir: str | os.PathLike | None = None,
    config: ValidationConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ValidationResult:
    """Validate the frames of ``fake`` against the real file ``real``; optionally write a report.

    The real file's holdout episodes are the held-out set (see :func:`real_splits`). The report
    folder is checked before any work, so a refused ``--report`` costs nothing.
    """
    config = config or ValidationConfig()
    if report_dir is not None:
        check_report_dir(report_dir, overwrite)
    with storage.open_frame_file(real) as f:
        train, holdout, how = real_splits(f)
    with storage.open_frame_file(fake) as f:
        generated = f.read("all")
    _check_inputs(
        {
            f"{real} (training split)": train,
            f"{real} (holdout split)": holdout,
            str(fake): generated,
        },
        config.k,
    )
    result = validate_frames(train, holdout, generated, config, progress)
    result.sources = {"real": str(real), "fake": str(fake), "holdout": how}
    if report_dir is not None:
        write_report(result, report_dir, overwrite)
    return result
