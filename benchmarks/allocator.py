"""The training step with glibc's freed memory kept (the `jtok` program's default) and with
glibc's defaults (JTOK_SYSTEM_MALLOC=1): step time, kernel time, page faults, peak memory.

An allocator setting is per process, so the two settings run as alternating `jtok bench`
processes (rounds; the order flips every round), each timing the baseline and JTok-M
interleaved as usual. Per child process the kernel's own accounting (`os.wait4`) gives its
peak resident memory, CPU time in user and kernel mode, and minor page faults.

    python3 benchmarks/allocator.py --rounds 4 --reps 8 --out results/allocator.json

Figures: the step time of each variant under both settings (paired by round: kept /
system), and JTok-M's ratio to the baseline under each (the per-repetition paired ratios
of all rounds pooled, with the median's 95% interval).
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

from jtok.bench.paired import median_interval
from jtok.io import write_json_atomic

SETTINGS = ("kept", "system")


def child_environment(setting: str) -> dict[str, str]:
    """This environment without any malloc setting of its own, plus the opt-out if asked."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}  # fmt: skip
    env.pop("JTOK_SYSTEM_MALLOC", None)
    if setting == "system":
        env["JTOK_SYSTEM_MALLOC"] = "1"
    return env


def run_bench(setting: str, args) -> dict:
    """One `jtok bench` process; its output goes to files, so that `os.wait4` can reap it
    and return its resource usage (peak RSS, CPU times, page faults) without a pipe to
    drain."""
    command = [sys.executable, "-m", "jtok", "bench", "--preset", args.preset,
               "--variants", "jtokm", "--reps", str(args.reps), "--steps", "1",
               "--threads", str(args.threads), "--json"]  # fmt: skip
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, env=child_environment(setting), stdout=out,
                                 stderr=err)  # fmt: skip
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode != 0:
        raise SystemExit(f"jtok bench failed ({setting}): {stderr.strip()[-500:]}")
    result = json.loads(stdout)
    return {"setting": setting, "allocator": result["allocator"], "result": result,
            "peak_rss_kib": usage.ru_maxrss, "user_s": usage.ru_utime,
            "system_s": usage.ru_stime, "minor_faults": usage.ru_minflt}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs = []
    for round_index in range(args.rounds):
        order = SETTINGS if round_index % 2 == 0 else SETTINGS[::-1]
        for setting in order:
            run = run_bench(setting, args)
            run["round"] = round_index
            runs.append(run)
            steps = run["result"]["variants"]
            times = "  ".join(f"{v} {steps[v]['step_ms_median']:.0f} ms" for v in steps)
            print(f"round {round_index + 1}/{args.rounds} {setting:>6}: {times}", file=sys.stderr)
    summary = summarize(runs)
    print(json.dumps(summary, indent=1))
    if args.out is not None:
        write_json_atomic(args.out, {"summary": summary, "runs": runs, "args": vars(args)
                                     | {"out": str(args.out)}})  # fmt: skip


def summarize(runs: list[dict]) -> dict:
    by = {s: [r for r in runs if r["setting"] == s] for s in SETTINGS}
    summary: dict = {"allocator": {s: by[s][0]["allocator"] for s in SETTINGS}}
    for variant in ("baseline", "jtokm"):
        ms = {s: [r["result"]["variants"][variant]["step_ms_median"] for r in by[s]]
              for s in SETTINGS}  # fmt: skip
        paired = [k / s for k, s in zip(ms["kept"], ms["system"], strict=True)]
        summary[f"{variant}_step_ms"] = {s: statistics.median(v) for s, v in ms.items()}
        summary[f"{variant}_kept_over_system"] = {
            "median": statistics.median(paired), "min": min(paired), "max": max(paired)}
    for setting in SETTINGS:
        ratios = []
        for r in by[setting]:
            v = r["result"]["variants"]
            pairs = zip(v["jtokm"]["step_ms_all"], v["baseline"]["step_ms_all"], strict=True)
            ratios += [a / b for a, b in pairs]
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
