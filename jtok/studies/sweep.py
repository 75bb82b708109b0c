"""`jtok sweep`: a grid of training runs for scaling-law and isoFLOP studies.

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
    evals_per_run: 4                # optional: validation points on each run's curve
    exclude:                        # optional: grid points to leave out, each matched on
      - {backbone: d96-L3, budget: 1e14}    # axis values (a name or a list) and budgets

A grid point whose resolved config equals an earlier one's is dropped (the baseline of an
eta sweep does not depend on the table-size axis), so such axes cost nothing extra.
Each run trains through the normal trainer into OUT/runs/<name>/ and, when finished,
appends one line to OUT/results.jsonl (the input of `jtok fit`) with its config, N_c,
N_n, eta, rho, tokens D, training FLOPs C, final and best validation loss, and curve.
Re-running skips finished runs and resumes interrupted ones from their checkpoints.
Runs are independent, so several processes may share one grid: each takes a run by
locking OUT/runs/<name>.lock and passes over runs locked by another, so N processes started
on the same spec and OUT split the work between them as they go (no run is trained twice).
`--shard i/n` instead gives each process a fixed share, and `--only GLOB` the runs whose
names match (e.g. a size added to the spec later).
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import itertools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jtok import data
from jtok.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    TrainConfig,
    effective_dict,
)
from jtok.config_file import load_mapping
from jtok.errors import JTokError
from jtok.flops import count_flops, summarize
from jtok.io import append_jsonl, read_jsonl, write_json_atomic
from jtok.parallel.distributed import resolve_device
from jtok.parallel.resources import check_memory
from jtok.presets import preset
from jtok.run.checkpoint import latest_checkpoint
from jtok.run.files import RESULTS_FILE, SPEC_COPY_FILE
from jtok.run.lock import try_lock, unlock
from jtok.run.rundir import (
    check_out_dir,
    data_fingerprint,
    differences_ignoring_data_path,
    read_metrics,
    run_differences,
)
from jtok.training.loop import train

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


def plan(spec: dict[str, Any]) -> list[PlannedRun]:
    """Every run of the grid, in a fixed order, with its resolved config."""
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise SweepError(f"sweep spec: unknown key {unknown[0]!r} (known: {sorted(SPEC_KEYS)})")
    base = _base_config(spec.get("base", {}))
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
    excluded = _exclusions(spec.get("exclude"), axes, values)
    runs, seen_configs = [], set()
    for combo in itertools.product(*[list(opts.items()) for opts in axes.values()]):
        overrides: dict[str, Any] = {}
        labels = {}
        for axis, (value_name, value_overrides) in zip(axes, combo, strict=True):
            labels[axis] = str(value_name)
            overrides.update(value_overrides or {})
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
            train_overrides = {"train.steps": steps,
                               "train.eval_every": max(1, steps // max(1, evals)),
                               "train.save_every": max(1, steps // max(1, evals))}  # fmt: skip
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


def finished_runs(out: Path) -> dict[str, dict[str, Any]]:
    """name -> the result line of each finished run of OUT/results.jsonl."""
    path = Path(out) / RESULTS_FILE
    if not path.is_file():
        return {}
    with open(path) as f:  # shared lock: never read a line another process is appending
        fcntl.flock(f, fcntl.LOCK_SH)
        try:
            records = read_jsonl(path, "sweep results")
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    finished = {}
    for number, record in enumerate(records, 1):
        if not isinstance(record.get("name"), str):
            raise SweepError(f"{path}: record {number} is not a sweep result (no name)")
        finished[record["name"]] = record
    return finished


def _refuse_changed(run: PlannedRun, where: str, changed: list[str]) -> None:
    """A spec (or a default) changed under a run already started or finished: mixing the two
    configurations in one study would be silent, so stop and say what changed."""
    if changed:
        more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
        shown = "; ".join(changed[:3]) + more
        raise SweepError(
            f"run {run.name} in {where} was trained with a different configuration ({shown}); "
            "restore the spec, or move the run out (and its results.jsonl line) to redo it"
        )


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


TRACE_POINTS = 48  # training-log points kept in a result line (the last one always)


def training_trace(metrics: list[dict]) -> list[dict]:
    """The training log thinned to about TRACE_POINTS evenly spaced records of the step, the
    loss, the gradient norm and the routing balances: the run directory (and its full log)
    is scratch, so this is what a study keeps to diagnose a run afterwards (a gain that fades,
    a router that collapses)."""
    train = [r for r in metrics if "loss" in r and "val_loss" not in r]
    if len(train) > TRACE_POINTS:
        stride = len(train) / TRACE_POINTS
        train = [train[int(i * stride)] for i in range(TRACE_POINTS - 1)] + [train[-1]]
    keep = ("step", "loss", "grad_norm")
    return [{k: v for k, v in r.items() if k in keep or k.endswith("_balance")} for r in train]


def result_record(run: PlannedRun, run_dir: Path) -> dict[str, Any]:
    metrics = read_metrics(run_dir)
    val = [r for r in metrics if "val_loss" in r]
    if not val:
        raise SweepError(f"run {run.name} finished without a validation loss")
    info = summarize(run.config.model, run.config.train.seq_len)
    per_step = run.config.train.batch_size * run.config.train.seq_len
    return {
        "name": run.name,
        "variant": run.labels.get("variant", run.config.model.tokmod.kind),
        "backbone": run.labels.get("backbone", f"d{run.config.model.d_model}-"
                                               f"L{run.config.model.n_layers}"),
        "labels": run.labels,
        "budget": run.budget if run.budget_kind == "flops" else None,
        "budget_kind": run.budget_kind,
        "N_c": info["active_backbone_params"],
        "N_c_total": info["backbone_params"],
        "N_n": info["token_params"],
        "eta": info["eta"],
        "rho": info["rho"],
        "tokens": run.tokens,
        "flops": run.flops,
        "final_val_loss": val[-1]["val_loss"],
        "best_val_loss": min(r["val_loss"] for r in val),
        "curve": [[r["step"], r["step"] * per_step, r["val_loss"]] for r in val],
        "train_trace": training_trace(metrics),
        "config": run.config.to_dict(),
        # The data compared by content, not path: a moved or rebuilt copy still matches.
        "data_fingerprint": data_fingerprint(data.load_manifest(run.config.train.data)),
        # Where it ran, for reading timings (and bitwise reproduction: the thread count
        # changes the floating-point reduction order on CPU).
        "machine": {"device": "cuda" if torch.cuda.is_available() else "cpu",
                    "threads": torch.get_num_threads(),
                    "median_tokens_per_s": _median([r["tokens_per_s"] for r in metrics
                                                    if "tokens_per_s" in r])},  # fmt: skip
    }


def append_result(out: Path, record: dict[str, Any]) -> None:
    """Append one line under an exclusive lock (several processes may share the file)."""
    path = Path(out) / RESULTS_FILE
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            append_jsonl(path, record)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise SweepError(f"--shard expects I/N, got {text!r}") from None
    if not 0 <= index < count:
        raise SweepError(f"--shard {text}: need 0 <= I < N")
    return index, count


def _check_recorded(run: PlannedRun, out: Path, finished: dict[str, dict]) -> None:
    """Refuse a run whose result line or checkpoint was made under another config."""
    run_dir = out / "runs" / run.name
    if run.name in finished:
        record = finished[run.name]
        changed = differences_ignoring_data_path(record.get("config"), run.config,
                                                 record.get("data_fingerprint"))  # fmt: skip
        _refuse_changed(run, str(out / RESULTS_FILE), changed)
    elif latest_checkpoint(run_dir) is not None:
        _refuse_changed(run, str(run_dir), run_differences(run_dir, run.config))


@contextlib.contextmanager
def claim_run(out: Path, name: str):
    """Yield True while this process holds the run directory's lock (jtok.run.lock, the
    trainer's own), False if another process holds it. The kernel drops the lock when its
    holder dies, so a killed sweep never leaves a run claimed."""
    run_dir = Path(out) / "runs" / name
    if not try_lock(run_dir):
        yield False
        return
    try:
        yield True
    finally:
        unlock(run_dir)


def select_runs(runs: list[PlannedRun], shard: tuple[int, int],
                only: list[str] | None) -> list[PlannedRun]:  # fmt: skip
    index, count = shard
    mine = [r for i, r in enumerate(runs) if i % count == index]
    if only:
        for pattern in only:
            if not any(fnmatch.fnmatchcase(r.name, pattern) for r in runs):
                raise SweepError(f"--only {pattern!r} matches no run of the spec "
                                 f"(names look like {runs[0].name})")  # fmt: skip
        mine = [r for r in mine if any(fnmatch.fnmatchcase(r.name, p) for p in only)]
    return mine


def preflight(runs: list[PlannedRun], out: Path) -> None:
    """Check, before anything is written or trained, what would stop a run later: the
    output path, every data directory, every device, and every run's memory needs."""
    check_out_dir(out)
    for data_dir in dict.fromkeys(r.config.train.data for r in runs):
        data.verify_data_dir(data_dir)
    for run in runs:
        device = resolve_device(run.config.train.device)
        data.check_vocab(data.load_manifest(run.config.train.data), run.config.model.vocab_size)
        check_memory(run.config.model, device, training=True, what=f"sweep run {run.name}",
                     batch=run.config.train.batch_size // run.config.train.grad_accum,
                     seq_len=run.config.train.seq_len,
                     table_placement=run.config.train.table_placement)  # fmt: skip


