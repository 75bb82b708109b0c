#!/usr/bin/env python3
"""JTok-M's training step with the device store's routed gather (`RoutedRows`: each layer's
rows read after its router, only the routed (key, table) pairs) against the up-front gather
(every distinct key's n rows, all layers, before the forward).

    python3 benchmarks/routed_gather.py [--reps 15] [--threads 1] [--device cpu|cuda] [--out FILE]

Two models from the same seed train on the same Zipfian batches: a step is the trainer's
(forward, backward, global clipping at 1, AdamW and RowAdam). Timed interleaved, the order
alternating per repetition; the figure is the median over repetitions of routed / up-front
in the same repetition, with its distribution-free 95% interval. The two models must stay
bit-identical through every timed step (checked at the end; a mismatch is an error).
Configurations: the small preset (n_e 5, K 2, 8 x 256 tokens) and eta-power's backbone
(d128, L4, V 2048, 16 x 256 tokens) at its extreme pools n_e 8 / K 2 and n_e 64 / K 16.
On CUDA the step runs under the trainer's autocast (bf16), each timing between
synchronisations, and the two models are compared to a tolerance, not to the bit (the
scatter-adds of a GPU backward need not sum in one order).
Results go to benchmarks/results/routed_gather.json (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jtok.bench.paired import paired_ratios, ratio_interval  # noqa: E402
from jtok.bench.train_step import (  # noqa: E402
    sync_device,
    train_step,
    variant_config,
    zipf_token_batches,
)
from jtok.config import ModelConfig, TrainConfig  # noqa: E402
from jtok.nn.model import build_model  # noqa: E402
from jtok.presets import preset  # noqa: E402
from jtok.training.optim import Optimizers  # noqa: E402


def configurations() -> list[tuple[str, ModelConfig, int, int]]:
    """(name, JTok-M config, batch, seq_len)."""
    small = variant_config(preset("small"), "jtokm", sparse_grad=True)
    eta_power = dataclasses.replace(small, vocab_size=2048, d_model=128, n_layers=4, n_heads=4,
                                    n_kv_heads=4, ffn_hidden=384, max_seq_len=256)  # fmt: skip
    out = [("small n_e 5 K 2", small, 8, 256)]
    for n_e, top_k in ((8, 2), (64, 16)):
        tok = dataclasses.replace(eta_power.tokmod, n_e=n_e, top_k=top_k)
        out.append((f"d128 L4 n_e {n_e} K {top_k}", dataclasses.replace(eta_power, tokmod=tok),
                    16, 256))  # fmt: skip
    return out


def measure(cfg: ModelConfig, batch: int, seq_len: int, reps: int, device: torch.device,
            warmup: int = 2) -> dict:  # fmt: skip
    batches = [b.to(device) for b in zipf_token_batches(cfg.vocab_size, batch, seq_len, 4)]
    models = {}
    for name in ("up-front", "routed"):
        model = build_model(cfg, seed=0, device=device).train()
        model.token_tables.routed_gather = name == "routed"
        models[name] = (model, Optimizers(model, TrainConfig(lr=1e-3)))
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(warmup + reps):
        ids = batches[step % len(batches)]
        order = list(models) if step % 2 == 0 else list(models)[::-1]
        for name in order:
            sync_device(device)
            start = time.perf_counter()
            train_step(*models[name], ids, grad_clip=1.0)  # the trainer clips
            sync_device(device)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    pairs = list(zip(models["routed"][0].parameters(), models["up-front"][0].parameters(),
                     strict=True))  # fmt: skip
    same = all(torch.equal(a, b) for a, b in pairs)
    close = all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in pairs)
    if not (same or (device.type == "cuda" and close)):
        raise SystemExit("routed_gather: the routed and up-front models differ after training")
    ratios = paired_ratios(times["routed"], times["up-front"])
    return {
        "ms_median": {name: 1000 * statistics.median(t) for name, t in times.items()},
        "ratio_routed_to_up_front": statistics.median(ratios),
        **ratio_interval(times["routed"], times["up-front"]),
        "bit_identical": same, "close": close,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/routed_gather.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("routed_gather: --device cuda, but no CUDA device is visible")
    result = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "reps": args.reps, "torch": torch.__version__, "configurations": {}}  # fmt: skip
    for name, cfg, batch, seq_len in configurations():
        figures = measure(cfg, batch, seq_len, args.reps, device)
        result["configurations"][name] = figures
        low, high = figures["ratio_ci"]
        print(f"{name}: up-front {figures['ms_median']['up-front']:.0f} ms, routed "
              f"{figures['ms_median']['routed']:.0f} ms a step; routed / up-front "
              f"{figures['ratio_routed_to_up_front']:.3f} [{low:.3f}, {high:.3f}]",
              flush=True)  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
