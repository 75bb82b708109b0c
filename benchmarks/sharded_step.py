#!/usr/bin/env python3
"""Sharded tables under torchrun on CPU (gloo): step time against replicated tables, and
memory per process against the world size W.

    python3 benchmarks/sharded_step.py time   [--preset small] [--tokens 512 2048] [--reps 5]
    python3 benchmarks/sharded_step.py memory [--preset small] [--worlds 1 2 4]

time: 2 processes, one thread each. Four set-ups train the same JTok-M model on the same
Zipfian batches (exponent 1.1, frequent ids scattered over the vocabulary): "device" (every
process holds the whole table, DDP for the backbone, the sparse table gradients
all-gathered by `average_table_gradients`) and the sharded store with its exchange path
"auto", forced "raw" and forced "premixed" (DDP for the backbone). A step is the trainer's:
forward, backward, table-gradient averaging, global clipping, both optimizers. Timed
interleaved: each repetition runs every set-up for `--steps` steps in a rotating order,
each step between barriers; a set-up's figure is the median over its steps, and the ratio
is the median over repetitions of (set-up / device) in the same repetition, with its
min-max over repetitions. The bytes each step sent between processes are counted too.

memory: W processes of the sharded store (FSDP2 for the backbone at W > 1), a few steps,
then each process's resident memory (VmRSS, and its growth since before the model was
built), its block of rows and its RowAdam state, beside `jtok info`'s plan for the same
configuration.

Results go to benchmarks/results/sharded_step.json and sharded_memory.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETUPS = ("device", "sharded-auto", "sharded-raw", "sharded-premixed")


def _rss() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def _model_cfg(name: str):
    from jtok.presets import preset

    return preset(name).with_overrides({"tokmod.kind": "jtokm", "tokmod.n_e": "5",
                                        "tokmod.top_k": "2"})  # fmt: skip


class _Setup:
    """One model, wrapped and with its optimizers, and the trainer's step for it."""

    def __init__(self, name: str, cfg, env, parallel: str):
        from jtok.config import TrainConfig
        from jtok.nn.model import build_model
        from jtok.parallel.wrap import parallelize, table_parameters
        from jtok.training.optim import Optimizers

        placement = "device" if name == "device" else "sharded"
        self.model = build_model(cfg, seed=0, table_placement=placement).train()
        self.sharded = placement == "sharded"
        if self.sharded:
            self.model.token_tables.exchange_path = name.split("-", 1)[1]
        self.env = env
        self.wrapped = parallelize(self.model, env, parallel, "fp32")
        self.optimizers = Optimizers(self.model, TrainConfig(data="unused", warmup_steps=0))
        self.tables = [p for _, p in table_parameters(self.model)]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.table_gather_bytes = 0  # device: the all-gather of sparse table gradients

    def step(self, ids) -> None:
        from jtok.parallel.distributed import all_reduce_mean_, average_table_gradients
        from jtok.training.evaluate import lm_loss
        from jtok.training.loop import clip_grad_norm_

        loss, out = lm_loss(self.wrapped, ids[:, :-1], ids[:, 1:])
        (loss + out.aux_loss).backward()
        all_reduce_mean_(loss.detach(), self.env)
        for p in self.tables:  # what each process sends the others: int64 index + row
            if p.grad is not None and self.env.world_size > 1:
                rows = p.grad.coalesce()._nnz()
                self.table_gather_bytes += rows * (8 + 4 * p.shape[1]) * (self.env.world_size - 1)
        average_table_gradients(self.tables, self.env)
        rows = self.model.token_tables.store_parameters() if self.sharded else ()
        clip_grad_norm_(self.params, 1.0, distributed_rows=rows)
        self.optimizers.step()
        self.optimizers.zero_grad()

    def sent_bytes(self) -> int:
        if self.sharded:
            meter = self.model.token_tables.meter
            return meter["data"] + meter["control"]
        return self.table_gather_bytes


def _init():
    import torch
    import torch.distributed as dist

    from jtok.parallel.distributed import DistEnv

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size())


def worker_time(args: dict) -> None:
    import torch
    import torch.distributed as dist

    from jtok.bench.train_step import zipf_token_batches

    env = _init()
    cfg = _model_cfg(args["preset"])
    setups = {name: _Setup(name, cfg, env, "ddp") for name in SETUPS}
    result = {"sizes": []}
    for tokens in args["tokens"]:
        seq = min(256, tokens)
        batch = tokens // seq
        n = args["reps"] * args["steps"] + 1
        batches = zipf_token_batches(cfg.vocab_size, batch, seq, n, seed=1 + env.rank)
        times = {name: [] for name in SETUPS}  # per repetition: the step times
        cpu = {name: [] for name in SETUPS}
        sent = {name: [] for name in SETUPS}
        paths = []
        for setup in setups.values():  # warm-up: first-step allocations, lazy state
            setup.step(batches[0])
        for rep in range(args["reps"]):
            order = SETUPS[rep % len(SETUPS):] + SETUPS[:rep % len(SETUPS)]
            for name in order:
                setup = setups[name]
                wall, proc = [], []
                before = setup.sent_bytes()
                for i in range(args["steps"]):
                    dist.barrier()
                    t0, c0 = time.perf_counter(), time.process_time()
                    setup.step(batches[1 + rep * args["steps"] + i])
                    dist.barrier()
                    wall.append(time.perf_counter() - t0)
                    proc.append(time.process_time() - c0)
                total = torch.tensor([setup.sent_bytes() - before], dtype=torch.float64)
                dist.all_reduce(total)
                times[name].append(statistics.median(wall))
                cpu[name].append(statistics.median(proc))
                sent[name].append(float(total) / args["steps"])
                if name == "sharded-auto":
                    paths.append(setups[name].model.token_tables.last_exchange)
        ratios = {name: [t / d for t, d in zip(times[name], times["device"], strict=True)]
                  for name in SETUPS}  # fmt: skip
        cpu_ratios = {name: [t / d for t, d in zip(cpu[name], cpu["device"], strict=True)]
                      for name in SETUPS}  # fmt: skip
        result["sizes"].append({
            "tokens_per_process": tokens, "batch": batch, "seq_len": seq,
            "ms_per_step": {n: 1e3 * statistics.median(v) for n, v in times.items()},
            "cpu_ms_per_step": {n: 1e3 * statistics.median(v) for n, v in cpu.items()},
            "ratio_wall": {n: statistics.median(v) for n, v in ratios.items()},
            "ratio_wall_min_max": {n: [min(v), max(v)] for n, v in ratios.items()},
            "ratio_cpu": {n: statistics.median(v) for n, v in cpu_ratios.items()},
            "bytes_sent_per_step_all_processes": {n: statistics.median(v)
                                                  for n, v in sent.items()},
            "auto_path": paths[-1],
        })  # fmt: skip
    if env.rank == 0:
        Path(args["result"]).write_text(json.dumps(result))
    dist.destroy_process_group()