def run_sweep(
    spec_path: Path, out: Path, shard: tuple[int, int] = (0, 1), dry_run: bool = False,
    progress: bool = True, log=print, only: list[str] | None = None,
) -> list[PlannedRun]:  # fmt: skip
    spec = load_mapping(spec_path, "sweep spec")
    mine = select_runs(plan(spec), shard, only)
    if dry_run:
        return mine
    out = Path(out)
    preflight(mine, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SweepError(f"cannot create --out {out}: {err.strerror or err}") from None
    # The copy follows the spec that last ran here: a grid may grow between sessions.
    write_json_atomic(out / SPEC_COPY_FILE, spec)
    done = finished_runs(out)
    for run in mine:  # check the whole share first: fail before any run starts
        _check_recorded(run, out, done)
    for i, run in enumerate(mine):
        if run.name in done:
            continue
        with claim_run(out, run.name) as claimed:
            if not claimed:
                log(f"[{i + 1}/{len(mine)}] {run.name}: running in another process, passed over")
                continue
            # Another process may have finished or started it since the first check.
            finished = finished_runs(out)
            _check_recorded(run, out, finished)
            if run.name in finished:
                continue
            run_dir = out / "runs" / run.name
            resume = latest_checkpoint(run_dir) is not None
            log(f"[{i + 1}/{len(mine)}] {run.name}: {run.config.train.steps} steps, "
                f"{run.tokens:.3g} tokens, {run.flops:.3g} FLOPs"
                + (f" ({run.flops / run.budget:.3g}x its budget)" if run.budget_kind == "flops"
                   and run.flops > 1.5 * run.budget else "")
                + (" (resuming)" if resume else ""))  # fmt: skip
            train(run.config, run_dir, resume=resume, overwrite=not resume,
                  progress=progress, log=log)  # fmt: skip
            append_result(out, result_record(run, run_dir))
    return mine


def describe(runs: list[PlannedRun]) -> str:
    lines = [f"{'run':<44}{'N_c':>11}{'N_n':>12}{'steps':>8}{'tokens':>10}{'FLOPs':>10}"]
    for r in runs:
        info = summarize(r.config.model, r.config.train.seq_len)
        lines.append(
            f"{r.name:<44}{info['active_backbone_params']:>11,}{info['token_params']:>12,}"
            f"{r.config.train.steps:>8}{r.tokens:>10.3g}{r.flops:>10.3g}"
        )
    total = sum(r.flops for r in runs)
    lines.append(f"{len(runs)} runs, {total:.3g} training FLOPs in all"
                 + (f" (~{math.log10(total):.1f} in log10)" if total > 0 else ""))  # fmt: skip
    # A budget below one optimizer step still trains one step: say so, since `jtok fit`
    # groups such runs under a budget they overran.
    over = [r for r in runs if r.budget_kind == "flops" and r.flops > 1.5 * r.budget]
    if over:
        worst = max(over, key=lambda r: r.flops / r.budget)
        lines.append(f"warning: {len(over)} run(s) train over 1.5x their FLOP budget, as one "
                     f"step costs more (worst {worst.name}: {worst.flops / worst.budget:.3g}x); "
                     "raise the budget or shrink the batch")  # fmt: skip
    return "\n".join(lines)
