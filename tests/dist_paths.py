"""Run inside a torchrun worker (tests/dist_worker.py): the sharded store's two exchange
paths, raw rows and pre-mixed vectors, side by side on the same batches.

Two JTok-M models from one seed, DDP for the backbone, the sharded store forced to "raw"
in one and "premixed" in the other, train a few steps on the same per-process batches.
Written to ``paths_<rank>.json`` for tests/test_parallel.py to judge: the largest
differences (relative to each tensor's largest entry) of the logits, losses, the local
block's row gradients, the routers' gradients and the table after the steps, and the
backbone weights' largest absolute difference; the bytes
each path's plan predicted (both paths, summed over processes) against the bytes its
exchanges sent (the meter, summed over processes); and the "auto" path picked for a batch
of all-distinct tokens and for one of a single repeated token.

The config (3 layers, V = 321, n_e = 5: R = 4,815 rows) puts block boundaries inside a
(layer, token) group at W = 2 (B = 2,408) and W = 4 (B = 1,204), and every batch holds the
tokens of those groups, so requests split across two owners are exercised too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from jtok.config import TrainConfig
from jtok.nn.model import build_model
from jtok.parallel.distributed import DistEnv
from jtok.parallel.wrap import parallelize
from jtok.presets import preset
from jtok.tables.sharded_premix import premix_entries
from jtok.training.optim import Optimizers

VOCAB, LAYERS, STEPS = 321, 3, 3


def _cut_tokens(store) -> list[int]:
    """Token ids whose (layer, token) group of n rows a block boundary cuts."""
    n, V = store.tables_per_layer, store.vocab_size
    cut = []
    for owner in range(1, store.world_size):
        first = owner * store.block
        if first % n:
            cut.append((first // n) % V)
    return cut


def _batch(rank: int, step: int, cut: list[int], seq: int = 24):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, VOCAB, (2, seq + 1), generator=gen)
    for i, token in enumerate(cut):
        ids[i % 2, 1 + i] = token
    return ids[:, :-1], ids[:, 1:]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def compare_paths(out: str) -> None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    env = DistEnv(rank=rank, world_size=world_size)
    cfg = preset("tiny").with_overrides({"vocab_size": str(VOCAB), "n_layers": str(LAYERS),
                                         "tokmod.kind": "jtokm"})  # fmt: skip
    # Adam's eps at 1e-6, not 1e-8: a gradient component near eps turns fp32 rounding into
    # a visible difference of its step (tests/test_parallel.py, assert_weights_close); the
    # paths' equality is the gradients', checked at every step, not Adam's.
    tcfg = TrainConfig(data="unused", lr=3e-3, warmup_steps=0, adam_eps=1e-6,
                       table_lr_mult=30.0, embed_lr_mult=1.0)  # as tiny_run_config
    runs = {}
    for path in ("raw", "premixed"):
        model = build_model(cfg, seed=0, table_placement="sharded").train()
        model.token_tables.exchange_path = path
        runs[path] = (model, parallelize(model, env, "ddp", "fp32"), Optimizers(model, tcfg))
    store = runs["raw"][0].token_tables
    cut = _cut_tokens(store)
    report = {"worst": {}, "bytes": [], "cut_tokens": cut, "split_requests": 0}

    def worst(name: str, value: float) -> None:
        report["worst"][name] = max(report["worst"].get(name, 0.0), value)

    for step in range(STEPS):
        inputs, targets = _batch(rank, step, cut)
        keys = store.key(inputs)
        entries = premix_entries(store, keys)
        report["split_requests"] += int(entries.counts_LW.sum()) - LAYERS * inputs.numel()
        seen = {}
        for path, (model, wrapped, optimizers) in runs.items():
            tables = model.token_tables
            tables.meter["data"] = 0
            out_ = wrapped(inputs)
            loss = F.cross_entropy(out_.logits.flatten(0, 1), targets.flatten())
            (loss + out_.aux_loss).backward()
            sent = torch.tensor([tables.meter["data"]])
            dist.all_reduce(sent)
            plan = tables.last_exchange
            report["bytes"].append({"step": step, "path": plan["path"],
                                    "sent": int(sent), "raw_planned": plan["raw_bytes"],
                                    "premixed_planned": plan["premixed_bytes"]})  # fmt: skip
            routers = torch.cat([b.tokmod.router.grad.flatten() for b in model.blocks])
            seen[path] = {"logits": out_.logits.detach(), "loss": loss.detach()[None],
                          "row_grad": tables.weight.grad.coalesce().to_dense(),
                          "router_grad": routers}  # fmt: skip
            optimizers.step()
            optimizers.zero_grad()
        for name in seen["raw"]:
            worst(name, _rel(seen["raw"][name], seen["premixed"][name]))
    (raw_model, raw_wrapped, _), premixed_model = runs["raw"], runs["premixed"][0]
    worst("table", _rel(raw_model.token_tables.weight.detach(),
                        premixed_model.token_tables.weight.detach()))  # fmt: skip
    # The backbone after three AdamW steps, in absolute terms (as the DDP tests compare):
    # Adam's normalised step turns rounding in a near-zero gradient into a visible
    # relative difference of a small weight.
    report["weights_abs"] = max(float((a - b).abs().max()) for a, b in zip(
        raw_model.parameters(), premixed_model.parameters(), strict=True))

    # The rule: all-distinct tokens favour pre-mixed vectors (n = 5 rows per id against
    # one vector per position), one repeated token favours raw rows (5 rows in all).
    auto = raw_model.token_tables
    auto.exchange_path = "auto"
    chosen = {}
    for name, ids in (("distinct", torch.randperm(VOCAB)[:48].view(2, 24)),
                      ("repeated", torch.full((2, 24), 7))):  # fmt: skip
        raw_wrapped(ids).logits.sum().backward()
        chosen[name] = dict(auto.last_exchange)
    report["auto"] = chosen
    report["finite"] = all(math.isfinite(v) for v in [*report["worst"].values(),
                                                      report["weights_abs"]])
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, f"paths_{rank}.json").write_text(json.dumps(report))
