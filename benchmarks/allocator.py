"""The training step with glibc told to keep freed memory and with glibc's defaults: step
time, kernel time, page faults, peak memory (jtok/allocator.py says why).

An allocator setting is per process, so the two settings run as alternating processes
(rounds; the order flips every round); "kept" is the environment
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184. Per child process the kernel's own
accounting (`os.wait4`) gives its peak resident memory, CPU time in user and kernel mode,
and minor page faults.

    python3 benchmarks/allocator.py steps --rounds 8 --reps 8 \
        --out benchmarks/results/allocator_small.json
    python3 benchmarks/allocator.py large-vocab --out benchmarks/results/allocator_large_vocab.json

`steps`: `jtok bench` processes, each timing the baseline and JTok-M interleaved as usual.
Figures: each variant's step time under both settings (paired by round: kept / system),
and JTok-M's ratio to the baseline under each (the per-repetition paired ratios of all
rounds pooled, with the median's 95% interval).
`large-vocab`: the memory cost where the buffers are large: 14 training steps of the tiny
preset at V = 65536 (512 MiB logits at 8 x 256 tokens), resident memory after each step
and the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from jtok.bench.paired import median_interval, paired_ratios
from jtok.io import write_json_atomic

SETTINGS = ("kept", "system")


KEPT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30)}


def child_environment(setting: str) -> dict[str, str]:
    """This environment without any allocator setting of its own, plus KEPT if asked."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    return env | KEPT if setting == "kept" else env


def run_child(command: list[str], setting: str) -> tuple[dict, object]:
    """One child process and its JSON line; its output goes to files, so that `os.wait4`
    can reap it and return its resource usage without a pipe to drain."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, env=child_environment(setting), stdout=out,
                                 stderr=err)  # fmt: skip
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode != 0:
        raise SystemExit(f"{command[2:4]} failed ({setting}): {stderr.strip()[-500:]}")
    return json.loads(stdout.strip().splitlines()[-1]), usage


def run_bench(setting: str, args) -> dict:
    command = [sys.executable, "-m", "jtok", "bench", "--preset", args.preset,
               "--variants", "jtokm", "--reps", str(args.reps), "--steps", "1",
               "--threads", str(args.threads), "--json"]  # fmt: skip
    result, usage = run_child(command, setting)
    return {"setting": setting, "allocator": result["allocator"], "result": result,
            "peak_rss_kib": usage.ru_maxrss, "user_s": usage.ru_utime,
            "system_s": usage.ru_stime, "minor_faults": usage.ru_minflt}  # fmt: skip


_LARGE_VOCAB = """
import json, resource, sys, time
import torch
from jtok.allocator import allocator_setting
from jtok.bench.train_step import variant_config, zipf_token_batches, train_step
from jtok.config import TrainConfig
from jtok.nn.model import build_model
from jtok.presets import preset
from jtok.training.optim import Optimizers
torch.set_num_threads(2)
cfg = preset("tiny").with_overrides({"vocab_size": 65536, "max_seq_len": 256})
batches = zipf_token_batches(cfg.vocab_size, 8, 256, 4)
model = build_model(variant_config(cfg, "baseline", sparse_grad=True), seed=0).train()
optimizers = Optimizers(model, TrainConfig(lr=1e-3))
rss, seconds = [], []
for i in range(14):
    start = time.perf_counter()
    train_step(model, optimizers, batches[i % 4])
    seconds.append(time.perf_counter() - start)
    rss.append(int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20)
print(json.dumps({"allocator": allocator_setting(), "rss_mib_after_each_step": rss,
                  "step_s": seconds,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def large_vocab(args) -> dict:
    runs = []
    for setting in SETTINGS:
        result, _ = run_child([sys.executable, "-c", _LARGE_VOCAB], setting)
        runs.append({"setting": setting, **result})
        print(f"{setting:>6}: peak {result['peak_rss_mib']:.0f} MiB, after the last step "
              f"{result['rss_mib_after_each_step'][-1]:.0f} MiB, step "
              f"{statistics.median(result['step_s']):.2f} s", file=sys.stderr)  # fmt: skip
    return {"what": "tiny preset, V 65536, batch 8 x 256, baseline, 2 threads, 14 steps",
            "runs": runs}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("steps", "large-vocab"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.what == "large-vocab":
        record = large_vocab(args)
    else:
        runs = []
        for round_index in range(args.rounds):
            order = SETTINGS if round_index % 2 == 0 else SETTINGS[::-1]
            for setting in order:
                run = run_bench(setting, args)
                run["round"] = round_index
                runs.append(run)
                steps = run["result"]["variants"]
                times = "  ".join(f"{v} {steps[v]['step_ms_median']:.0f} ms" for v in steps)
                print(f"round {round_index + 1}/{args.rounds} {setting:>6}: {times}",
                      file=sys.stderr)  # fmt: skip
        record = {"summary": summarize(runs), "runs": runs}
        print(json.dumps(record["summary"], indent=1))
    if args.out is not None:
        write_json_atomic(args.out, record | {"args": vars(args) | {"out": str(args.out)}})


def summarize(runs: list[dict]) -> dict:
    by = {s: [r for r in runs if r["setting"] == s] for s in SETTINGS}
    summary: dict = {"allocator": {s: by[s][0]["allocator"] for s in SETTINGS}}
    for variant in ("baseline", "jtokm"):
        ms = {s: [r["result"]["variants"][variant]["step_ms_median"] for r in by[s]]
              for s in SETTINGS}  # fmt: skip
        paired = paired_ratios(ms["kept"], ms["system"])
        summary[f"{variant}_step_ms"] = {s: statistics.median(v) for s, v in ms.items()}
        summary[f"{variant}_kept_over_system"] = {
            "median": statistics.median(paired), "min": min(paired), "max": max(paired)}
    for setting in SETTINGS:
        ratios = []
        for r in by[setting]:
            v = r["result"]["variants"]
            ratios += paired_ratios(v["jtokm"]["step_ms_all"], v["baseline"]["step_ms_all"])
        low, high, coverage = median_interval(ratios)
        summary[f"jtokm_ratio_{setting}"] = {
            "median": statistics.median(ratios), "ci": [low, high], "coverage": coverage,
            "n": len(ratios)}
        summary[f"process_{setting}"] = {
            "peak_rss_mib": [r["peak_rss_kib"] / 1024 for r in by[setting]],
            "user_s": [r["user_s"] for r in by[setting]],
            "system_s": [r["system_s"] for r in by[setting]],
            "minor_faults": [r["minor_faults"] for r in by[setting]]}
    return summary


if __name__ == "__main__":
    main()
