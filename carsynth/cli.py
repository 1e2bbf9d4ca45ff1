"""The ``carsynth`` command: parse flags, call the Python API, print, and choose the exit code.

Each subcommand is a pair of functions, ``_<name>_arguments`` (its flags) and ``_<name>`` (the
call into the API). A :class:`~carsynth.errors.UsageError` anywhere becomes one line on stderr
and exit code 2; Ctrl-C or SIGTERM exits with 130 after the API has stored what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from collections.abc import Callable, Sequence

from carsynth import __version__
from carsynth.errors import UsageError


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

    d = CollectConfig(out="")
    p.add_argument("--out", required=True, help="output frame file (.h5)")
    p.add_argument("--episodes", type=int, default=d.episodes, help="episodes in the whole run")
    p.add_argument("--workers", type=int, default=d.workers, help="processes (0: all cores)")
    p.add_argument("--policy", default=d.policy, help="random, brownian, pilot or module:callable")
    p.add_argument(
        "--policy-arg", type=_key_value, action="append", default=[], metavar="NAME=VALUE",
        help="a policy parameter (repeatable), e.g. steer_noise=0.3",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=d.seed, help="episode k uses env seed SEED+k")
    p.add_argument("--size", type=int, default=d.size, help="stored frames are SIZE x SIZE")
    p.add_argument("--crop-hud", action="store_true", help="drop the dashboard rows first")
    p.add_argument("--skip-frames", type=int, default=d.skip_frames, help="unrecorded first steps")
    p.add_argument("--frame-skip", type=int, default=d.frame_skip, help="record every k-th frame")
    p.add_argument("--env", dest="env_id", default=d.env_id, help="gymnasium env id")
    p.add_argument("--domain-randomize", action="store_true", help="CarRacing colour randomisation")
    p.add_argument("--lap-complete-percent", type=float, default=d.lap_complete_percent)
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="env steps per episode")
    p.add_argument("--renderer", choices=("fast", "stock"), default=d.renderer)
    p.add_argument("--holdout", type=float, default=d.holdout, help="share of holdout episodes")
    p.add_argument("--shard", default="0/1", help="I/N: collect the I-th of N seed blocks")
    p.add_argument("--resume", action="store_true", help="continue an interrupted file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _collect(args: argparse.Namespace) -> int:
    from carsynth.collect.workers import CollectConfig, collect, parse_shard

    config = CollectConfig(
        out=args.out, episodes=args.episodes, workers=args.workers, policy=args.policy,
        policy_args=dict(args.policy_arg), seed=args.seed, size=args.size,
        crop_hud=args.crop_hud, skip_frames=args.skip_frames, frame_skip=args.frame_skip,
        env_id=args.env_id, domain_randomize=args.domain_randomize,
        lap_complete_percent=args.lap_complete_percent, max_steps=args.max_steps,
        renderer=args.renderer, holdout=args.holdout, shard=parse_shard(args.shard),
        resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
    )  # fmt: skip
    try:
        path = collect(config)
    except KeyboardInterrupt:
        print(
            f"carsynth: interrupted; {args.out} holds the finished episodes; continue with: "
            f"{resume_command(args.argv)}",
            file=sys.stderr,
        )
        return 130
    print(f"wrote {path}")
    return 0


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues an interrupted run: ``argv`` with ``--resume`` and
    without ``--overwrite`` (argparse accepts unique prefixes of both, so those go too)."""
    flags = ("--resume", "--overwrite")
    kept = [a for a in argv if not (len(a) > 3 and any(f.startswith(a) for f in flags))]
    return shlex.join(["carsynth", *kept, "--resume"])


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
    p.add_argument("--overwrite", action="store_true", help="replace an existing --grid PNG")


def _info(args: argparse.Namespace) -> int:
    from carsynth.info import check_grid, describe, write_grid

    if args.grid:
        check_grid(args.grid, args.grid_size, args.overwrite)
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
        write_grid(args.file, args.grid, count=args.grid_size, overwrite=args.overwrite)
        print(f"wrote {args.grid}")
    return 0


