"""The gate: are generated frames fit to use? Files and configs in, a verdict and a report out.

``checks``  :class:`ValidationConfig`, :class:`ValidationResult`, :func:`validate_frames` (arrays),
            the same in two steps (:func:`fit_reference` on the real frames once, then
            :func:`judge_frames` per generated set), :func:`validate_files` (a real and a
            generated file), :func:`real_splits` (the real file's split)
``report``  the summary table, report.json and the figures

The statistics themselves live in :mod:`carsynth.metrics` (arrays in, results out, no files);
validation is the only part that knows files and thresholds. Importing it does not import torch.
"""

from carsynth.validation.checks import (
    REPORT_FILES,
    ValidationConfig,
    ValidationResult,
    check_report_dir,
    fit_reference,
    judge_frames,
    real_splits,
    validate_files,
    validate_frames,
    write_report,
)

__all__ = [
    "REPORT_FILES",
    "ValidationConfig",
    "ValidationResult",
    "check_report_dir",
    "fit_reference",
    "judge_frames",
    "real_splits",
    "validate_files",
    "validate_frames",
    "write_report",
]
