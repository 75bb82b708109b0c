#!/usr/bin/env python3
"""JTok-M's own path in a training step, without the backbone: where its extra time goes.

    python3 benchmarks/tokmod_path.py [--reps 20] [--threads 1] [--compile] [--out FILE]

The whole step's ratio (`jtok bench`) moves by +-10% a step on a shared machine, more
than JTok-M's share of it. This times JTok-M's part alone: the small preset's six JTok-M
layers (n_e 5, K 2) run on stored activations (h, h~, m: random (8, 256, 256) leaves that
take gradients, as the backbone's do), on the device store's routed rows of Zipfian
batches, then backward and both optimizers (RowAdam for the tables, AdamW for routers and
scales). The reference path does what the baseline's block does in JTok-M's place, h~ + m,
on the same activations. The two are timed interleaved, by phase (key and gather,
forward, backward, optimizers with `zero_grad`); figures are medians of the phase times
and of the per-repetition difference. With ``--compile`` a third path is timed in the same
rotation: the same layers through `torch.compile` (inductor), which fuses each layer's
elementwise work into generated loops; it reads its rows with the up-front gather, since
the routed gather does not run under torch.compile (jtok.tables.routed).

Also timed: one JTok-M layer's forward on hot inputs with autograd, with its inputs
detached, and without autograd. With autograd a forward keeps its saved tensors alive, so
every forward writes into fresh buffers, whose first touches are page faults that the
host allocator may or may not avoid (`benchmarks/README.md`, "glibc's allocator").
The allocator in use is recorded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jtok.allocator import allocator_setting  # noqa: E402
from jtok.bench.paired import median_interval  # noqa: E402
from jtok.bench.train_step import variant_config, zipf_token_batches  # noqa: E402
from jtok.config import TrainConfig  # noqa: E402
from jtok.nn.model import build_model  # noqa: E402
from jtok.presets import preset  # noqa: E402
from jtok.training.optim import Optimizers  # noqa: E402

PHASES = ("keys and gather", "forward", "backward", "optimizers")
REFERENCE = "h~ + m"


class TokmodPath:
    """The small preset's JTok-M layers and tables, on stored activations."""

    def __init__(self, batch: int, seq_len: int, compiled: bool = False):
        cfg = variant_config(preset("small"), "jtokm", sparse_grad=True)
        model = build_model(cfg, seed=0).train()
        self.store = model.token_tables
        self.layers = [block.tokmod for block in model.blocks if block.tokmod is not None]
        if compiled:
            self.store.routed_gather = False  # the up-front gather, which compiles
            self.layers = [torch.compile(layer) for layer in self.layers]
        self.optimizers = Optimizers(model, TrainConfig(lr=1e-3))
        gen = torch.Generator().manual_seed(0)
        shape = (batch, seq_len, cfg.d_model)
        self.activations = [[torch.randn(shape, generator=gen).requires_grad_() for _ in "hhm"]
                            for _ in self.layers]  # fmt: skip
        self.out_grads = [torch.randn(shape, generator=gen) for _ in self.layers]
        self.batches = [b[:, :-1] for b in zipf_token_batches(cfg.vocab_size, batch, seq_len, 4)]

    def step(self, index: int, jtokm: bool) -> list[float]:
        """One step of JTok-M's path (or of h~ + m in its place): seconds per phase."""
        marks = [time.perf_counter()]
        rows = self.store.lookup(self.batches[index % len(self.batches)]) if jtokm else None
        marks.append(time.perf_counter())
        loss = 0.0
        for slot, ((h, h_tilde, m), grad) in enumerate(zip(self.activations, self.out_grads,
                                                             strict=True)):  # fmt: skip
            if jtokm:
                out, aux = self.layers[slot](h, h_tilde, m, rows.layers[slot], rows.inverse_N)
                loss = loss + (out * grad).sum() + aux
            else:
                loss = loss + ((h_tilde + m) * grad).sum()
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        if jtokm:
            self.optimizers.step()
            self.optimizers.zero_grad()
        for tensors in self.activations:
            for t in tensors:
                t.grad = None
        marks.append(time.perf_counter())
        return [b - a for a, b in itertools.pairwise(marks)]

    def layer_forward_ms(self, reps: int) -> dict[str, float]:
        """One layer's forward on the same hot inputs, three ways (median ms)."""
        rows = self.store.lookup(self.batches[0])
        layer, block = self.layers[0], rows.layers[0]
        h, h_tilde, m = self.activations[0]
        detached = [t.detach() for t in (h, h_tilde, m)]

        def timed(run) -> float:
            run()
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            return statistics.median(times) * 1e3

        with_grad = timed(lambda: layer(h, h_tilde, m, block, rows.inverse_N))
        inputs_detached = timed(lambda: layer(*detached, block, rows.inverse_N))
        with torch.no_grad():
            without = timed(lambda: layer(h, h_tilde, m, block, rows.inverse_N))
        return {"with autograd": with_grad, "with autograd, inputs detached": inputs_detached,
                "without autograd": without}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true",
                        help="also time the layers through torch.compile")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.reps < 1 or args.threads < 1:
        parser.error("--reps and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    path = TokmodPath(batch=8, seq_len=256)
    runs = {"jtokm": (path, True), REFERENCE: (path, False)}
    if args.compile:
        runs["jtokm compiled"] = (TokmodPath(batch=8, seq_len=256, compiled=True), True)
    for i in range(3):  # warm-up: first steps make the optimizers' state (and compile)
        for run, jtokm in runs.values():
            run.step(i, jtokm)
    samples: dict[str, list[list[float]]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:  # rotating order
            run, jtokm = runs[name]
            samples[name].append(run.step(rep, jtokm))

    def median_ms(rows: list[list[float]], phase: int) -> float:
        return statistics.median(r[phase] for r in rows) * 1e3

    totals = {name: [sum(r) for r in rows] for name, rows in samples.items()}
    extra = {name: [(a - b) * 1e3 for a, b in zip(totals[name], totals[REFERENCE], strict=True)]
             for name in runs if name != REFERENCE}  # fmt: skip
    result = {
        "threads": torch.get_num_threads(), "reps": args.reps, "torch": torch.__version__,
        "machine": platform.machine(), "allocator": allocator_setting(),
        "phase_ms_median": {phase: {name: median_ms(rows, i) for name, rows in samples.items()}
                            for i, phase in enumerate(PHASES)},
        "step_ms_median": {name: statistics.median(t) * 1e3 for name, t in totals.items()},
        "extra_ms_median": {name: statistics.median(d) for name, d in extra.items()},
        # The median difference's distribution-free interval (95% from 6 repetitions up).
        "extra_ms_ci": {name: list(median_interval(d)) for name, d in extra.items()},
        "extra_ms_all": extra,
        "layer_forward_ms": path.layer_forward_ms(max(args.reps, 10)),
    }  # fmt: skip
    print(f"JTok-M's path alone, small preset, {args.reps} interleaved reps, "
          f"{result['threads']} thread(s); allocator: {result['allocator']}")
    print(f"{'phase':16s}" + "".join(f" {name + ' ms':>18s}" for name in runs))
    for phase, row in result["phase_ms_median"].items():
        print(f"{phase:16s}" + "".join(f" {row[name]:18.2f}" for name in runs))
    for name, ms in result["extra_ms_median"].items():
        low, high, coverage = result["extra_ms_ci"][name]
        print(f"{name}: {ms:.1f} ms a step over {REFERENCE} (median of paired differences; "
              f"[{low:.1f}, {high:.1f}] covers it with {100 * coverage:.0f}%)")
    for name, ms in result["layer_forward_ms"].items():
        print(f"one layer's forward, {name}: {ms:.2f} ms")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
