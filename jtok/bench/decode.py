"""Decode throughput: prefill time and per-token decode cost, baseline vs JTok vs JTok-M,
with the tables on the model's device or in host memory.

Every configuration runs the same lean greedy loop over the model with a `KVCache`, step
for step what `jtok.inference.generate.generate_batch` does for a batch that never stops
(tests/test_bench.py checks that it produces generate_batch's ids):

- prefill: one forward over the prompts (B, prompt_len), then the argmax of the last
  position's logits;
- decode: `new_tokens` steps, each feeding one token per row and choosing the next by
  argmax; the chosen ids come back to the host once per step (generate_batch needs them
  for its stop checks), and with host tables the next rows are requested as soon as the
  ids are known, so the gather overlaps the step's compute before the first table layer.

Timing follows the training-step benchmark (jtok.bench.train_step): each repetition runs
every configuration once, in a rotating order, and a configuration's ratio to the baseline
is the median over repetitions of (its time / the baseline's time in the same
repetition), per batch size. The baseline has no tables, so it is one model, timed once
per repetition and listed under every placement. Memory: the host's resident set (RSS) as
each model is built, and on CUDA the accelerator bytes each model holds and the peak
allocated while it decodes.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from jtok.allocator import allocator_setting
from jtok.bench.paired import (
    interval_text,
    quartile_text,
    ratio_interval,
    ratio_summary,
)
from jtok.bench.train_step import HostTableSteps, sync_device, variant_config, zipf_token_batches
from jtok.config import ModelConfig, TrainConfig
from jtok.errors import JTokError
from jtok.flops import summarize
from jtok.inference.compiled import compile_for_decoding
from jtok.nn.model import JTokModel, KVCache, build_model
from jtok.tables.keys import inverse_to

PLACEMENTS = ("device", "host")


class HostPlacementError(JTokError):
    """Host-placed tables (or their optimizer state) were found on the accelerator."""


def host_memory() -> dict[str, int | None]:
    """The process's resident set now and at its peak, in bytes (Linux /proc; else the
    peak from getrusage, and None for what is unknown)."""
    current = peak = None
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                value = int(line.split()[1]) * 1024
                if line.startswith("VmRSS:"):
                    current = value
                else:
                    peak = value
    if peak is None:
        try:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        except (ImportError, OSError):
            pass
    return {"rss_bytes": current, "rss_peak_bytes": peak}


def _cuda_allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def _registered_bytes(model: torch.nn.Module, device: torch.device) -> int:
    """Bytes of the parameters and buffers the model registers on `device` (tied once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        # torch.device("cuda") != torch.device("cuda:0"): compare the type, and the index
        # only where `device` names one.
        on_device = tensor.device.type == device.type and (
            device.index is None or tensor.device.index == device.index)  # fmt: skip
        if on_device and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _slack(device: torch.device) -> int:
    # The CUDA caching allocator rounds every block up (to 512 B, 2 MiB segments); a few
    # MiB covers that for any model, and stays far below a table worth offloading.
    return 8 * 2**20 if device.type == "cuda" else 0


def check_host_placement(cfg: ModelConfig, device: torch.device, strict: bool) -> dict:
    """One training step of a throwaway host-table model on `device` (the trainer's
    order: backward, pull the rows' gradients to the host, RowAdam step under the store's
    lock), then: where the table matrix and its RowAdam state live, and how much
    accelerator memory the step used beyond the backbone.

    strict (on an accelerator): raise HostPlacementError if the table or any of its
    optimizer state is on the accelerator, or if the accelerator held table-sized memory.
    On the CPU everything is host memory; the report says so."""
    from jtok.training.optim import Optimizers

    before = _cuda_allocated(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(cfg, seed=0, device=device, table_placement="host").train()
    store = model.token_tables
    opts = Optimizers(model, TrainConfig(lr=1e-3))
    ids = zipf_token_batches(cfg.vocab_size, 2, min(16, cfg.max_seq_len - 1), 1, seed=1)[0]
    # The trainer's order of a host-table step (keys from the host ids, compute on device).
    HostTableSteps(model, opts, [ids], device).step()
    sync_device(device)
    weight = store.weight
    state = [t for opt in opts.optimizers for p, s in opt.state.items() if p is weight
             for t in s.values() if isinstance(t, torch.Tensor)]  # fmt: skip
    state_devices = sorted({str(t.device) for t in state})
    table_bytes = _tensor_bytes(weight) + sum(_tensor_bytes(t) for t in state)
    report = {
        "table_device": str(weight.device),
        "table_registered_on_model": any(p is weight for p in model.parameters()),
        "table_optimizer_state_devices": state_devices,
        "table_and_state_bytes": table_bytes,
        "accelerator": device.type if device.type != "cpu" else None,
    }  # fmt: skip
    if device.type == "cuda":
        backbone = _registered_bytes(model, device)
        report["cuda_model_bytes"] = backbone
        report["cuda_step_peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
        problems = []
        if weight.device.type != "cpu":
            problems.append(f"the table matrix is on {weight.device}")
        if any(not d.startswith("cpu") for d in state_devices):
            problems.append(f"its optimizer state is on {state_devices}")
        if report["table_registered_on_model"]:
            problems.append("the table is registered on the model (model.to would move it)")
        resident = torch.cuda.memory_allocated(device) - before
        report["cuda_resident_after_step_bytes"] = resident
        # After the step the accelerator keeps the backbone, its AdamW state and nothing of
        # the tables: anything table-sized beyond that would be a copy of them.
        if resident > 3 * backbone + _slack(device) and resident > table_bytes // 2:
            problems.append(f"{resident} bytes stay allocated on {device} after the step, "
                            f"for a backbone of {backbone} bytes")  # fmt: skip
        report["ok"] = not problems
        if problems and strict:
            raise HostPlacementError("host placement: " + "; ".join(problems))
    else:
        report["ok"] = weight.device.type == "cpu" and all(d == "cpu" for d in state_devices)
        report["note"] = "CPU run: the model's device is host memory, so nothing is offloaded"
    del model, opts, state
    return report


class _Config:
    """One model under test: a variant at a placement (the baseline has none)."""

    def __init__(self, variant: str, placement: str | None, model: JTokModel, cfg: ModelConfig,
                 forward, build_info: dict):  # fmt: skip
        self.variant, self.placement, self.model, self.cfg = variant, placement, model, cfg
        self.forward = forward  # the model, or its torch.compile'd wrapper
        self.build_info = build_info

    @property
    def name(self) -> str:
        return self.variant if self.placement is None else f"{self.variant}/{self.placement}"


class Decoder:
    """The greedy decode loop of one configuration, one step at a time.

    `prefill` runs the prompts (B, T) through the model and chooses each row's first
    token; each `step` feeds the last chosen token of every row and chooses the next. The
    chosen ids come back to the host once per step, as generate_batch needs them for its
    stop checks; with host tables the next rows are requested as soon as the ids are
    known, so the gather overlaps the step's compute before the first table layer.
    `ids[b]` holds row b's chosen tokens."""

    def __init__(self, config: _Config, device: torch.device):
        self.config, self.device = config, device
        self.tables = config.model.token_tables
        self.host = self.tables is not None and hasattr(self.tables, "fetch")
        self.compiled = config.forward is not config.model
        self.cache: KVCache | None = None
        self.ids: list[list[int]] = []

    def _rows(self, ids_BT: torch.Tensor):
        """The table rows of ids_BT, requested before the forward, or None (the model's
        own lookup). Host tables: the gather starts at once, as in generate_batch (a
        compiled forward resolves the rows before its graph, jtok.inference.compiled)."""
        if not self.host:
            return None
        keys = self.tables.key(ids_BT)
        keys.inverse_N = inverse_to(keys.inverse_N, self.device)
        return self.tables.consume(self.tables.fetch(keys, self.device))

    @torch.no_grad()
    def prefill(self, prompt_BT: torch.Tensor, new_tokens: int) -> float:
        model = self.config.model
        B, T = prompt_BT.shape
        param = next(model.parameters())
        self.cache = KVCache.empty(model.cfg, B, max_len=T + new_tokens, device=self.device,
                                   dtype=param.dtype)  # fmt: skip
        sync_device(self.device)
        start = time.perf_counter()
        token_rows = self._rows(prompt_BT) if self.compiled else None  # see _rows
        logits_BV = self.config.forward(prompt_BT.to(self.device), cache=self.cache,
                                        token_rows=token_rows).logits  # fmt: skip
        chosen = logits_BV[:, -1].argmax(-1).tolist()
        elapsed = time.perf_counter() - start
        self.ids = [[c] for c in chosen]
        return elapsed

    @torch.no_grad()
    def step(self) -> tuple[float, float]:
        """One decode step: (wall seconds, process CPU seconds)."""
        start, start_cpu = time.perf_counter(), time.process_time()
        next_ids = torch.tensor([row[-1] for row in self.ids], dtype=torch.long)[:, None]
        token_rows = self._rows(next_ids)
        logits_BV = self.config.forward(next_ids.to(self.device), cache=self.cache,
                                        token_rows=token_rows).logits  # fmt: skip
        chosen = logits_BV[:, -1].argmax(-1).tolist()  # the step's one sync
        for row, c in zip(self.ids, chosen, strict=True):
            row.append(c)
        return time.perf_counter() - start, time.process_time() - start_cpu


def decode_once(config: _Config, prompt_BT: torch.Tensor, new_tokens: int,
                device: torch.device) -> tuple[float, float, float, list[list[int]]]:  # fmt: skip
    """Greedy prefill + `new_tokens` decode steps of one configuration alone:
    (prefill s, decode s, decode CPU s, ids); ids[b] has new_tokens + 1 tokens."""
    decoder = Decoder(config, device)
    prefill_s = decoder.prefill(prompt_BT, new_tokens)
    wall = cpu = 0.0
    for _ in range(new_tokens):
        step_wall, step_cpu = decoder.step()
        wall, cpu = wall + step_wall, cpu + step_cpu
    sync_device(device)
    return prefill_s, wall, cpu, decoder.ids


def share_backbone(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Make `target` use `source`'s backbone tensors (same names, same storage).

    Two separately built models stream their weights from different memory, and on a CPU
    whose last-level cache holds most of a small model that alone moves a decode step by
    a few percent either way (two identical baselines differ by that much). Sharing the
    storage leaves each variant's ratio to the baseline with its own work only. The
    tables, routers and scales (absent from `source`) stay the target's."""
    for name, module in source.named_modules():
        into = target.get_submodule(name)
        for key, tensor in module._parameters.items():
            if tensor is not None:
                into._parameters[key] = tensor
        for key, tensor in module._buffers.items():
            if tensor is not None:
                into._buffers[key] = tensor


def _build(cfg: ModelConfig, variant: str, placement: str | None, device: torch.device,
           compile_model: bool, backbone: torch.nn.Module | None = None) -> _Config:  # fmt: skip
    vcfg = variant_config(cfg, variant, sparse_grad=True)  # host tables need sparse_grad
    before = _cuda_allocated(device)
    rss_before = host_memory()["rss_bytes"]
    model = build_model(vcfg, seed=0, device=device,
                        table_placement=placement or "device").eval()  # fmt: skip
    sync_device(device)
    rss_after = host_memory()["rss_bytes"]
    store = model.token_tables
    info: dict = {
        "table_device": str(store.weight.device) if store is not None else None,
        "table_bytes": _tensor_bytes(store.weight) if store is not None else 0,
        "host_rss_growth_bytes": (rss_after - rss_before
                                  if rss_before is not None and rss_after is not None else None),
        "cuda_model_bytes": (_cuda_allocated(device) - before) if before is not None else None,
    }  # fmt: skip
    if placement == "host" and device.type == "cuda":
        # The decode model: its table must stay in host memory and the accelerator must
        # hold only what the model registers (the backbone).
        registered = _registered_bytes(model, device)
        if store.weight.device.type != "cpu":
            raise HostPlacementError(f"host placement: the table is on {store.weight.device}")
        if info["cuda_model_bytes"] > registered + _slack(device):
            raise HostPlacementError(
                f"host placement: building the model allocated {info['cuda_model_bytes']} "
                f"bytes on {device}, but it registers only {registered} there")  # fmt: skip
    if backbone is not None:
        share_backbone(backbone, model)
    forward = compile_for_decoding(model) if compile_model else model
    return _Config(variant, placement, model, vcfg, forward, info)


def decode_benchmark(cfg: ModelConfig, variants: list[str], batches: list[int],
                     prompt_len: int, new_tokens: int, reps: int, warmup: int = 1,
                     placements: tuple[str, ...] | list[str] = PLACEMENTS,
                     device: torch.device | str = "cpu", threads: int | None = None,
                     compile_model: bool = False, check_host: bool = True,
                     share: bool = True, progress: bool = False) -> dict:  # fmt: skip
    """Prefill and decode timings of every (variant, placement) at every batch size.

    share: every variant decodes with the baseline's backbone tensors (`share_backbone`),
    so that the ratios measure the modulation's work, not where two copies of the same
    backbone happen to lie in memory.

    Returns one JSON-ready dict; per variant, placement and batch (as a string key):
    ``tokens_per_s`` (generated tokens per second over all rows while decoding) and
    ``ratio_to_baseline`` (decode time per step over the baseline's, paired by repetition).
    """
    device = torch.device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    if "baseline" not in variants:
        variants = ["baseline", *variants]
    placements = list(dict.fromkeys(placements))
    for placement in placements:
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r} (known: {', '.join(PLACEMENTS)})")
    configs = [_build(cfg, "baseline", None, device, compile_model)]
    backbone = configs[0].model if share else None
    configs += [_build(cfg, v, p, device, compile_model, backbone)
                for v in variants if v != "baseline" for p in placements]  # fmt: skip
    memory_after_build = host_memory()

    host_check = None
    if check_host and "host" in placements and any(v != "baseline" for v in variants):
        # The largest tables among the variants (JTok-M's, when it runs).
        tables = max((c.cfg for c in configs if c.variant != "baseline"),
                     key=lambda c: summarize(c)["token_params"])  # fmt: skip
        host_check = check_host_placement(tables, device, strict=device.type == "cuda")

    timings: dict[int, dict[str, dict[str, list[float]]]] = {}
    peaks: dict[int, dict[str, int | None]] = {}
    prompts = {b: zipf_token_batches(cfg.vocab_size, b, prompt_len - 1, 1, seed=b)[0]
               for b in batches}  # fmt: skip
    # Every batch size warms up (and, compiled, compiles) before any timing starts.
    for batch in batches:
        peaks[batch] = {c.name: None for c in configs}
        for config in configs:
            for _ in range(warmup):
                decode_once(config, prompts[batch], new_tokens, device)
            if device.type == "cuda":  # one more run alone: this model's peak
                torch.cuda.reset_peak_memory_stats(device)
                decode_once(config, prompts[batch], new_tokens, device)
                peaks[batch][config.name] = torch.cuda.max_memory_allocated(device)
    if progress:
        print(f"warmed up; timing {reps} repetitions per batch size", file=sys.stderr)
    for batch in batches:
        prompt = prompts[batch]
        samples = {c.name: {"prefill": [], "decode": [], "cpu": []} for c in configs}
        for rep in range(reps):
            # Interleaved by step: every configuration's step s runs within a few
            # milliseconds of the others', so a slow phase of the machine (another
            # process, a frequency change) lands on all of them alike.
            shift = rep % len(configs)
            order = configs[shift:] + configs[:shift]
            decoders = {c.name: Decoder(c, device) for c in order}
            for config in order:
                samples[config.name]["prefill"].append(
                    decoders[config.name].prefill(prompt, new_tokens))
            wall = dict.fromkeys(decoders, 0.0)
            cpu = dict.fromkeys(decoders, 0.0)
            for step in range(new_tokens):
                turn = (shift + step) % len(order)
                for config in order[turn:] + order[:turn]:
                    step_wall, step_cpu = decoders[config.name].step()
                    wall[config.name] += step_wall
                    cpu[config.name] += step_cpu
            sync_device(device)
            for name in decoders:
                samples[name]["decode"].append(wall[name])
                samples[name]["cpu"].append(cpu[name])
            del decoders
            if progress:
                print(f"batch {batch} rep {rep + 1}/{reps}: " + "  ".join(
                    f"{c.name} {samples[c.name]['decode'][-1] / new_tokens * 1e3:.2f} ms/step"
                    for c in configs), file=sys.stderr)  # fmt: skip
        timings[batch] = samples

    def paired(batch: int, name: str, what: str) -> float:
        return summary(batch, name, what)[0]

    def summary(batch: int, name: str, what: str) -> tuple[float, list[float]]:
        return ratio_summary(timings[batch][name][what], timings[batch]["baseline"][what])

    result: dict = {
        "benchmark": "decode",
        "backbone": {k: v for k, v in cfg.to_dict().items() if k != "tokmod"},
        "tokmod": {k: v for k, v in cfg.to_dict()["tokmod"].items() if k != "kind"},
        "batches": list(batches), "placements": placements, "prompt_len": prompt_len,
        "new_tokens": new_tokens, "reps": reps, "warmup": warmup, "greedy": True,
        "compile": compile_model, "device": str(device), "shared_backbone": share,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "allocator": allocator_setting(),
        "machine": platform.machine(),
        "baseline_note": "the baseline has no tables: one model, timed once per repetition "
                         "and listed under every placement",
        "host_memory_after_build": memory_after_build,
        "host_memory_end": host_memory(),
        "host_placement_check": host_check,
        "variants": {},
    }  # fmt: skip
    for config in configs:
        info = summarize(config.cfg, prompt_len + new_tokens)
        entry = result["variants"].setdefault(config.variant, {
            "tokmod": config.cfg.tokmod.kind,
            "backbone_params": info["backbone_params"],
            "token_params": info["token_params"],
        })  # fmt: skip
        for placement in ([config.placement] if config.placement else placements):
            per_batch = entry.setdefault(placement, {})
            for batch in batches:
                samples = timings[batch][config.name]
                decode_s = statistics.median(samples["decode"])
                per_batch[str(batch)] = {
                    "tokens_per_s": batch * new_tokens / decode_s,
                    "ratio_to_baseline": paired(batch, config.name, "decode"),
                    "ratio_quartiles": summary(batch, config.name, "decode")[1],
                    **ratio_interval(timings[batch][config.name]["decode"],
                                     timings[batch]["baseline"]["decode"]),
                    "cpu_ratio_to_baseline": paired(batch, config.name, "cpu"),
                    "decode_ms_per_step": decode_s / new_tokens * 1e3,
                    "decode_ms_per_step_all": [t / new_tokens * 1e3 for t in samples["decode"]],
                    "prefill_ms": statistics.median(samples["prefill"]) * 1e3,
                    "prefill_ms_all": [t * 1e3 for t in samples["prefill"]],
                    "prefill_ratio_to_baseline": paired(batch, config.name, "prefill"),
                    "cuda_peak_allocated_bytes": peaks[batch][config.name],
                    **config.build_info,
                }  # fmt: skip
    return result


def format_report(result: dict) -> str:
    head = (f"decode, prompt {result['prompt_len']} + {result['new_tokens']} new tokens "
            f"(greedy), {result['reps']} reps, {result['threads']} threads on "
            f"{result['device']}{', compiled' if result['compile'] else ''}")  # fmt: skip
    if "allocator" in result:
        head += f"\nhost allocator: {result['allocator']}"
    lines = [head, f"{'placement':<10}{'batch':>6}  {'variant':<10}{'prefill ms':>11}"
                   f"{'ms/step':>9}{'tok/s':>9}{'ratio':>8}{'(quartiles)':>14}"
                   f"{'95% CI of ratio':>20}{'cpu ratio':>10}{'table on':>10}"]  # fmt: skip
    for placement in result["placements"]:
        for batch in result["batches"]:
            for name, variant in result["variants"].items():
                row = variant[placement][str(batch)]
                lines.append(
                    f"{placement:<10}{batch:>6}  {name:<10}{row['prefill_ms']:>11.1f}"
                    f"{row['decode_ms_per_step']:>9.2f}{row['tokens_per_s']:>9.0f}"
                    f"{row['ratio_to_baseline']:>8.3f}{quartile_text(row['ratio_quartiles']):>14}"
                    f"{interval_text(row['ratio_ci'], row['ratio_ci_coverage']):>20}"
                    f"{row['cpu_ratio_to_baseline']:>10.3f}"
                    f"{row['table_device'] or '-':>10}"
                )  # fmt: skip
    check = result.get("host_placement_check")
    if check:
        lines.append(f"host placement: table on {check['table_device']}, its optimizer state "
                     f"on {', '.join(check['table_optimizer_state_devices']) or 'nothing'}"
                     f"{'' if check['ok'] else ' (NOT OK)'}")  # fmt: skip
    mem = result["host_memory_end"]
    if mem["rss_bytes"] is not None:
        lines.append(f"host RSS {mem['rss_bytes'] / 2**20:.0f} MiB (peak "
                     f"{(mem['rss_peak_bytes'] or 0) / 2**20:.0f} MiB)")  # fmt: skip
    return "\n".join(lines)
