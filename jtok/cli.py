"""The `jtok` command line.

Every subcommand takes a model the same way: ``--preset NAME`` and/or ``--config FILE``
(JSON or YAML), then any number of ``--set dotted.key=value`` overrides. User mistakes
end with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jtok.config import PRESETS, ConfigError, ModelConfig, load_mapping, preset
from jtok.errors import JTokError


class UsageError(JTokError):
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
    data = load_mapping(path)
    return ModelConfig.from_dict(data.get("model", data))  # a run config nests "model"


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


# ---- jtok data prepare -------------------------------------------------------------------


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from jtok import data

    if args.vocab_size <= 0:
        raise UsageError(f"--vocab-size must be positive, got {args.vocab_size}")
    if not 0 < args.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    manifest = data.prepare(
        args.inputs, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
        jsonl_field=args.field, parquet_column=args.field, hf_dataset=args.hf_dataset,
        hf_split=args.hf_split, val_fraction=args.val_fraction, seed=args.seed,
        overwrite=args.overwrite, progress=not args.no_progress,
    )  # fmt: skip
    splits = manifest["splits"]
    print(f"wrote {args.out}: vocab {manifest['vocab_size']}, train {splits['train']['tokens']:,} "
          f"tokens, val {splits['val']['tokens']:,} tokens")  # fmt: skip
    return 0


# ---- jtok train -------------------------------------------------------------------------


def run_override_key(key: str) -> str:
    """`--set` keys of `jtok train`: model.* / train.*; a bare key goes where it exists."""
    from jtok.config import TrainConfig

    head = key.split(".", 1)[0]
    if head in ("model", "train"):
        return key
    return f"train.{key}" if head in TrainConfig.__dataclass_fields__ else f"model.{key}"


def resolve_run_config(args: argparse.Namespace):
    from jtok.config import RunConfig
    from jtok.train import CONFIG_FILE

    overrides = {run_override_key(k): v for k, v in parse_overrides(args.overrides).items()}
    if args.data is not None:
        overrides["train.data"] = str(args.data)
    if args.resume:
        if args.config is not None or args.preset_given:
            raise UsageError("--resume continues the run's saved config; drop --preset/--config")
        path = args.out / CONFIG_FILE
        if not path.is_file():
            raise UsageError(f"--resume: {args.out} holds no run (no {CONFIG_FILE})")
        return RunConfig.from_json(path.read_text()).with_overrides(overrides)
    if args.config is not None:
        raw = load_mapping(args.config)
        if "model" in raw or "train" in raw:
            base = RunConfig.from_dict(raw)
        else:
            base = RunConfig(model=ModelConfig.from_dict(raw), train=_train_for(raw))
    else:
        model = preset(args.preset or "small")
        if "model.vocab_size" not in overrides and "train.data" in overrides:
            model = model.with_overrides({"vocab_size": _data_vocab(overrides["train.data"])})
        base = RunConfig(model=model, train=_train_for(model.to_dict()))
    return base.with_overrides(overrides)


def _data_vocab(data_dir: str) -> int:
    """A preset's vocab_size follows the data's tokenizer unless set explicitly."""
    from jtok.data import load_manifest

    return int(load_manifest(data_dir)["vocab_size"])


def _train_for(model_dict: dict):
    from jtok.config import TrainConfig

    # Default sequence length: the trainer's, capped by the model's context.
    return TrainConfig(seq_len=min(TrainConfig.seq_len, model_dict.get("max_seq_len", 256)))


def cmd_train(args: argparse.Namespace) -> int:
    from jtok.train import train

    run_cfg = resolve_run_config(args)
    summary = train(run_cfg, args.out, resume=args.resume, overwrite=args.overwrite,
                    progress=not args.no_progress)  # fmt: skip
    if summary["is_main"] and "val_loss" in summary:
        print(f"step {summary['steps']}: val loss {summary['val_loss']:.4f}, "
              f"ppl {summary['val_ppl']:.2f}, bpb {summary['val_bpb']:.4f}")  # fmt: skip
    return 0


# ---- jtok eval / sample -----------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from jtok import data
    from jtok.checkpoint import load_run
    from jtok.config import RunConfig
    from jtok.distributed import resolve_device
    from jtok.train import CONFIG_FILE, TOKENIZER_FILE, evaluate, loss_report, validation

    device = resolve_device(_saved_device(args.run, RunConfig, CONFIG_FILE))
    run_cfg, model, state = load_run(args.run, args.checkpoint, device=device)
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise UsageError("--max-tokens must be positive")
    if args.text is not None:
        ids = data.encode_text_file(args.text, args.run / TOKENIZER_FILE)
        seq_len = run_cfg.train.seq_len
        batches = data.eval_batches(ids, "text", seq_len, run_cfg.train.batch_size,
                                    args.max_tokens)  # fmt: skip
        result = evaluate(model, batches, device, run_cfg.train.precision)
        report = loss_report(result["loss_sum"], result["tokens"], len(args.text.read_bytes()),
                             len(ids))  # fmt: skip
    else:
        manifest = data.load_manifest(run_cfg.train.data)
        if state.get("tokenizer_sha256"):
            data.check_tokenizer(manifest, state["tokenizer_sha256"])
        if args.split not in manifest["splits"]:
            raise UsageError(f"--split {args.split!r}: the data has {list(manifest['splits'])}")
        report = validation(model, run_cfg, device, args.split, args.max_tokens)
    report["step"] = state["step"]
    if args.json:
        print(json.dumps(report))
    else:
        print(f"step {report['step']}: loss {report['loss']:.4f}  ppl {report['ppl']:.2f}  "
              f"bpb {report['bpb']:.4f}  ({report['tokens']:,} tokens)")  # fmt: skip
    return 0


def _saved_device(run_dir: Path, run_config_cls, config_file: str) -> str:
    """The run's device preference ("auto" when the run cannot be read: load_run reports)."""
    try:
        return run_config_cls.from_json((run_dir / config_file).read_text()).train.device
    except (OSError, ConfigError):
        return "auto"


