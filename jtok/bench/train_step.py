"""Training-step throughput: baseline vs JTok vs JTok-M on one backbone.

Machines here are shared and noisy, so the variants are timed interleaved (each
repetition times every variant once, in a rotating order) and the figure of merit is
the median over repetitions of each variant's step time divided by the baseline's in
the same repetition. Both wall time and the process's CPU time are recorded: CPU time
is not inflated when another process takes the cores, so its ratio is the steadier one
on a busy machine (with one thread it is the cleanest measure of work done).

With ``placements`` including "host", JTok and JTok-M are also timed with their tables in
host memory (jtok.tables.host), stepped as the trainer steps them: the next batch's rows
are gathered on the store's background thread while this step computes, the rows'
gradients are pulled to the host after backward, and RowAdam steps them under the store's
lock. Those configurations are named "jtok/host" and "jtokm/host".

On CUDA (``device``) the forward runs under the trainer's bf16 autocast (precision "auto";
on the CPU it is fp32, as the trainer's), each timed window is closed by a synchronisation
before its time is read, and each configuration's peak accelerator memory above what was
resident when its window began is reported (every configuration's model stays resident, so
the absolute peak would count the others'); with host tables the keys are computed from
the ids on the host, as the trainer computes them.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import statistics
import sys
import time
from collections import defaultdict

import torch

from jtok.allocator import allocator_setting
from jtok.bench.paired import (
    interval_text,
    quartile_text,
    ratio_interval,
    ratio_summary,
)
from jtok.config import ModelConfig, TrainConfig
from jtok.flops import summarize
from jtok.nn.model import build_model
from jtok.training.evaluate import autocast_context, lm_loss
from jtok.training.loop import clip_grad_norm_
from jtok.training.optim import Optimizers

VARIANTS = ("baseline", "jtok", "jtokm")


def variant_config(cfg: ModelConfig, variant: str, sparse_grad: bool = False) -> ModelConfig:
    """The same backbone with no modulation, JTok or JTok-M (other tokmod fields kept)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    kind = "none" if variant == "baseline" else variant
    tokmod = dataclasses.replace(cfg.tokmod, kind=kind, sparse_grad=sparse_grad)
    return dataclasses.replace(cfg, tokmod=tokmod)


def zipf_token_batches(vocab: int, batch: int, seq_len: int, n_batches: int,
                       exponent: float = 1.1, seed: int = 0) -> list[torch.Tensor]:  # fmt: skip
    """Token ids drawn from a Zipf law over the vocabulary, like word frequencies in text."""
    gen = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** exponent
    perm = torch.randperm(vocab, generator=gen)  # frequent ids scattered over the table
    # Inverse-CDF sampling: torch.multinomial refuses more than 2**24 categories.
    cdf = probs.cumsum(0)
    uniform = torch.rand(n_batches * batch * (seq_len + 1), generator=gen, dtype=torch.float64)
    draws = torch.searchsorted(cdf, uniform * cdf[-1]).clamp_(max=vocab - 1)
    ids = perm[draws].view(n_batches, batch, seq_len + 1)
    return list(ids)


def sync_device(device: torch.device) -> None:
    """Wait for the accelerator's queued work, so a timer read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loss(model, batch_ids: torch.Tensor, token_rows=None) -> torch.Tensor:
    """The trainer's loss of one batch, under its autocast (bf16 on CUDA, fp32 on CPU)."""
    with autocast_context(batch_ids.device, "auto"):
        loss, out = lm_loss(model, batch_ids[:, :-1], batch_ids[:, 1:], token_rows)
    return loss + out.aux_loss


