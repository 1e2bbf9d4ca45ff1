"""Every command's flags come from its config: same names, defaults and types as the API."""

from __future__ import annotations

import dataclasses

import pytest

from carsynth.cli import build_parser
from carsynth.collect.workers import CollectConfig
from carsynth.errors import UsageError
from carsynth.export import ExportConfig
from carsynth.flags import from_flags
from carsynth.pipeline import PipelineConfig
from carsynth.training.config import TrainConfig
from carsynth.validation import ValidationConfig


def parse(*argv: str):
    return build_parser(argv[0]).parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "config", "expected"),
    [
        (["train", "--data", "d.h5", "--out", "o"], TrainConfig, TrainConfig("d.h5", "o")),
        (["collect", "--out", "o.h5"], CollectConfig, CollectConfig("o.h5")),
        (["export", "--run", "r", "--out", "s.h5"], ExportConfig, ExportConfig("r", "s.h5")),
        (["run", "--out", "p"], PipelineConfig, PipelineConfig("p")),
    ],
)
def test_no_flags_give_the_configs_defaults(argv, config, expected) -> None:
    args = parse(*argv)
    extra = {"validation": ValidationConfig()} if config is ExportConfig else {}
    if config is CollectConfig:
        extra["policy_args"] = {}
    assert from_flags(config, args, **extra) == expected


def test_flags_keep_their_names_and_types() -> None:
    args = parse("train", "--data", "d", "--out", "o", "--fm", "--no-progress",
                 "--no-channels-last", "--steps", "7", "--lr", "1e-3", "--loss", "wgan-gp",
                 "--holdout", "0.2", "--resume")  # fmt: skip
    c = from_flags(TrainConfig, args)
    assert (c.fm, c.progress, c.channels_last, c.resume) == (True, False, False, True)
    assert (c.steps, c.lr, c.loss, c.holdout) == (7, 1e-3, "wgan-gp", 0.2)
    assert c.adam == (1e-3, 0.0, 0.9)
    args = parse("collect", "--out", "o", "--env", "X-v0", "--shard", "1/4", "--crop-hud",
                 "--policy-arg", "steer_noise=0.3")  # fmt: skip
    c = from_flags(CollectConfig, args, policy_args=dict(args.policy_arg))
    assert (c.env_id, c.shard, c.crop_hud, c.policy_args) == ("X-v0", (1, 4), True,
                                                             {"steer_noise": "0.3"})  # fmt: skip


def test_every_field_with_help_is_a_flag() -> None:
    for command, config in (("train", TrainConfig), ("collect", CollectConfig),
                            ("export", ExportConfig), ("run", PipelineConfig)):  # fmt: skip
        options = {o for a in build_parser(command)._subparsers._group_actions[0]
                   .choices[command]._actions for o in a.option_strings}  # fmt: skip
        for f in dataclasses.fields(config):
            if "help" in f.metadata:
                assert f.metadata.get("flag", f"--{f.name.replace('_', '-')}") in options


def test_a_bad_value_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--steps: invalid int value"):
        parse("train", "--data", "d", "--out", "o", "--steps", "many")
    with pytest.raises(UsageError, match="--shard 5/4: need 0 <= I < N"):
        parse("collect", "--out", "o", "--shard", "5/4")
