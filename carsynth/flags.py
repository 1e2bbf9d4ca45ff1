"""Command-line flags generated from config dataclasses: one flag per field, with its help text.

A field becomes ``--field-name`` (or ``metadata["flag"]``); its type (or ``metadata["type"]``, a
parser), default and ``metadata["help"]`` give the flag's type, default and help,
``metadata["choices"]`` its choices. A bool field becomes a pair,
``--name`` / ``--no-name``. A field without a default is a required flag; a field without help
text (a nested config, say) gets no flag. Adding a setting to a command is adding a field to its
config. Only the standard library is imported here, so ``carsynth --help`` stays light.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

Config = TypeVar("Config")
_TYPES = {"int": int, "float": float, "str": str}


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A config field with its help text (and optional ``choices``, ``metavar``, ``flag``,
    ``type``): a flag."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def required(help: str, **metadata: Any) -> Any:
    """A config field without a default: a required flag."""
    return dataclasses.field(metadata={"help": help, **metadata})


def _kind(annotation: str) -> type:
    """The argparse type of a field annotation (a string under ``from __future__ import
    annotations``): ``int``, ``float | None``, ``Literal[...]`` (a str) ..."""
    base = annotation.replace(" | None", "").replace("Optional[", "").rstrip("]").strip()
    return _TYPES.get(base, str)


def add_flags(parser: argparse.ArgumentParser, config: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the dataclass ``config`` that has help text, except ``skip``."""
    for f in dataclasses.fields(config):
        if f.name in skip or "help" not in f.metadata:
            continue
        flag = f.metadata.get("flag", f"--{f.name.replace('_', '-')}")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default
        text = f.metadata["help"]
        if default is not None and not isinstance(default, bool):
            text = f"{text} (default {default})"
        if f.type == "bool":
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                help=f"{text} (default {'on' if default else 'off'})",
            )  # fmt: skip
            continue
        parser.add_argument(
            flag, dest=f.name, type=f.metadata.get("type", _kind(f.type)), default=default,
            required=required,
            choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"), help=text,
        )  # fmt: skip


def from_flags(config: type[Config], args: argparse.Namespace, **values: Any) -> Config:
    """The config built from the parsed flags of its fields (plus ``values``)."""
    names = {f.name for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    given = {k: v for k, v in vars(args).items() if k in names}
    return config(**{**given, **values})