class PhaseClock:
    """Where a training step's time goes: the time from one `mark` to the next, summed per
    phase name over a step, one sample per phase and step (`--phases`). On an accelerator
    each mark first waits for the device, so the phases are its times too; those waits also
    serialise the step, which is why the clock is opt-in. Steps are kept only once
    `recording` is set (the benchmark sets it after the warm-up)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.recording = False
        self.samples: dict[str, list[float]] = defaultdict(list)
        self._step: dict[str, float] = defaultdict(float)
        self._last = 0.0

    def start(self) -> None:
        sync_device(self.device)
        self._step.clear()
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        sync_device(self.device)
        now = time.perf_counter()
        self._step[phase] += now - self._last
        self._last = now

    def finish(self) -> None:
        if self.recording:
            for phase, seconds in self._step.items():
                self.samples[phase].append(seconds)

    def medians_ms(self) -> dict[str, float]:
        return {phase: statistics.median(v) * 1e3 for phase, v in self.samples.items()}


def _mark(clock: PhaseClock | None, phase: str) -> None:
    if clock is not None:
        clock.mark(phase)


def train_step(model, optimizers: Optimizers, batch_ids: torch.Tensor,
               clock: PhaseClock | None = None, grad_clip: float = 0.0,
               forward=None) -> float:  # fmt: skip
    """One training step; with `grad_clip` > 0 also the trainer's global clipping.
    `forward`: the callable that runs the model (the model itself, or its torch.compile)."""
    if clock is not None:
        clock.start()
    loss = _loss(model if forward is None else forward, batch_ids)
    _mark(clock, "forward")
    loss.backward()
    _mark(clock, "backward")
    if grad_clip > 0:
        clip_grad_norm_(list(model.parameters()), grad_clip)
        _mark(clock, "clip")
    for opt in optimizers.optimizers:  # Optimizers.step, one phase per optimizer
        opt.step()
        _mark(clock, f"step {type(opt).__name__}")
    optimizers.zero_grad()
    value = loss.item()
    if clock is not None:
        clock.mark("zero_grad, loss.item")
        clock.finish()
    return value


def _ignore_ids(step, batch_ids: torch.Tensor) -> float:
    return step()


class HostTableSteps:
    """Training steps of a host-table model in the trainer's order (jtok.training.loop):
    rows of step i + 1 requested before step i computes; gradients pulled after backward;
    the row optimizer steps under the store's lock, then the rows it changed are re-read
    for any gather already made (so the prefetch never changes a result)."""

    def __init__(self, model, optimizers: Optimizers, batches: list[torch.Tensor],
                 device: torch.device | None = None, clock: PhaseClock | None = None,
                 forward=None):  # fmt: skip
        """`batches` on the host; `device` is the model's (default: the batches'); `clock`
        times each step's phases (`PhaseClock`); `forward` runs the model (default: itself)."""
        self.model, self.optimizers, self.batches = model, optimizers, batches
        self.forward = model if forward is None else forward
        self.clock = clock
        self.device = device if device is not None else batches[0].device
        self.on_device = [b.to(self.device) for b in batches]
        self.store = model.token_tables
        self.next = 0
        self.pending = self._fetch(0)

    def _fetch(self, index: int):
        # The key from the host ids, its positions moved to the model (the trainer's order).
        keys = self.store.key(self.batches[index % len(self.batches)][:, :-1])
        keys.inverse_N = keys.inverse_N.to(self.device, non_blocking=True)
        return self.store.fetch(keys, self.device)

    def step(self) -> float:
        clock = self.clock
        if clock is not None:
            clock.start()
        batch_ids = self.on_device[self.next % len(self.batches)]
        token_rows = self.store.consume(self.pending)
        self.next += 1
        self.pending = self._fetch(self.next)  # overlaps this step's compute
        loss = _loss(self.forward, batch_ids, token_rows)
        _mark(clock, "forward")  # with the rows' hand-over and the next batch's request
        loss.backward()
        _mark(clock, "backward")
        pulled = self.store.pull_gradients()
        _mark(clock, "pull table gradients")
        with self.store.step_lock():
            self.optimizers.step()
        _mark(clock, "step " + " + ".join(type(o).__name__ for o in self.optimizers.optimizers))
        self.store.after_step(pulled)
        self.optimizers.zero_grad()
        value = loss.item()
        if clock is not None:
            clock.mark("after step, zero_grad, loss.item")
            clock.finish()
        return value