def cmd_sample(args: argparse.Namespace) -> int:
    from jtok.checkpoint import load_run
    from jtok.data import load_tokenizer
    from jtok.generate import generate
    from jtok.train import TOKENIZER_FILE

    if args.max_tokens <= 0:
        raise UsageError("--max-tokens must be positive")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UsageError("need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0")
    _, model, _ = load_run(args.run, args.checkpoint)  # CPU: generation is latency-bound
    tokenizer = load_tokenizer(args.run / TOKENIZER_FILE)
    prompt_ids = tokenizer.encode(args.prompt).ids
    if not prompt_ids:
        raise UsageError("--prompt encodes to no tokens")
    if len(prompt_ids) >= model.cfg.max_seq_len:
        raise UsageError(f"--prompt is {len(prompt_ids)} tokens; the model's context is "
                         f"{model.cfg.max_seq_len}")  # fmt: skip
    eot = tokenizer.token_to_id("<|endoftext|>")
    new_ids = generate(model, prompt_ids, args.max_tokens, args.temperature, args.top_k,
                       args.top_p, args.seed, stop_id=eot)  # fmt: skip
    new_ids = [i for i in new_ids if i != eot]
    print(args.prompt + tokenizer.decode(new_ids))
    return 0


# ---- jtok demo --------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from jtok.demo import format_table, run_demo

    if args.steps <= 0:
        raise UsageError("--steps must be positive")
    summary = run_demo(args.out, steps=args.steps, progress=not args.no_progress)
    print(format_table(summary))
    print(f"\nwrote {args.out / 'summary.json'} and {args.out / 'loss_curves.png'}")
    return 0


# ---- jtok sweep -------------------------------------------------------------------------


