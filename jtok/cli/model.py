"""`jtok info`: parameter counts and FLOPs of a model, counted from its config.
`jtok config`: every model and train key of a resolved run config, with its value."""

from __future__ import annotations

import argparse
import json

from jtok.cli.common import (
    UsageError,
    add_model_arguments,
    load_config_mapping,
    nonnegative_int,
    parse_overrides,
    positive_int,
    preset_for,
    resolve_model_config,
    run_override_key,
)


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def cmd_info(args: argparse.Namespace) -> int:
    from jtok.flops import summarize
    from jtok.parallel.resources import format_bytes

    cfg = resolve_model_config(args)
    if args.seq_len is not None and args.seq_len <= 0:
        raise UsageError(f"--seq-len must be positive, got {args.seq_len}")
    if args.world_size > 1 and args.table_placement == "host":  # as jtok train refuses it
        raise UsageError("--table-placement host trains and serves on one process; with "
                         "--world-size > 1 use sharded (or device)")  # fmt: skip
    summary = summarize(cfg, args.seq_len)
    summary["memory"] = _serving_memory(cfg, args.table_placement, args.world_size)
    if args.world_size > 1 or args.parallel == "fsdp" or args.batch:
        from jtok.flops import memory_plan

        summary["memory_plan"] = {
            "world_size": args.world_size, "parallel": args.parallel,
            "table_placement": args.table_placement, "batch_per_process": args.batch,
            **memory_plan(cfg, True, args.world_size, args.parallel, args.table_placement,
                          args.batch, args.seq_len),
        }  # fmt: skip
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
        (f"weights, tables on {args.table_placement}"
         + (f" (per process of {args.world_size})" if args.table_placement == "sharded" else ""),
         f"accelerator {format_bytes(summary['memory']['accelerator_bytes'])}, host "
         f"{format_bytes(summary['memory']['host_bytes'])} (fp32)"),
    ]
    plan = summary.get("memory_plan")
    if plan:
        batch = (f"batch {plan['batch_per_process']}" if plan["batch_per_process"]
                 else "no activations: --batch B counts them")  # fmt: skip
        rows.append((f"training, per process (W={plan['world_size']}, {plan['parallel']}, "
                     f"tables on {plan['table_placement']}, {batch})", ""))  # fmt: skip
        for side in ("device", "host"):
            for item, size in plan[side].items():
                rows.append((f"  {side}: {item}", format_bytes(size)))
            if plan[side]:
                rows.append((f"  {side} total", format_bytes(plan[f"{side}_total"])))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}".rstrip())
    return 0


def _serving_memory(cfg, table_placement: str, world_size: int = 1) -> dict:
    """fp32 bytes of the weights on one process's accelerator and in its host memory, for
    inference (sharded tables: 1/W of the rows each)."""
    from jtok.flops import estimate_memory, table_memory

    on_host = table_placement == "host" and cfg.tokmod.enabled
    device = estimate_memory(cfg, training=False, include_tables=False).params
    tables = table_memory(cfg, training=False).params
    host = tables if on_host else 0
    if not on_host:
        device += tables // (world_size if table_placement == "sharded" else 1)
    return {"table_placement": table_placement, "accelerator_bytes": device, "host_bytes": host}


def resolve_config(args: argparse.Namespace):
    """The run config `jtok train` would start from with these --preset/--config/--set
    (a preset's vocab_size follows the tokenizer of --set data=DIR, as in train): a
    preset's or a model config file's model with the trainer's defaults (seq_len capped
    by the model's max_seq_len), or a run config file."""
    from jtok.config import ModelConfig, RunConfig, TrainConfig

    overrides = {run_override_key(k): v for k, v in parse_overrides(args.overrides).items()}
    if args.config is not None:
        raw = load_config_mapping(args.config)
        if "model" in raw or "train" in raw:  # a run config, as `jtok train` reads it
            base = RunConfig.from_dict(raw)
        else:
            model = ModelConfig.from_dict(raw)
            base = RunConfig(model=model, train=TrainConfig(seq_len=_default_seq_len(raw)))
    elif args.preset is not None:
        model = preset_for(args.preset, overrides)
        base = RunConfig(model=model, train=TrainConfig(seq_len=_default_seq_len(model.to_dict())))
    else:
        raise UsageError("give --preset NAME or --config FILE")
    return base.with_overrides(overrides)


def _default_seq_len(model: dict) -> int:
    from jtok.config import ModelConfig, TrainConfig

    return min(TrainConfig.seq_len, model.get("max_seq_len", ModelConfig.max_seq_len))


def flatten(data: dict, prefix: str = "") -> dict:
    """{"model": {"moe": {"top_k": 2}}} -> {"model.moe.top_k": 2}."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def cmd_config(args: argparse.Namespace) -> int:
    run_cfg = resolve_config(args)
    if args.json:
        print(run_cfg.to_json(indent=None))
        return 0
    for key, value in flatten(run_cfg.to_dict()).items():
        # Each line's value is what --set takes: strings as they are, the rest as JSON.
        print(f"{key} = {value if isinstance(value, str) else json.dumps(value)}")
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
    info.add_argument("--seq-len", type=positive_int, help="context length for attention FLOPs "
                      "(default: the model's max_seq_len)")  # fmt: skip
    info.add_argument("--table-placement", choices=["device", "host", "sharded"],
                      default="device",
                      help="where the tables would live: the memory line splits the weights "
                      "between accelerator and host accordingly")
    info.add_argument("--world-size", type=positive_int, default=1, metavar="N",
                      help="processes under torchrun: adds the per-process training memory plan")
    info.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                      help="backbone parallelism for the plan (fsdp shards the backbone)")
    info.add_argument("--batch", type=nonnegative_int, default=0, metavar="B",
                      help="sequences per process and micro-batch, to count activations")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=cmd_info)

    cfg = sub.add_parser(
        "config",
        help="every model and train key of a config, with its value",
        description="Print every key of the run config `jtok train` would use with these "
        "--preset/--config/--set (model.*, including model.moe.* and model.tokmod.*, and "
        "train.*), one `key = value` per line, or with --json one JSON object that "
        "`--config` reads back. Bare --set keys go to the section that has them.",
    )
    add_model_arguments(cfg, default_preset=None)
    cfg.add_argument("--json", action="store_true", help="print one JSON object")
    cfg.set_defaults(handler=cmd_config)