def worker_memory(args: dict) -> None:
    import torch
    import torch.distributed as dist

    from jtok.bench.train_step import zipf_token_batches

    env = _init()
    # Everything a step imports, imported before the baseline: modules are not the model.
    import jtok.nn.model
    import jtok.parallel.wrap
    import jtok.training.evaluate
    import jtok.training.loop
    import jtok.training.optim  # noqa: F401

    cfg = _model_cfg(args["preset"])
    before = _rss()
    setup = _Setup("sharded-auto", cfg, env, "fsdp")
    built = _rss()["VmRSS"]
    batches = zipf_token_batches(cfg.vocab_size, args["batch"], args["seq_len"], 3,
                                 seed=1 + env.rank)  # fmt: skip
    stepped = []
    for ids in batches:
        setup.step(ids)
        stepped.append(_rss()["VmRSS"])
    store = setup.model.token_tables
    state = setup.optimizers.optimizers[-1].state[store.weight]
    after = _rss()
    mine = {"rank": env.rank, "rss_before_model": before["VmRSS"], "rss": after["VmRSS"],
            "rss_peak": after["VmHWM"], "rss_growth": after["VmRSS"] - before["VmRSS"],
            "rss_after_build": built, "rss_after_each_step": stepped,
            "table_rows": store.weight.shape[0],
            "table_block_bytes": store.weight.numel() * store.weight.element_size(),
            "table_state_bytes": sum(t.numel() * t.element_size() for t in state.values()
                                     if isinstance(t, torch.Tensor))}  # fmt: skip
    everyone = [None] * env.world_size
    if env.world_size > 1:
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    if env.rank == 0:
        Path(args["result"]).write_text(json.dumps(everyone))
    dist.destroy_process_group()


def _launch(world: int, mode: str, args: dict) -> dict | list:
    with tempfile.TemporaryDirectory() as tmp:
        args = {**args, "result": str(Path(tmp, "result.json"))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}", __file__, f"--worker-{mode}", json.dumps(args)]
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(done.stderr[-4000:])
        return json.loads(Path(args["result"]).read_text())


def _plan(preset_name: str, world: int, batch: int, seq_len: int) -> dict:
    cmd = ["jtok", "info", "--preset", preset_name, "--set", "tokmod.kind=jtokm",
           "--set", "tokmod.n_e=5", "--set", "tokmod.top_k=2", "--world-size", str(world),
           "--parallel", "fsdp", "--table-placement", "sharded", "--batch", str(batch),
           "--seq-len", str(seq_len), "--json"]  # fmt: skip
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)[
        "memory_plan"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("time", "memory"))
    parser.add_argument("--preset", default="small")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048],
                        help="tokens per process and step (time)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per set-up and repetition")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=2, help="sequences per process (memory)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    meta = {"preset": args.preset, "tokmod": "jtokm n_e=5 K=2", "torch": torch.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    if args.mode == "time":
        started = time.time()
        result = _launch(2, "time", {"preset": args.preset, "tokens": args.tokens,
                                     "reps": args.reps, "steps": args.steps})  # fmt: skip
        out = {**meta, "world_size": 2, "threads_per_process": 1, "reps": args.reps,
               "steps": args.steps, "seconds": round(time.time() - started), **result}
        default = "sharded_step.json"
    else:
        rows = []
        for world in args.worlds:
            measured = _launch(world, "memory", {"preset": args.preset, "batch": args.batch,
                                                 "seq_len": args.seq_len})  # fmt: skip
            rows.append({"world_size": world, "processes": measured,
                         "plan": _plan(args.preset, world, args.batch, args.seq_len)})
        out = {**meta, "parallel": "fsdp", "batch": args.batch, "seq_len": args.seq_len,
               "worlds": rows}
        default = "sharded_memory.json"
    path = Path(args.out or ROOT / "benchmarks" / "results" / default)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] in ("--worker-time", "--worker-memory"):
        sys.path.insert(0, str(ROOT))
        (worker_time if sys.argv[1] == "--worker-time" else worker_memory)(json.loads(sys.argv[2]))
    else:
        main()