# ------------------------------------------------------------------------------------------ train
def _train_arguments(p: argparse.ArgumentParser) -> None:
    from carsynth.training.config import TrainConfig

    d = TrainConfig(data="", out="")
    p.add_argument("--data", required=True, help="carsynth frame file to train on")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--nz", type=int, default=d.nz, help="latent size")
    p.add_argument("--ngf", type=int, default=d.ngf, help="generator width")
    p.add_argument("--ndf", type=int, default=d.ndf, help="discriminator width")
    p.add_argument("--fm", action="store_true", help="feature-matching generator loss")
    p.add_argument("--fm-layer", type=int, default=d.fm_layer, help="discriminator block 1..4")
    p.add_argument(
        "--adv-weight", type=float, default=d.adv_weight, help="adversarial term with --fm"
    )
    p.add_argument(
        "--real-label",
        type=float,
        default=d.real_label,
        help="D target for real frames (0.9: one-sided label smoothing)",
    )
    p.add_argument(
        "--minibatch-kernels",
        type=int,
        default=d.minibatch_kernels,
        help="minibatch discrimination kernels (0: off)",
    )
    p.add_argument("--minibatch-kernel-dim", type=int, default=d.minibatch_kernel_dim)
    p.add_argument(
        "--historical-weight",
        type=float,
        default=d.historical_weight,
        help="historical-averaging penalty weight (0: off)",
    )
    p.add_argument(
        "--loss",
        choices=("bce", "wgan-gp"),
        default=d.loss,
        help="bce (DCGAN) or wgan-gp (critic without batch norm, gradient penalty)",
    )
    p.add_argument("--gp-weight", type=float, default=d.gp_weight, help="WGAN-GP lambda")
    p.add_argument("--critic-steps", type=int, help="D steps per G step (5 for wgan-gp, else 1)")
    p.add_argument(
        "--unrolled-steps",
        type=int,
        default=d.unrolled_steps,
        help="unrolled GAN: G trains against D this many Adam steps ahead (0: off)",
    )
    p.add_argument("--lr", type=float, help="Adam learning rate (2e-4; wgan-gp: 1e-4)")
    p.add_argument("--beta1", type=float, help="Adam beta1 (0.5; wgan-gp: 0)")
    p.add_argument("--beta2", type=float, help="Adam beta2 (0.999; wgan-gp: 0.9)")
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="frames per step and process"
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="generator updates (default 5000)")
    budget.add_argument("--epochs", type=float, help="passes over the training frames")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds weights, noise and data order")
    p.add_argument("--holdout", type=float, help="recompute holdout episodes with this fraction")
    p.add_argument(
        "--max-memory-frames",
        type=int,
        default=d.max_memory_frames,
        help="stream the file in chunks above this many training frames",
    )
    p.add_argument("--device", default=d.device, help="auto, cuda, mps or cpu")
    p.add_argument("--amp", default=d.amp, help="auto (bf16 on CUDA), bf16, fp16 or off")
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA generator decay")
    p.add_argument(
        "--monitor-interval",
        type=int,
        default=d.monitor_interval,
        help="steps between collapse checks (NDB + collapse; 0: off)",
    )
    p.add_argument(
        "--monitor-samples",
        type=int,
        default=d.monitor_samples,
        help="EMA samples per collapse check",
    )
    p.add_argument("--monitor-k", type=int, default=d.monitor_k, help="NDB bins of the monitor")
    p.add_argument(
        "--stop-on-collapse", action="store_true", help="end the run when the collapse check fails"
    )
    p.add_argument("--log-interval", type=int, default=d.log_interval, help="steps per metrics row")
    p.add_argument("--sample-interval", type=int, default=d.sample_interval, help="steps per grid")
    p.add_argument("--checkpoint-interval", type=int, default=d.checkpoint_interval)
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train(args: argparse.Namespace) -> int:
    from carsynth.training import TrainConfig, TrainingCollapsed, TrainingDiverged, train

    config = TrainConfig(
        data=args.data, out=args.out, nz=args.nz, ngf=args.ngf, ndf=args.ndf, fm=args.fm,
        fm_layer=args.fm_layer, adv_weight=args.adv_weight, real_label=args.real_label,
        minibatch_kernels=args.minibatch_kernels,
        minibatch_kernel_dim=args.minibatch_kernel_dim,
        historical_weight=args.historical_weight, loss=args.loss, gp_weight=args.gp_weight,
        critic_steps=args.critic_steps, unrolled_steps=args.unrolled_steps,
        lr=args.lr, beta1=args.beta1, beta2=args.beta2,
        batch_size=args.batch_size, steps=args.steps, epochs=args.epochs,
        seed=args.seed, holdout=args.holdout, max_memory_frames=args.max_memory_frames,
        device=args.device, amp=args.amp, channels_last=not args.no_channels_last,
        compile=args.compile, ema_decay=args.ema_decay, monitor_interval=args.monitor_interval,
        monitor_samples=args.monitor_samples, monitor_k=args.monitor_k,
        stop_on_collapse=args.stop_on_collapse, log_interval=args.log_interval,
        sample_interval=args.sample_interval, checkpoint_interval=args.checkpoint_interval,
        keep_checkpoints=args.keep_checkpoints, resume=args.resume, overwrite=args.overwrite,
        progress=not args.no_progress,
    )  # fmt: skip
    try:
        path = train(config)
    except (TrainingDiverged, TrainingCollapsed) as error:
        print(f"carsynth: error: {error}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------------------- validate
def _validation_arguments(p: argparse.ArgumentParser, shared: tuple[str, ...] = ()) -> None:
    """One flag per ValidationConfig field, except those the command already has (``shared``)."""
    import dataclasses

    from carsynth.validate import ValidationConfig

    for f in dataclasses.fields(ValidationConfig):
        if f.name in shared:
            continue
        kind = type(f.default) if f.default is not None else str
        p.add_argument(
            f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=f.default,
            help=f"{f.metadata['help']} (default {f.default})",
        )  # fmt: skip


def _validation_config(args: argparse.Namespace):
    import dataclasses

    from carsynth.validate import ValidationConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ValidationConfig)}
    if values["device"] == "auto":
        values["device"] = None  # ValidationConfig's own "auto"
    return ValidationConfig(**values)


