"""What every subcommand shares: --preset/--config/--set and the one-line UsageError."""

from __future__ import annotations

import argparse
from pathlib import Path

from jtok.config import PRESETS, ModelConfig, load_mapping, preset
from jtok.errors import JTokError


class UsageError(JTokError):
    """A mistake in the command line or its inputs; reported in one line."""


def add_model_arguments(parser: argparse.ArgumentParser, default_preset: str | None) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--preset", default=default_preset, choices=sorted(PRESETS),
        help=f"named model shape (default: {default_preset})",
    )  # fmt: skip
    group.add_argument(
        "--config", type=Path, help="model config file (JSON or YAML); --set applies on top"
    )
    group.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field by dotted key, e.g. --set tokmod.kind=jtokm "
        "--set tokmod.n_e=5 --set tokmod.layers=0,2,4 (repeatable)",
    )  # fmt: skip


def parse_overrides(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def load_config_file(path: Path) -> ModelConfig:
    data = load_mapping(path)
    return ModelConfig.from_dict(data.get("model", data))  # a run config nests "model"


def resolve_model_config(args: argparse.Namespace) -> ModelConfig:
    if args.config is not None:
        cfg = load_config_file(args.config)
    elif args.preset is not None:
        cfg = preset(args.preset)
    else:
        raise UsageError("give --preset NAME or --config FILE")
    return cfg.with_overrides(parse_overrides(args.overrides))


def run_override_key(key: str) -> str:
    """`--set` keys of `jtok train`: model.* / train.*; a bare key goes where it exists."""
    from jtok.config import TrainConfig

    head = key.split(".", 1)[0]
    if head in ("model", "train"):
        return key
    return f"train.{key}" if head in TrainConfig.__dataclass_fields__ else f"model.{key}"
