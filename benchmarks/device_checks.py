"""Correctness of the table system's accelerator paths, for a session lent a GPU.

On CUDA the host store gathers on the host, stages rows in pinned memory and copies them on
a side stream; none of that runs on a CPU-only machine, where the tests check the same logic
with a background thread. This script runs the checks that need the real device, on a tiny
JTok-M model (briefly trained first, so greedy top-1 margins exceed float noise), and prints
one JSON object (also written to --out):

- host == device tables on the accelerator: logits, table-row gradients and five training
  steps' losses (the prefetch never reads a row before the step that updates it);
- the device store's routed gather == its up-front gather on the accelerator (gradients,
  five steps' losses);
- where host tables live after a training step: no table row or row-optimizer state on
  the accelerator (`jtok.bench.decode.check_host_placement`, strict);
- batched greedy generation with host tables on the accelerator gives the device-table ids,
  and the compiled forward (jtok.inference.compiled) gives the eager ids.

    python benchmarks/device_checks.py --device cuda --out $OUT/device_checks.json

It runs on a CPU too (`--device cpu`), which is how it is kept working between GPU sessions.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch
import torch.nn.functional as F

from jtok.bench.decode import check_host_placement
from jtok.bench.train_step import HostTableSteps, train_step, variant_config, zipf_token_batches
from jtok.config import TrainConfig
from jtok.inference.generate import generate_batch
from jtok.nn.model import build_model
from jtok.presets import preset
from jtok.training.optim import Optimizers


def trained_state(cfg, batches, steps: int = 30) -> dict:
    """A tiny JTok-M model's weights after a few device-table steps on the CPU."""
    model = build_model(cfg, seed=0).train()
    opts = Optimizers(model, TrainConfig(lr=3e-3, table_lr_mult=30))
    for i in range(steps):
        train_step(model, opts, batches[i % len(batches)])
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def loaded(cfg, state: dict, device: torch.device, placement: str):
    model = build_model(cfg, seed=0, device=device, table_placement=placement)
    model.load_state_dict(state)
    return model


def first_gradient(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the tables' gradient as a dense CPU tensor) of one batch; gradients cleared."""
    logits = model(ids[:, :-1]).logits
    F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    if model.token_tables.placement == "host":
        model.token_tables.pull_gradients()  # the rows' gradients back onto the host matrix
    grad = model.token_tables.weight.grad
    grad = grad.coalesce().to_dense().cpu() if grad.is_sparse else grad.cpu()
    model.zero_grad(set_to_none=True)
    model.token_tables.weight.grad = None  # host tables are not the model's parameters
    return logits.detach().float().cpu(), grad


def check_training(cfg, state, batches, device) -> dict:
    """Logits, table gradients and five steps' losses: host tables vs device tables."""
    out = {}
    for placement in ("device", "host"):
        model = loaded(cfg, state, device, placement).train()
        logits, grad = first_gradient(model, batches[0].to(device))
        # A small step: on an accelerator the two stores step their rows on different
        # processors (RowAdam on the host vs on the GPU), whose float rounding differs; a
        # fresh Adam's first updates at a training LR would grow that into visible loss
        # differences within five steps. (On a CPU the two are bit-identical.)
        opts = Optimizers(model, TrainConfig(lr=1e-4, table_lr_mult=30))
        if placement == "host":
            steps = HostTableSteps(model, opts, batches, device)
            losses = [steps.step() for _ in range(5)]
        else:
            losses = [train_step(model, opts, batches[i % len(batches)].to(device))
                      for i in range(5)]  # fmt: skip
        out[placement] = (logits, grad, losses)
    (dev_logits, dev_grad, dev_losses), (host_logits, host_grad, host_losses) = (
        out["device"], out["host"])  # fmt: skip
    same_losses = all(abs(a - b) <= 1e-4 * abs(a)
                      for a, b in zip(dev_losses, host_losses, strict=True))  # fmt: skip
    return {
        "logits_max_abs_diff": float((dev_logits - host_logits).abs().max()),
        "table_grad_max_abs_diff": float((dev_grad - host_grad).abs().max()),
        "losses_device": dev_losses, "losses_host": host_losses,
        "ok": bool(torch.allclose(dev_logits, host_logits, rtol=1e-4, atol=1e-5)
                   and torch.allclose(dev_grad, host_grad, rtol=1e-4, atol=1e-6)
                   and same_losses),
    }  # fmt: skip


def check_routed_gather(cfg, state, batches, device) -> dict:
    """The device store's routed gather (rows read after each router) vs the up-front
    gather, training on the accelerator: table gradients and five steps' losses. (On a CPU
    they are bit-identical; on a GPU the gradients' scatter-adds may sum in another order.)"""
    out = {}
    for routed in (True, False):
        model = loaded(cfg, state, device, "device").train()
        model.token_tables.routed_gather = routed
        _, grad = first_gradient(model, batches[0].to(device))
        opts = Optimizers(model, TrainConfig(lr=1e-4, table_lr_mult=30))
        losses = [train_step(model, opts, batches[i % len(batches)].to(device))
                  for i in range(5)]  # fmt: skip
        out[routed] = (grad, losses)
    (routed_grad, routed_losses), (front_grad, front_losses) = out[True], out[False]
    return {
        "table_grad_max_abs_diff": float((routed_grad - front_grad).abs().max()),
        "losses_routed": routed_losses, "losses_up_front": front_losses,
        "ok": bool(torch.allclose(routed_grad, front_grad, rtol=1e-4, atol=1e-6)
                   and all(abs(a - b) <= 1e-4 * abs(a)
                           for a, b in zip(routed_losses, front_losses, strict=True))),
    }  # fmt: skip


def check_generation(cfg, state, device, compiled: bool = True) -> dict:
    """Greedy ids of mixed-length prompts: host vs device tables, compiled vs eager."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist()
               for n in (3, 9, 5, 14)]  # fmt: skip
    ids, compile_s = {}, None
    for placement in ("device", "host"):
        model = loaded(cfg, state, device, placement).eval()
        ids[placement] = generate_batch(model, prompts, max_new_tokens=12)
        if placement == "device" and compiled:
            start = time.perf_counter()
            ids["device_compiled"] = generate_batch(model, prompts, max_new_tokens=12,
                                                    compile=True)  # fmt: skip
            compile_s = round(time.perf_counter() - start, 1)
    same_compiled = ids["device_compiled"] == ids["device"] if compiled else None
    return {
        "host_equals_device": ids["host"] == ids["device"],
        "compiled_equals_eager": same_compiled,
        "compile_s": compile_s,
        "ok": ids["host"] == ids["device"] and same_compiled is not False,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("device_checks: --device cuda, but no CUDA device is visible", file=sys.stderr)
        return 2
    base = preset("tiny")
    cfg = variant_config(dataclasses.replace(base, max_seq_len=64), "jtokm", sparse_grad=True)
    batches = zipf_token_batches(cfg.vocab_size, 4, 32, n_batches=4)
    state = trained_state(cfg, batches)
    report = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }
    checks = {
        "training": lambda: check_training(cfg, state, batches, device),
        "routed_gather": lambda: check_routed_gather(cfg, state, batches, device),
        "placement": lambda: check_host_placement(cfg, device, strict=True),
        "generation": lambda: check_generation(cfg, state, device),
    }
    for name, check in checks.items():
        # One failing check (an error on the device, a placement violation) is reported and
        # the others still run: a device session is too short to rerun for the next one.
        try:
            report[name] = check()
        except Exception as err:  # noqa: BLE001 - reported in the JSON, exit status 1
            report[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    report["ok"] = all(report[name].get("ok", False) for name in checks)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