def _validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--real", required=True, help="real frame file (its holdout split is used)")
    p.add_argument("--fake", required=True, help="frame file of generated frames")
    p.add_argument("--report", metavar="DIR", help="write report.json and figures to DIR")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _validation_arguments(p)


def _validate(args: argparse.Namespace) -> int:
    from carsynth.validate import validate_files

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

    d = ExportConfig(run="", out="")
    p.add_argument("--run", required=True, help="training run directory (carsynth train --out)")
    p.add_argument("--out", required=True, help="synthetic frame file to write (.h5)")
    p.add_argument("--num", type=int, default=d.num, help="frames to generate")
    p.add_argument("--seed", type=int, default=d.seed, help="frame i's latent depends on (SEED, i)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="generator batch")
    p.add_argument("--device", default=d.device, help="auto, cuda, mps or cpu")
    p.add_argument("--data", help="the run's data file, if it moved (checked by fingerprint)")
    p.add_argument("--report", metavar="DIR", help="also write the validation report to DIR")
    p.add_argument("--force", action="store_true", help="write even if validation fails")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file/report")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _validation_arguments(p, shared=("seed", "device"))


def _export(args: argparse.Namespace) -> int:
    from carsynth.export import ExportConfig, ExportRefused, export

    config = ExportConfig(
        run=args.run, out=args.out, num=args.num, seed=args.seed, batch_size=args.batch_size,
        device=args.device, data=args.data, report=args.report, force=args.force,
        overwrite=args.overwrite,
        progress=not args.no_progress, validation=_validation_config(args),
    )  # fmt: skip
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
    from carsynth.pipeline import PRESETS

    p.add_argument("--preset", default="quick", choices=list(PRESETS), help="settings of all steps")
    p.add_argument("--out", required=True, help="pipeline directory (re-run to resume)")
    p.add_argument("--seed", type=int, default=0, help="seeds collection, training and sampling")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--force", action="store_true", help="export even if validation fails")
    p.add_argument("--print-config", action="store_true", help="print every step's settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run(args: argparse.Namespace) -> int:
    from carsynth.pipeline import PipelineConfig, describe, run

    config = PipelineConfig(
        out=args.out, preset=args.preset, seed=args.seed, device=args.device, force=args.force,
        progress=not args.no_progress,
    )  # fmt: skip
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
    """The parser; with ``command``, only that subcommand's flags are built.

    Building a command's flags imports its module (``train`` imports torch: about a second and
    hundreds of MiB), so ``carsynth collect`` builds only collect's.
    """
    parser = _Parser(prog="carsynth", description="Validated synthetic CarRacing frames.")
    parser.add_argument("--version", action="version", version=f"carsynth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        subparser = sub.add_parser(name, help=help_text, description=help_text)
        if command in (None, name):
            add_arguments(subparser)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a cluster's "time is up") stops a command the way Ctrl-C does."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``carsynth`` console script; returns the exit code."""
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        command = next((a for a in argv if not a.startswith("-")), None)
        args = build_parser(command if command in COMMANDS else None).parse_args(argv)
        args.argv = argv
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return COMMANDS[args.command][2](args)
        finally:
            signal.signal(signal.SIGTERM, previous)
    except UsageError as error:
        message = " ".join(str(error).split())  # one line, whatever a library put in it
        print(f"carsynth: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("carsynth: interrupted; what was finished is stored", file=sys.stderr)
        return 130
