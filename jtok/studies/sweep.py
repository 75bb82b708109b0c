"""`jtok sweep`: a grid of training runs for scaling-law and isoFLOP studies.

The spec format and the plan it gives are in `jtok.studies.sweep_spec`.

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
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from jtok import data
from jtok.config_file import load_mapping
from jtok.flops import summarize
from jtok.io import append_jsonl, read_json, read_jsonl, write_json_atomic
from jtok.parallel.distributed import resolve_device
from jtok.parallel.resources import check_memory
from jtok.run.checkpoint import latest_checkpoint
from jtok.run.files import CONFIG_FILE, FOLDER_MARKERS, RESULTS_FILE, SPEC_COPY_FILE
from jtok.run.lock import try_lock, unlock
from jtok.run.rundir import (
    check_out_dir,
    data_fingerprint,
    differences_ignoring_data_path,
    read_metrics,
    run_differences,
)
from jtok.studies.sweep_spec import PlannedRun, SweepError, plan
from jtok.training.loop import train


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


def check_study_dir(out: Path, spec: dict) -> None:
    """--out may not be a run's or a prepared data folder (a sweep's files would land among
    theirs), nor hold another study: a spec.json of another `name:` (its results.jsonl
    would mix both). The same study's spec may change (a grid grows between sessions):
    each run's config is checked against its record (`_check_recorded`). Other files (the
    spec itself, notes, a report) may sit beside the study."""
    if not out.is_dir():
        return
    # A study may keep its own spec.json (checked below); a run is also known by its config.
    markers = {**FOLDER_MARKERS, CONFIG_FILE: "a run"}
    del markers[SPEC_COPY_FILE]
    for name, what in markers.items():
        if (out / name).exists():
            raise SweepError(f"--out {out} holds {what} ({name}); give the study a folder of "
                             "its own")  # fmt: skip
    if (out / SPEC_COPY_FILE).exists():
        recorded = read_json(out / SPEC_COPY_FILE, "the study's spec copy")
        before = recorded.get("name") if isinstance(recorded, dict) else None
        if before != spec.get("name"):
            raise SweepError(f"--out {out} holds the study {before!r}, not "
                             f"{spec.get('name')!r}; give each study a folder of its own")


def preflight(runs: list[PlannedRun], out: Path, spec: dict) -> None:
    """Check, before anything is written or trained, what would stop a run later: the
    output path and what it holds, every data directory, every device, and every run's
    memory needs."""
    check_out_dir(out)
    check_study_dir(out, spec)
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
    preflight(mine, out, spec)
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
