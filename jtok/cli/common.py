"""What every subcommand shares: --preset/--config/--set, the one-line UsageError and
argparse types that check numbers where they are parsed (one line, before anything runs)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from jtok.config import ModelConfig
from jtok.config_file import load_mapping
from jtok.errors import JTokError
from jtok.presets import PRESETS, preset


class UsageError(JTokError):
    """A mistake in the command line or its inputs; reported in one line."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, low: int, wanted: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


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


def load_config_mapping(path: Path) -> dict:
    """A --config file's mapping, for commands that read jtok's own configs. A retrofit
    run's config.json (an HF model's record) is named as such: read as a jtok config, its
    `retrofit` section was only an "unknown key"."""
    from jtok.run.files import RETROFIT_RECORD_KEY

    raw = load_mapping(path)
    if isinstance(raw, dict) and RETROFIT_RECORD_KEY in raw:
        raise UsageError(
            f"--config {path} is the run config of a retrofitted Hugging Face model (jtok "
            "train --init-from-hf), not a jtok model config; its table options are under "
            f"{RETROFIT_RECORD_KEY}.options. For its run: `jtok train --resume --out RUN`, "
            "`jtok eval --run RUN`; for another: `jtok train --init-from-hf DIR`")  # fmt: skip
    if isinstance(raw, dict) and "model_type" in raw and "model" not in raw:
        raise UsageError(f"--config {path} is a Hugging Face model's config "
                         f"(model_type {raw['model_type']!r}), not a jtok model config; to add "
                         "tables to that model: jtok train --init-from-hf DIR")  # fmt: skip
    return raw


def load_config_file(path: Path) -> ModelConfig:
    data = load_config_mapping(path)
    return ModelConfig.from_dict(data.get("model", data))  # a run config nests "model"


def resolve_model_config(args: argparse.Namespace) -> ModelConfig:
    """The model of --preset / --config with the --set overrides; keys may be spelled as
    `jtok config` prints them (model.d_model)."""
    if args.config is not None:
        cfg = load_config_file(args.config)
    elif args.preset is not None:
        cfg = preset(args.preset)
    else:
        raise UsageError("give --preset NAME or --config FILE")
    overrides = {key.removeprefix("model."): value
                 for key, value in parse_overrides(args.overrides).items()}  # fmt: skip
    return cfg.with_overrides(overrides)


def run_override_key(key: str) -> str:
    """`--set` keys of `jtok train`: model.* / train.*; a bare key goes where it exists.

    A bare key of neither section is a ConfigError naming close matches and the keys of
    the section it probably belongs to (`lr_mult` -> train.table_lr_mult, ...)."""
    from jtok.config import RunConfig, TrainConfig, unknown_key_error

    head = key.split(".", 1)[0]
    if head in ("model", "train"):
        return key
    if head in TrainConfig.__dataclass_fields__:
        return f"train.{key}"
    if head in ModelConfig.__dataclass_fields__:
        return f"model.{key}"
    raise unknown_key_error(RunConfig, key)


def preset_for(name: str, overrides: dict[str, str]) -> ModelConfig:
    """Preset `name`, whose vocab_size follows the data's tokenizer (train.data among the
    dotted `overrides`) unless model.vocab_size is set: what `jtok train` builds, and
    `jtok config` shows."""
    model = preset(name)
    if "model.vocab_size" not in overrides and overrides.get("train.data"):
        from jtok.data import load_manifest

        model = model.with_overrides({"vocab_size": int(load_manifest(overrides["train.data"])
                                                        ["vocab_size"])})  # fmt: skip
    return model


def check_run_and_checkpoint(args: argparse.Namespace) -> None:
    """--run is a directory; --checkpoint (if given) is a checkpoint folder, as a path or as
    a name inside the run's checkpoints/ (`--checkpoint step_00000100`): args.checkpoint
    becomes that folder. The run's own checks (config, checkpoint files) come at load."""
    if not args.run.is_dir():
        raise UsageError(f"--run {args.run}: no such run directory")
    given = args.checkpoint
    if given is None or given.is_dir():
        return
    from jtok.run.files import CHECKPOINT_DIR

    inside = args.run / CHECKPOINT_DIR / given
    if given.parent == Path(".") and inside.is_dir():
        args.checkpoint = inside
        return
    raise UsageError(f"--checkpoint {given}: no such checkpoint folder (a path, or a name "
                     f"in {args.run / CHECKPOINT_DIR})")
