"""The spec of `jtok sweep` and its plan: every run of the grid with its resolved config.

A spec (YAML or JSON) names a base run config, any number of axes, and a budget:

    name: isoflops-dense
    base:
      preset: small                 # or model: {...}; either may be combined
      model: {tokmod: {n_e: 5, top_k: 2}}
      train: {data: data/docs, seq_len: 128, batch_size: 16, lr: 3e-3}
    axes:                           # the grid is their cartesian product
      variant: {baseline: {}, jtokm: {model.tokmod.kind: jtokm}}
      backbone:
        d96-L3: {model.d_model: 96, model.n_layers: 3}
        d128-L4: {model.d_model: 128, model.n_layers: 4}
    budget: {flops: [1e14, 3e14]}   # or {tokens: [...]}; steps follow from the budget
    warmup_fraction: 0.05           # optional: warmup as a share of each run's steps
    evals_per_run: 4                # optional: about this many validation points and
                                    # checkpoints a run (every steps // 4 steps, unless
                                    # train.eval_every / save_every are set)
    exclude:                        # optional: grid points to leave out, each matched on
      - {backbone: d96-L3, budget: 1e14}    # axis values (a name or a list) and budgets

A grid point whose resolved config equals an earlier one's is dropped (the baseline of an
eta sweep does not depend on the table-size axis), so such axes cost nothing extra.
Settings the budget decides (train.steps; train.warmup_steps next to warmup_fraction) are
refused where the spec sets them, not silently replaced.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

from jtok.config import ConfigError, ModelConfig, RunConfig, TrainConfig, effective_dict
from jtok.data import DataError, load_manifest
from jtok.errors import JTokError
from jtok.flops import count_flops
from jtok.presets import preset

SPEC_KEYS = {"name", "base", "axes", "budget", "warmup_fraction", "evals_per_run", "exclude"}


class SweepError(JTokError):
    """A sweep spec is invalid; the message names the part."""


@dataclass(frozen=True)
class PlannedRun:
    name: str
    labels: dict[str, str]  # axis -> value name
    budget_kind: str  # "flops" or "tokens"
    budget: float
    config: RunConfig

    @property
    def tokens(self) -> int:
        t = self.config.train
        return t.steps * t.batch_size * t.seq_len

    @property
    def flops(self) -> float:
        return count_flops(self.config.model, self.config.train.seq_len).train * self.tokens


def _data_vocab(data_dir: Any) -> int | None:
    """The vocabulary size of prepared data, or None where it cannot be read: missing data
    is reported by the sweep's preflight, and until then the plan keeps the vocabulary it
    had (the preset's, or for an axis over data the base data's)."""
    with contextlib.suppress(DataError):
        return int(load_manifest(str(data_dir))["vocab_size"])
    return None


def _vocab_follows_data(base: dict[str, Any]) -> bool:
    """As in `jtok train --preset`: a preset's vocabulary follows the data's tokenizer,
    unless the spec sets it."""
    return "preset" in base and "vocab_size" not in base.get("model", {})


def _base_config(base: dict[str, Any]) -> RunConfig:
    if not isinstance(base, dict):
        raise SweepError("sweep spec: base must be a mapping")
    unknown = sorted(set(base) - {"preset", "model", "train"})
    if unknown:
        raise SweepError(f"sweep spec: base has unknown key {unknown[0]!r} (preset, model, train)")
    for section in ("model", "train"):
        if not isinstance(base.get(section, {}), dict):
            raise SweepError(f"sweep spec: base.{section} must be a mapping")
    model = preset(base["preset"]) if "preset" in base else ModelConfig()
    data_dir = base.get("train", {}).get("data")
    if _vocab_follows_data(base) and data_dir and (vocab := _data_vocab(data_dir)) is not None:
        model = model.with_overrides({"vocab_size": vocab})
    model_dict = _deep_merge(model.to_dict(), base.get("model", {}))
    train_dict = _deep_merge(TrainConfig(seq_len=model.max_seq_len).to_dict(),
                             base.get("train", {}))  # fmt: skip
    try:
        return RunConfig.from_dict({"model": model_dict, "train": train_dict})
    except ConfigError as err:
        raise SweepError(f"sweep spec base: {err}") from None


def _deep_merge(into: dict, update: dict) -> dict:
    out = dict(into)
    for key, value in update.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value  # fmt: skip
    return out


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


Exclusion = tuple[dict[str, set[str]], list[float] | None]  # axis -> value names; budgets


def _exclusions(entries: Any, axes: dict[str, dict], budgets: list[float]) -> list[Exclusion]:
    """The spec's `exclude` entries, checked against its axes and budgets so that a typo
    cannot silently exclude nothing. An entry drops a grid point when every axis it names
    has one of the listed values and (if it names budgets) the budget is one of them."""
    if entries is None:
        return []
    if not isinstance(entries, list) or not all(isinstance(e, dict) and e for e in entries):
        raise SweepError("sweep spec: exclude must be a list of non-empty mappings")
    rules = []
    for entry in entries:
        wanted: dict[str, set[str]] = {}
        chosen: list[float] | None = None
        for key, value in entry.items():
            if key == "budget":
                try:
                    chosen = [float(v) for v in _as_list(value)]
                except (TypeError, ValueError):
                    raise SweepError(f"sweep spec: exclude budget {value!r} is not a number"
                                     ) from None  # fmt: skip
                missing = [b for b in chosen if not any(_same_budget(b, v) for v in budgets)]
                if missing:
                    raise SweepError(f"sweep spec: exclude budget {missing[0]:g} is not one of "
                                     f"the spec's budgets")  # fmt: skip
                continue
            if key not in axes:
                raise SweepError(f"sweep spec: exclude names unknown axis {key!r} "
                                 f"(axes: {sorted(axes)})")  # fmt: skip
            names = {str(v) for v in _as_list(value)}
            unknown = sorted(names - {str(k) for k in axes[key]})
            if unknown:
                raise SweepError(f"sweep spec: exclude names unknown {key} value {unknown[0]!r}")
            wanted[key] = names
        rules.append((wanted, chosen))
    return rules


def _same_budget(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def _is_excluded(labels: dict[str, str], amount: float, rules: list[Exclusion]) -> bool:
    return any(all(labels[axis] in names for axis, names in wanted.items())
               and (chosen is None or any(_same_budget(amount, b) for b in chosen))
               for wanted, chosen in rules)  # fmt: skip


def _spec_number(spec: dict, key: str, default, low, high, integer: bool = False):
    """A top-level number of the spec, checked: finite, within [low, high]."""
    value = spec.get(key, default)
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok or not math.isfinite(value) or value < low or (high is not None and value > high):
        span = f"[{low}, {high}]" if high is not None else f">= {low}"
        what = "an integer" if integer else "a number"
        raise SweepError(f"sweep spec: {key} must be {what} in {span}, got {value!r}")
    return int(value) if integer else float(value)


def _check_budget_keys(set_keys: set[str], where: str,
                       warmup_fraction: float | None) -> None:  # fmt: skip
    """Refuse train settings the budget would silently replace; `where` names the part of
    the spec that set them (base.train, or an axis value)."""
    if "steps" in set_keys:
        raise SweepError(f"sweep spec {where}: train.steps follows from the budget; remove it")
    if "warmup_steps" in set_keys and warmup_fraction is not None:
        raise SweepError(f"sweep spec {where}: give warmup_fraction or train.warmup_steps, "
                         "not both")  # fmt: skip


def plan(spec: dict[str, Any]) -> list[PlannedRun]:
    """Every run of the grid, in a fixed order, with its resolved config."""
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise SweepError(f"sweep spec: unknown key {unknown[0]!r} (known: {sorted(SPEC_KEYS)})")
    base = _base_config(spec.get("base", {}))
    follows_data = _vocab_follows_data(spec.get("base", {}))
    axes: dict[str, dict[str, dict]] = spec.get("axes") or {}
    if not isinstance(axes, dict):
        raise SweepError("sweep spec: axes must map axis names to {value name: overrides}")
    budget = spec.get("budget") or {}
    if (not isinstance(budget, dict) or len(budget) != 1
            or next(iter(budget)) not in ("flops", "tokens")):  # fmt: skip
        raise SweepError("sweep spec: budget must be {flops: [...]} or {tokens: [...]}")
    kind, values = next(iter(budget.items()))
    try:  # YAML reads 1e14 (no dot) as a string
        values = ([float(v) for v in values] if isinstance(values, list)
                  and not any(isinstance(v, bool) for v in values) else [])  # fmt: skip
    except (TypeError, ValueError):
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise SweepError(f"sweep spec: budget.{kind} must be a list of finite positive numbers")
    for axis, options in axes.items():
        if not isinstance(options, dict) or not options:
            raise SweepError(f"sweep spec: axis {axis!r} must map value names to overrides")
        for name, overrides in options.items():
            if overrides is not None and not isinstance(overrides, dict):
                raise SweepError(f"sweep spec: axis {axis!r} value {name!r} must be a mapping "
                                 f"of dotted keys to values, got {overrides!r}")  # fmt: skip
    warmup_fraction = _spec_number(spec, "warmup_fraction", None, 0.0, 1.0)
    evals = _spec_number(spec, "evals_per_run", 4, 1, None, integer=True)
    base_train_keys = set(spec.get("base", {}).get("train") or {})
    _check_budget_keys(base_train_keys, "base.train", warmup_fraction)
    excluded = _exclusions(spec.get("exclude"), axes, values)
    runs, seen_configs = [], set()
    for combo in itertools.product(*[list(opts.items()) for opts in axes.values()]):
        overrides: dict[str, Any] = {}
        labels = {}
        for axis, (value_name, value_overrides) in zip(axes, combo, strict=True):
            labels[axis] = str(value_name)
            overrides.update(value_overrides or {})
        if (follows_data and "train.data" in overrides and "model.vocab_size" not in overrides
                and (vocab := _data_vocab(overrides["train.data"])) is not None):  # fmt: skip
            overrides["model.vocab_size"] = vocab  # an axis over data: each run follows its own
        axis_keys = {k[6:] for k in overrides if k.startswith("train.")}
        _check_budget_keys(axis_keys, f"axes {labels}", warmup_fraction)
        set_keys = base_train_keys | axis_keys
        try:
            cfg = base.with_overrides(overrides)
        except ConfigError as err:
            raise SweepError(f"sweep spec axes {labels}: {err}") from None
        for amount in values:
            if _is_excluded(labels, amount, excluded):
                continue
            tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
            if kind == "flops":
                tokens = amount / count_flops(cfg.model, cfg.train.seq_len).train
            else:
                tokens = amount
            steps = max(1, round(tokens / tokens_per_step))
            train_overrides = {"train.steps": steps}
            for key in ("eval_every", "save_every"):  # one set in the spec is kept
                if key not in set_keys:
                    train_overrides[f"train.{key}"] = max(1, steps // evals)
            if warmup_fraction is not None:
                train_overrides["train.warmup_steps"] = round(warmup_fraction * steps)
            run_cfg = cfg.with_overrides(train_overrides)
            fingerprint = json.dumps(effective_dict(run_cfg), sort_keys=True)
            if fingerprint in seen_configs:
                continue
            seen_configs.add(fingerprint)
            label = f"{'C' if kind == 'flops' else 'D'}{amount:.3g}"
            name = "__".join([*labels.values(), label]).replace("/", "-")
            runs.append(PlannedRun(name, labels, kind, float(amount), run_cfg))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise SweepError("sweep spec: two runs get the same name (repeated axis value names)")
    return runs
