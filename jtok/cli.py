"""The `jtok` command line.

Every subcommand takes a model the same way: ``--preset NAME`` and/or ``--config FILE``
(JSON or YAML), then any number of ``--set dotted.key=value`` overrides. User mistakes
end with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jtok.config import PRESETS, ConfigError, ModelConfig, preset


class UsageError(Exception):
    """A mistake in the command line or its inputs; reported in one line."""


def add_model_arguments(parser: argparse.ArgumentParser, default_preset: str | None) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--preset", default=default_preset, choices=sorted(PRESETS),
        help=f"named model shape (default: {default_preset})",
    )  # fmt: skip
    group.add_argument(
        "--config", type=Path, help="model config file (JSON or YAML); --set applies on top"
    )
    group.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field by dotted key, e.g. --set tokmod.kind=jtokm "
        "--set tokmod.n_e=5 --set tokmod.layers=0,2,4 (repeatable)",
    )  # fmt: skip


def parse_overrides(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def load_config_file(path: Path) -> ModelConfig:
    try:
        text = path.read_text()
    except OSError as err:
        raise UsageError(f"cannot read config {path}: {err.strerror}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UsageError(f"config {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise UsageError(f"config {path} must hold a mapping")
        data = data.get("model", data)  # a run config may nest the model under "model"
        return ModelConfig.from_dict(data)
    return ModelConfig.from_json(text)


def resolve_model_config(args: argparse.Namespace) -> ModelConfig:
    if args.config is not None:
        cfg = load_config_file(args.config)
    elif args.preset is not None:
        cfg = preset(args.preset)
    else:
        raise UsageError("give --preset NAME or --config FILE")
    return cfg.with_overrides(parse_overrides(args.overrides))


# ---- jtok info --------------------------------------------------------------------------


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


# ---- jtok bench -------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    from jtok.bench import format_report, train_step_benchmark

    cfg = resolve_model_config(args)
    for name in ("batch", "seq_len", "steps", "reps"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if args.seq_len > cfg.max_seq_len:
        raise UsageError(f"--seq-len {args.seq_len} exceeds max_seq_len {cfg.max_seq_len}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    result = train_step_benchmark(
        cfg, variants=variants, batch=args.batch, seq_len=args.seq_len, steps=args.steps,
        reps=args.reps, warmup=args.warmup, threads=args.threads, optimizer=args.optimizer,
        progress=not args.json,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print(format_report(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


# ---- entry point ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jtok",
        description="Token-indexed parameter scaling (JTok, JTok-M) for PyTorch language "
        "models: build, count and benchmark models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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

    bench = sub.add_parser(
        "bench",
        help="training-step throughput of baseline vs JTok vs JTok-M",
        description="Time full training steps (forward, backward, optimizer) of the same "
        "backbone without modulation, with JTok and with JTok-M, interleaving the variants "
        "over repetitions; report medians and ratios to the baseline. Token ids are drawn "
        "from a Zipf law so deduplication sees text-like repetition.",
    )
    add_model_arguments(bench, default_preset="small")
    bench.add_argument("--variants", default="baseline,jtok,jtokm",
                       help="comma list of baseline, jtok, jtokm (default: all three)")
    bench.add_argument("--batch", type=int, default=8)
    bench.add_argument("--seq-len", type=int, default=256)
    bench.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    bench.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    bench.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    bench.add_argument("--optimizer", choices=["adamw", "sparse"], default="sparse",
                       help="adamw: AdamW on everything (dense table gradients); sparse: "
                       "sparse table gradients updated row-wise by RowAdam (default: sparse)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--out", type=Path, help="also write the JSON result here")
    bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (UsageError, ConfigError) as err:
        print(f"jtok {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