def configurations(variants: list[str], placements) -> list[tuple[str, str]]:
    """The (variant, table placement) pairs the benchmark holds at once: the baseline once
    (it has no tables), each other variant at each placement."""
    pairs = [("baseline", "device")]
    pairs += [(v, p) for p in placements for v in variants if v != "baseline"]
    return pairs


def train_step_benchmark(cfg: ModelConfig, variants: list[str], batch: int, seq_len: int,
                         steps: int, reps: int, warmup: int = 2, threads: int | None = None,
                         optimizer: str = "adamw", progress: bool = False,
                         placements: tuple[str, ...] = ("device",),
                         device: torch.device | str = "cpu", phases: bool = False,
                         compile_model: bool = False) -> dict:  # fmt: skip
    """With `phases`, each configuration's steps also record where their time goes
    (`PhaseClock`); warm-up steps are not recorded. With `compile_model` every model runs
    through `torch.compile` (as `train.compile` does in the trainer), the baseline too, so
    the ratios compare equals; the warm-up steps then include the compilation."""
    device = torch.device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    if "baseline" not in variants:
        variants = ["baseline", *variants]
    if "host" in placements and optimizer != "sparse":
        raise ValueError("host tables train with sparse gradients and RowAdam only")
    host_batches = zipf_token_batches(cfg.vocab_size, batch, seq_len, n_batches=4)
    batches = [b.to(device) for b in host_batches]
    runs = {}
    clocks: dict[str, PhaseClock] = {}
    for variant, placement in configurations(variants, placements):
        name = variant if placement == "device" else f"{variant}/{placement}"
        vcfg = variant_config(cfg, variant, sparse_grad=optimizer == "sparse")
        model = build_model(vcfg, seed=0, device=device, table_placement=placement).train()
        # The trainer's optimizer roles: AdamW by role, RowAdam for sparse-gradient tables.
        opts = Optimizers(model, TrainConfig(lr=1e-3))
        clock = PhaseClock(device) if phases else None
        forward = torch.compile(model) if compile_model else model
        if placement == "host":  # its own batch order (it prefetches ahead): ids ignored
            host_steps = HostTableSteps(model, opts, host_batches, device, clock=clock,
                                        forward=forward)  # fmt: skip
            steps_of = functools.partial(_ignore_ids, host_steps.step)
        else:
            steps_of = functools.partial(train_step, model, opts, clock=clock, forward=forward)
        runs[name] = (vcfg, steps_of, placement)
        for i in range(warmup):
            steps_of(batches[i % len(batches)])
        if clock is not None:
            clock.recording = True  # from here on: the warm-up is not recorded
            clocks[name] = clock
    variants = list(runs)

    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu_times: dict[str, list[float]] = {v: [] for v in variants}
    peak: dict[str, int] = {}
    for rep in range(reps):
        order = variants[rep % len(variants):] + variants[: rep % len(variants)]
        for variant in order:
            run_step = runs[variant][1]
            sync_device(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            for step in range(steps):
                run_step(batches[step % len(batches)])
            sync_device(device)
            times[variant].append((time.perf_counter() - start) / steps)
            cpu_times[variant].append((time.process_time() - start_cpu) / steps)
            if device.type == "cuda":
                above = torch.cuda.max_memory_allocated(device) - resident
                peak[variant] = max(peak.get(variant, 0), above)
        if progress:
            print(f"rep {rep + 1}/{reps}: " + "  ".join(
                f"{v} {times[v][-1] * 1e3:.0f} ms" for v in variants), file=sys.stderr)  # fmt: skip

    unique = [int(torch.unique(b[:, :-1]).numel()) for b in batches]
    result = {
        "phases": phases,
        "backbone": {k: v for k, v in cfg.to_dict().items() if k != "tokmod"},
        "batch": batch, "seq_len": seq_len, "steps": steps, "reps": reps,
        "optimizer": optimizer, "threads": torch.get_num_threads(), "device": str(device),
        "compile": compile_model,
        "torch": torch.__version__, "machine": platform.machine(),
        "allocator": allocator_setting(),
        "unique_ids_per_batch": statistics.median(unique),
        "variants": {},
    }  # fmt: skip
    def paired_ratio(samples: dict[str, list[float]], variant: str) -> float:
        return ratio_summary(samples[variant], samples["baseline"])[0]

    for variant in variants:
        vcfg = runs[variant][0]
        step_s = statistics.median(times[variant])
        info = summarize(vcfg, seq_len)
        result["variants"][variant] = {
            "tokmod": vcfg.tokmod.kind,
            "table_placement": runs[variant][2] if vcfg.tokmod.enabled else None,
            "backbone_params": info["backbone_params"],
            "token_params": info["token_params"],
            "step_ms_median": step_s * 1e3,
            "step_ms_all": [t * 1e3 for t in times[variant]],
            "cpu_ms_median": statistics.median(cpu_times[variant]) * 1e3,
            "tokens_per_s": batch * seq_len / step_s,
            # Paired: each repetition's ratio to the baseline, then the median.
            "ratio_to_baseline": paired_ratio(times, variant),
            "ratio_quartiles": ratio_summary(times[variant], times["baseline"])[1],
            # Distribution-free 95% interval of the median ratio (jtok.bench.paired); with
            # fewer than 6 repetitions the whole range, whose coverage is stated.
            **ratio_interval(times[variant], times["baseline"]),
            "cpu_ratio_to_baseline": paired_ratio(cpu_times, variant),
            "accelerator_step_peak_bytes": peak.get(variant),  # above what was resident
        }
        if variant in clocks:
            result["variants"][variant]["phase_ms_median"] = clocks[variant].medians_ms()
    return result


def format_report(result: dict) -> str:
    head = (
        f"train step on {result.get('device', 'cpu')}, batch {result['batch']} x seq "
        f"{result['seq_len']}, "
        f"{result['reps']} reps x {result['steps']} steps, optimizer {result['optimizer']}, "
        f"{result['threads']} threads, ~{result['unique_ids_per_batch']:.0f} distinct ids/batch"
        + (", every model compiled" if result.get("compile") else "")
        + (f"\nhost allocator: {result['allocator']}" if "allocator" in result else "")
    )
    lines = [head, f"{'variant':<12}{'N_c':>12}{'N_n':>12}{'ms/step':>10}{'tok/s':>9}"
                   f"{'ratio':>8}{'(quartiles)':>14}{'95% CI of ratio':>20}{'cpu ms':>9}"
                   f"{'cpu ratio':>10}"]  # fmt: skip
    for name, v in result["variants"].items():
        lines.append(
            f"{name:<12}{v['backbone_params']:>12,}{v['token_params']:>12,}"
            f"{v['step_ms_median']:>10.1f}{v['tokens_per_s']:>9.0f}{v['ratio_to_baseline']:>8.3f}"
            f"{quartile_text(v['ratio_quartiles']):>14}"
            f"{interval_text(v['ratio_ci'], v['ratio_ci_coverage']):>20}"
            f"{v['cpu_ms_median']:>9.1f}{v['cpu_ratio_to_baseline']:>10.3f}"
        )
    with_phases = [(n, v["phase_ms_median"]) for n, v in result["variants"].items()
                   if "phase_ms_median" in v]  # fmt: skip
    if with_phases:
        base = result["variants"].get("baseline", {}).get("phase_ms_median", {})
        lines.append("phases (median ms per step; +/- the baseline's same phase):")
        for name, phase_ms in with_phases:
            parts = [f"{phase} {ms:.1f}" + (f" ({ms - base[phase]:+.1f})"
                                           if name != "baseline" and phase in base else "")
                     for phase, ms in phase_ms.items()]  # fmt: skip
            lines.append(f"  {name:<12}" + ", ".join(parts))
    return "\n".join(lines)