def cmd_sweep(args: argparse.Namespace) -> int:
    from jtok.sweep import describe, finished_runs, parse_shard, run_sweep

    runs = run_sweep(args.spec, args.out, shard=parse_shard(args.shard), dry_run=args.dry_run,
                     progress=not args.no_progress, only=args.only,
                     log=lambda msg: print(msg, file=sys.stderr))  # fmt: skip
    if args.dry_run:
        print(describe(runs))
    else:
        finished = finished_runs(args.out)
        n_done = sum(run.name in finished for run in runs)
        where = args.out / "results.jsonl"
        if n_done == len(runs):
            print(f"{len(runs)} runs done; results in {where}")
        else:  # the rest were claimed by other processes sharing the sweep
            print(f"{n_done} of {len(runs)} runs done, {len(runs) - n_done} still running in "
                  f"another process; results in {where}")  # fmt: skip
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

    data_cmd = sub.add_parser("data", help="prepare training data",
                              description="Turn text into training shards.")
    data_sub = data_cmd.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    prep = data_sub.add_parser(
        "prepare",
        help="tokenize text into train/val shards",
        description="Train a byte-level BPE tokenizer (or use --tokenizer) and write token "
        "ids as memory-mappable train.bin / val.bin with a manifest.json. Inputs: text files "
        "or globs, .jsonl (field --field), .parquet (column --field), or --hf-dataset. "
        "Without inputs: Shakespeare's plays, fetched once into the user cache.",
    )
    prep.add_argument("inputs", nargs="*", help="text / .jsonl / .parquet files or globs")
    prep.add_argument("--out", type=Path, required=True, help="output directory")
    prep.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size")
    prep.add_argument("--tokenizer", help="existing tokenizer.json or HF tokenizer directory")
    prep.add_argument("--field", default="text", help="JSONL field / Parquet column")
    prep.add_argument("--hf-dataset", help="a Hugging Face dataset name (needs network)")
    prep.add_argument("--hf-split", default="train")
    prep.add_argument("--val-fraction", type=float, default=0.005)
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    prep.add_argument("--no-progress", action="store_true")
    prep.set_defaults(handler=cmd_data_prepare)

    tr = sub.add_parser(
        "train",
        help="train a model (single process or torchrun)",
        description="Train a model on prepared data. The model comes from --preset or "
        "--config (a model config, or a run config with model: and train: sections); "
        "--set takes model.* and train.* keys (a bare key goes to the section that has "
        "it). The resolved config is written to OUT/config.json. Launch with torchrun "
        "for data parallelism.",
    )
    add_model_arguments(tr, default_preset=None)
    tr.add_argument("--data", type=Path, help="prepared data directory (sets train.data)")
    tr.add_argument("--out", type=Path, required=True, help="run directory")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out")
    tr.add_argument("--overwrite", action="store_true",
                    help="start over in a non-empty --out (deletes its checkpoints)")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(handler=cmd_train)

    sw = sub.add_parser(
        "sweep",
        help="run a grid of trainings for scaling-law / isoFLOP studies (resumable)",
        description="Run every training of a sweep spec (YAML/JSON: base config, axes, "
        "budget in tokens or FLOPs; see jtok/sweep.py) into OUT/runs/, appending one line "
        "per finished run to OUT/results.jsonl for `jtok fit`. Re-running skips finished "
        "runs and resumes interrupted ones. Several processes may run the same spec and "
        "OUT at once: each locks the run it trains and passes over runs locked by another.",
    )
    sw.add_argument("spec", type=Path, help="sweep spec (YAML or JSON)")
    sw.add_argument("--out", type=Path, required=True, help="sweep directory")
    sw.add_argument("--shard", help="I/N: run only every N-th run starting at I (0-based)")
    sw.add_argument("--only", action="append", metavar="GLOB",
                    help="run only runs whose names match (shell pattern, e.g. '*d24*'; "
                    "repeatable)")
    sw.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    sw.add_argument("--no-progress", action="store_true")
    sw.set_defaults(handler=cmd_sweep)

    from jtok.fit import add_fit_arguments, cmd_fit

    fit = sub.add_parser(
        "fit",
        help="fit scaling laws and isoFLOP frontiers to a sweep's results",
        description="Fit, from DIR/results.jsonl (written by `jtok sweep`): the log-linear "
        "law of loss in eta at a fixed backbone; isoFLOP minima, frontiers and the compute "
        "saving / loss gap between two variants with bootstrap CIs; the parametric law "
        "L(N, D) = E + A/N^alpha + B/D^beta with and without N_eff = N_c (1 + eta gamma). "
        "Writes DIR/fit.json, DIR/REPORT_fit.md and PNG plots.",
    )
    add_fit_arguments(fit)
    fit.set_defaults(handler=cmd_fit)

    de = sub.add_parser(
        "demo",
        help="train baseline, JTok and JTok-M side by side (about 10 minutes on CPU)",
        description="On the default corpus (Shakespeare), train one small backbone three "
        "ways (baseline, JTok, JTok-M) for the same tokens; print a table and write "
        "OUT/summary.json and OUT/loss_curves.png. Re-running resumes unfinished runs.",
    )
    de.add_argument("--out", type=Path, required=True, help="output directory")
    de.add_argument("--steps", type=int, default=600, help="optimizer steps per variant")
    de.add_argument("--no-progress", action="store_true")
    de.set_defaults(handler=cmd_demo)

    ev = sub.add_parser("eval", help="loss, perplexity and bits per byte of a trained run",
                        description="Evaluate a run's latest (or given) checkpoint on a "
                        "split of its data or on a text file.")  # fmt: skip
    ev.add_argument("--run", type=Path, required=True, help="run directory")
    ev.add_argument("--checkpoint", type=Path, help="a checkpoint folder (default: latest)")
    source = ev.add_mutually_exclusive_group()
    source.add_argument("--text", type=Path, help="a UTF-8 text file to evaluate on")
    source.add_argument("--split", default="val", help="a split of the run's data")
    ev.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(handler=cmd_eval)

    sa = sub.add_parser("sample", help="generate text from a trained run",
                        description="Continue a prompt with the KV cache.")  # fmt: skip
    sa.add_argument("--run", type=Path, required=True, help="run directory")
    sa.add_argument("--checkpoint", type=Path, help="a checkpoint folder (default: latest)")
    sa.add_argument("--prompt", required=True)
    sa.add_argument("--max-tokens", type=int, default=200)
    sa.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    sa.add_argument("--top-k", type=int, default=50, help="0 = off")
    sa.add_argument("--top-p", type=float, default=0.95)
    sa.add_argument("--seed", type=int, default=0)
    sa.set_defaults(handler=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.preset_given = getattr(args, "preset", None) is not None
    try:
        code = args.handler(args)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at exit
        return code
    except JTokError as err:
        print(f"jtok {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jtok {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `jtok ... | head`: the reader left; quietly stop writing (and keep Python from
        # complaining again while it flushes stdout at exit).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
