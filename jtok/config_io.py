"""The machinery behind jtok's config dataclasses (jtok.config): JSON round trips, dotted
overrides from a command line, type checks and one-line errors that name the field.

Kept apart from the dataclasses so each module stays readable; `jtok.config` re-exports
what callers use (ConfigError, config_keys, unknown_key_error).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from typing import Any

from jtok.errors import JTokError


class ConfigError(JTokError, ValueError):
    """A configuration value or key is invalid. The message names the field."""


def _require(ok: bool, field_path: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_path}: {message}")


def _require_finite(obj: Any, prefix: str) -> None:
    """Every float field of a config must be finite: NaN or Inf would train nonsense."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{f.name}: must be a finite number, got {value!r}")


def _require_positive(obj: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value > 0, prefix + name, f"must be positive, got {value!r}")


def _require_choice(value: Any, field_path: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, field_path, f"must be one of {list(choices)}, got {value!r}")


class _ConfigBase:
    """JSON round trip, dotted-key overrides and validation for the config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return _build(cls, data, prefix="")

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config is not valid JSON: {err}") from None
        _require(isinstance(data, dict), "config", "JSON must be an object")
        return cls.from_dict(data)

    def with_overrides(self, overrides: dict[str, Any]):
        """Return a copy with dotted-key overrides applied, e.g. {"tokmod.kind": "jtokm"}.

        String values (as given on a command line) are parsed to the field's type.
        """
        data = self.to_dict()
        for dotted, value in overrides.items():
            *parents, leaf = dotted.split(".")
            node, hint_owner = data, type(self)
            for part in parents:
                sub = node.get(part) if isinstance(node, dict) else None
                if not isinstance(sub, dict):
                    raise unknown_key_error(type(self), dotted)
                node, hint_owner = sub, _field_types(hint_owner)[part]
            hints = _field_types(hint_owner)
            if leaf not in hints or dataclasses.is_dataclass(hints[leaf]):
                raise unknown_key_error(type(self), dotted)
            node[leaf] = _coerce(value, hints[leaf], dotted) if isinstance(value, str) else value
        return type(self).from_dict(data)



def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_SECTION_NAMES = {"ModelConfig": "model", "TrainConfig": "train", "RunConfig": "run config",
                  "MoEConfig": "moe", "TokModConfig": "tokmod"}  # fmt: skip


def config_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable key of a config class, dotted (``tokmod.kind``, ``train.lr``)."""
    keys = []
    for name, hint in _field_types(cls).items():
        is_section = dataclasses.is_dataclass(hint)
        keys += config_keys(hint, f"{prefix}{name}.") if is_section else [prefix + name]
    return keys


def unknown_key_error(root: type, dotted: str, prefix: str = "") -> ConfigError:
    """A one-line error for a key that config class `root` lacks (`prefix`: where `root`
    sits, for the message): close matches, then the keys of the section the user probably
    meant (the best match's, else the deepest one the key names)."""
    keys = config_keys(root)
    sections = {key.rpartition(".")[0] for key in keys}
    leaf = dotted.rpartition(".")[2]
    by_leaf: dict[str, list[str]] = {}
    for key in keys:
        by_leaf.setdefault(key.rpartition(".")[2], []).append(key)
    close = difflib.get_close_matches(dotted, keys, n=3, cutoff=0.8) or [
        key for name in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.6)
        for key in by_leaf[name]
    ][:4]  # fmt: skip
    section = dotted.rpartition(".")[0]
    while section and section not in sections:
        section = section.rpartition(".")[0]
    if dotted in sections:
        section, message = dotted, "is a section, not a key"
    elif (root.__name__ == "ModelConfig" and leaf in _train_keys()
          and dotted in (leaf, "train." + leaf)):  # before close matches: steps is not eps
        section = ""
        message = f"unknown key ({leaf} is a train key, not a model key)"
    elif close:
        section = close[0].rpartition(".")[0]
        message = f"unknown key (did you mean {' or '.join(prefix + c for c in close)}?)"
    else:
        message = "unknown key"
    start = section + "." if section else ""
    listed = dict.fromkeys(
        rest.split(".")[0] + (".*" if "." in rest else "")
        for rest in (key[len(start):] for key in keys if key.startswith(start))
    )
    label = (prefix + start).rstrip(".") or _SECTION_NAMES.get(root.__name__, "config")
    hint = " (`jtok config --preset tiny` lists them all)" if not section else ""
    return ConfigError(f"{prefix}{dotted}: {message}; {label} keys: {', '.join(listed)}{hint}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected an object")
    hints = _field_types(cls)
    unknown = sorted(str(key) for key in data if key not in hints)
    if unknown:
        raise unknown_key_error(cls, unknown[0], prefix)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, hint, prefix + name)
    try:
        return cls(**kwargs)  # __post_init__ validates
    except ConfigError as err:
        raise ConfigError(prefix + str(err)) from None


def _check_type(value: Any, hint: Any, path: str) -> Any:
    """Accept `value` if it matches `hint` (ints are accepted for floats); else raise."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: {value!r} does not match type {hint}")
    if hint is type(None):
        _require(value is None, path, f"expected null, got {value!r}")
        return value
    if origin is list:
        _require(isinstance(value, list), path, f"expected a list, got {value!r}")
        (item_hint,) = typing.get_args(hint)
        return [_check_type(v, item_hint, path) for v in value]
    if hint is bool:
        _require(isinstance(value, bool), path, f"expected true/false, got {value!r}")
    elif hint is int:
        _require(
            isinstance(value, int) and not isinstance(value, bool),
            path,
            f"expected an integer, got {value!r}",
        )
    elif hint is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        _require(
            isinstance(value, int | float) and not isinstance(value, bool),
            path,
            f"expected a number, got {value!r}",
        )
        value = float(value)
    elif hint is str:
        _require(isinstance(value, str), path, f"expected a string, got {value!r}")
    return value


def _coerce(text: str, hint: Any, path: str) -> Any:
    """Parse a command-line string into a value of type `hint`.

    JSON literals are accepted (``3``, ``1e-4``, ``true``, ``[0, 2]``, ``null``); string
    fields take the text as is; list fields also take ``0,2,4`` or a single ``3``, and
    ``all`` for "every layer" (None).
    """
    if hint is str:
        return text
    allows_list = list in {typing.get_origin(a) for a in (hint, *typing.get_args(hint))}
    if allows_list and text.strip().lower() == "all":
        return _check_type(None, hint, path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
        if allows_list:
            try:
                value = [int(v) for v in text.split(",") if v.strip()]
            except ValueError:
                pass
    if allows_list and isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    return _check_type(value, hint, path)


def _train_keys() -> set[str]:
    from jtok.config import TrainConfig  # the dataclasses import this module

    return set(TrainConfig.__dataclass_fields__)
