"""`jtok info`: parameter counts and FLOPs of a model, counted from its config."""

from __future__ import annotations

import argparse
import json

from jtok.cli.common import UsageError, add_model_arguments, resolve_model_config


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def cmd_info(args: argparse.Namespace) -> int:
    from jtok.flops import summarize

    cfg = resolve_model_config(args)
    if args.seq_len is not None and args.seq_len <= 0:
        raise UsageError(f"--seq-len must be positive, got {args.seq_len}")
    summary = summarize(cfg, args.seq_len)
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), **summary}))
        return 0
    tok = cfg.tokmod
    moe = cfg.moe
    backbone = (
        f"L={cfg.n_layers} d={cfg.d_model} heads={cfg.n_heads}/{cfg.n_kv_heads} "
        f"V={cfg.vocab_size} ffn={cfg.ffn_hidden}"
    )
    if moe.enabled:
        backbone += (
            f" | MoE {moe.num_experts} routed + {moe.num_shared_experts} shared, "
            f"top-{moe.top_k}, width {moe.expert_hidden}"
        )
    modulation = {"none": "none", "jtok": "JTok", "jtokm": f"JTok-M n_e={tok.n_e} K={tok.top_k}"}
    layers = "all layers" if tok.layers is None else f"layers {cfg.tokmod_layers}"
    rows = [
        ("backbone", backbone),
        ("modulation", modulation[tok.kind] + (f" on {layers}" if tok.enabled else "")),
        ("backbone params N_c", _human(summary["backbone_params"])),
        ("  active per token", _human(summary["active_backbone_params"])),
        ("  non-embedding", _human(summary["non_embedding_params"])),
        ("token params N_n", _human(summary["token_params"])),
        ("eta = N_n / N_c (active)", f"{summary['eta']:.3f}"),
        ("rho = K / n_e", f"{summary['rho']:.3f}"),
        (f"train FLOPs/token (T={summary['seq_len']})", _human(summary["train_flops_per_token"])),
        ("inference FLOPs/token", _human(summary["inference_flops_per_token"])),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def register(sub) -> None:
    info = sub.add_parser(
        "info",
        help="parameter counts (N_c, N_n, eta, rho) and FLOPs per token of a model",
        description="Print a model's parameter counts (backbone N_c, active, token-indexed "
        "N_n), eta = N_n / N_c, rho = K / n_e, and training / inference FLOPs per token. "
        "Counted from the config alone: paper-scale models allocate nothing.",
    )
    add_model_arguments(info, default_preset=None)
    info.add_argument("--seq-len", type=int, help="context length for attention FLOPs "
                      "(default: the model's max_seq_len)")  # fmt: skip
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=cmd_info)
