"""The ``carsynth`` command: parse flags, call the Python API, print, and choose the exit code.

Each subcommand is a pair of functions, ``_<name>_arguments`` (its flags) and ``_<name>`` (the
call into the API). A :class:`~carsynth.errors.UsageError` anywhere becomes one line on stderr
and exit code 2; Ctrl-C exits with 130 after the API has stored what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from carsynth import __version__
from carsynth.errors import UsageError
from carsynth.flags import add_flags, from_flags


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a UsageError (one line, exit 2) like every other."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key, value


# ---------------------------------------------------------------------------------------- collect
def _collect_arguments(p: argparse.ArgumentParser) -> None:
    from carsynth.collect.workers import CollectConfig

    add_flags(p, CollectConfig)
    p.add_argument(
        "--policy-arg", type=_key_value, action="append", default=[], metavar="NAME=VALUE",
        help="a policy parameter (repeatable), e.g. steer_noise=0.3",
    )  # fmt: skip


def _collect(args: argparse.Namespace) -> int:
    from carsynth.collect.workers import CollectConfig, collect

    path = collect(from_flags(CollectConfig, args, policy_args=dict(args.policy_arg)))
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------ merge
def _merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="shard files")
    p.add_argument("--out", required=True, help="merged file")
    p.add_argument("--virtual", action="store_true", help="HDF5 virtual dataset, no copy")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")


def _merge(args: argparse.Namespace) -> int:
    from carsynth.storage import merge

    path = merge(args.inputs, args.out, virtual=args.virtual, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------- info
INFO_VALUE_CHARS = 100  # longer values are shortened in the text summary


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a carsynth frame file")
    p.add_argument("--grid", metavar="PNG", help="write a contact sheet of frames to PNG")
    p.add_argument("--grid-size", type=int, default=64, help="frames in the contact sheet")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _info(args: argparse.Namespace) -> int:
    from carsynth.info import describe, write_grid

    summary = describe(args.file)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        # Synthetic files carry whole JSON documents (train config, validation report) as
        # attributes: shortened here, printed whole with --json.
        width = max(len(k) for k in summary)
        shortened = False
        for key, value in summary.items():
            text = str(value)
            if len(text) > INFO_VALUE_CHARS:
                text, shortened = f"{text[: INFO_VALUE_CHARS - 3]}...", True
            print(f"{key:<{width}}  {text}")
        if shortened:
            print("(long attributes shortened; --json prints them whole)")
    if args.grid:
        write_grid(args.file, args.grid, count=args.grid_size)
        print(f"wrote {args.grid}")
    return 0


# ------------------------------------------------------------------------------------------ train
def _train_arguments(p: argparse.ArgumentParser) -> None:
    from carsynth.training.config import TrainConfig

    add_flags(p, TrainConfig)


def _train(args: argparse.Namespace) -> int:
    from carsynth.training import TrainConfig, TrainingCollapsed, TrainingDiverged, train

    try:
        path = train(from_flags(TrainConfig, args))
    except (TrainingDiverged, TrainingCollapsed) as error:
        print(f"carsynth: error: {error}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------------------- validate
def _validation_arguments(p: argparse.ArgumentParser, shared: tuple[str, ...] = ()) -> None:
    """One flag per ValidationConfig field, except those the command already has (``shared``)."""
    from carsynth.validation import ValidationConfig

    add_flags(p, ValidationConfig, skip=shared)


def _validation_config(args: argparse.Namespace):
    from carsynth.validation import ValidationConfig

    config = from_flags(ValidationConfig, args)
    if config.device == "auto":
        config.device = None  # ValidationConfig's own "auto"
    return config


def _validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--real", required=True, help="real frame file (its holdout split is used)")
    p.add_argument("--fake", required=True, help="frame file of generated frames")
    p.add_argument("--report", metavar="DIR", help="write report.json and figures to DIR")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _validation_arguments(p)


def _validate(args: argparse.Namespace) -> int:
    from carsynth.validation import validate_files

    result = validate_files(
        args.real, args.fake, report_dir=args.report, config=_validation_config(args),
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )  # fmt: skip
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    if args.report:
        print(f"wrote {args.report}")
    return 0 if result.passed else 1


# ----------------------------------------------------------------------------------------- export
def _export_arguments(p: argparse.ArgumentParser) -> None:
    from carsynth.export import ExportConfig

    add_flags(p, ExportConfig)
    _validation_arguments(p, shared=("seed", "device"))


def _export(args: argparse.Namespace) -> int:
    from carsynth.export import ExportConfig, ExportRefused, export

    config = from_flags(ExportConfig, args, validation=_validation_config(args))
    try:
        result = export(config)
    except ExportRefused as refused:
        print(refused.result.summary())
        print(f"carsynth: {refused}; nothing written (--force writes anyway)", file=sys.stderr)
        return 1
    print(result.validation.summary())
    verdict = "passed" if result.validation.passed else "FAILED (written because of --force)"
    print(f"wrote {result.path} ({args.num} frames, validation {verdict})")
    return 0


# -------------------------------------------------------------------------------------------- run
def _run_arguments(p: argparse.ArgumentParser) -> None:
    from carsynth.pipeline import PipelineConfig

    add_flags(p, PipelineConfig)
    p.add_argument("--print-config", action="store_true", help="print every step's settings")


def _run(args: argparse.Namespace) -> int:
    from carsynth.pipeline import PipelineConfig, describe, run

    config = from_flags(PipelineConfig, args)
    if args.print_config:
        print(json.dumps(describe(config), indent=2, default=str))
        return 0
    result = run(config)
    return 0 if result.passed else 1


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "collect": ("record CarRacing rollouts to a frame file", _collect_arguments, _collect),
    "merge": ("join shard files into one", _merge_arguments, _merge),
    "info": ("check a frame file and print its contents", _info_arguments, _info),
    "train": ("train the DCGAN-64 on a frame file", _train_arguments, _train),
    "validate": (
        "check generated frames for coverage, collapse and copying",
        _validate_arguments,
        _validate,
    ),
    "export": (
        "sample a run's generator, validate, write the synthetic file",
        _export_arguments,
        _export,
    ),
    "run": ("collect, train --fm, validate and export in one command", _run_arguments, _run),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the flags of ``command`` only (none when ``None``).

    Building a command's flags imports its config's module, some of which import torch (a second
    or more and hundreds of MiB), so ``carsynth collect`` builds only collect's, and
    ``carsynth --help`` and ``carsynth --version`` build none and never import torch.
    """
    parser = _Parser(prog="carsynth", description="Validated synthetic CarRacing frames.")
    parser.add_argument("--version", action="version", version=f"carsynth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        subparser = sub.add_parser(name, help=help_text, description=help_text)
        if command == name:
            add_arguments(subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``carsynth`` console script; returns the exit code."""
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        command = next((a for a in argv if not a.startswith("-")), None)
        args = build_parser(command if command in COMMANDS else None).parse_args(argv)
        return COMMANDS[args.command][2](args)
    except UsageError as error:
        print(f"carsynth: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("carsynth: interrupted; what was finished is stored", file=sys.stderr)
        return 130
