"""`jtok generate`: continue many prompts of a file at once (batched, with the KV cache)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jtok.cli.common import (
    UsageError,
    check_run_and_checkpoint,
    finite_float,
    nonnegative_int,
    positive_int,
)


def read_prompts(source: str) -> list[tuple[int, str]]:
    """(line number, text) of every non-empty line of a UTF-8 file, or of stdin for "-"."""
    if source == "-":
        stream = getattr(sys.stdin, "buffer", None)
        raw = stream.read() if stream is not None else sys.stdin.read().encode("utf-8")
        where = "stdin"
    else:
        path = Path(source)
        if path.is_dir():
            raise UsageError(f"--prompts {source} is a folder, not a file of prompts")
        if not path.exists():  # a pipe (`--prompts <(...)`) or a device is read as it comes
            raise UsageError(f"--prompts {source}: no such file")
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise UsageError(f"--prompts {source}: {err.strerror or err}") from None
        where = source
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"--prompts {where}: not UTF-8 (byte {err.start}: {err.reason})") from None
    # split("\n"), not splitlines(): form feeds and U+2028 inside a prompt stay in it.
    lines = [line.removesuffix("\r") for line in text.removeprefix("\ufeff").split("\n")]
    prompts = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts {where}: no prompt (every line is empty)")
    return prompts


def _check_arguments(args: argparse.Namespace) -> None:
    check_run_and_checkpoint(args)
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")


def _stop_reason(new_ids: list[int], prompt_len: int, eot: int | None, context: int) -> str:
    if new_ids and new_ids[-1] == eot:
        return "eot"
    return "context" if prompt_len + len(new_ids) >= context else "max_new_tokens"


def cmd_generate(args: argparse.Namespace) -> int:
    from jtok.data import EOT_TOKEN, load_tokenizer
    from jtok.inference.generate import generate_batch
    from jtok.parallel.distributed import resolve_device
    from jtok.run.files import TOKENIZER_FILE
    from jtok.run.rundir import load_run, saved_run_config

    # Everything is checked before the model loads: a mistake costs no loading time.
    _check_arguments(args)
    prompts = read_prompts(args.prompts)
    saved = saved_run_config(args.run)
    context = saved.model.max_seq_len
    tokenizer = load_tokenizer(args.run / TOKENIZER_FILE)
    prompt_ids = []
    for line, text in prompts:
        ids = tokenizer.encode(text).ids
        if not ids:
            raise UsageError(f"--prompts line {line}: encodes to no tokens")
        if len(ids) >= context:
            raise UsageError(f"--prompts line {line}: {len(ids)} tokens; the model's context "
                             f"is {context}, which leaves no room to generate")  # fmt: skip
        prompt_ids.append(ids)
    device = resolve_device(saved.train.device)
    _, model, _ = load_run(args.run, args.checkpoint, device=device,
                           table_placement=args.table_placement)  # fmt: skip
    eot = tokenizer.token_to_id(EOT_TOKEN)
    news = generate_batch(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k,
                          args.top_p, args.seed, stop_ids=() if eot is None else (eot,),
                          batch_size=args.batch_size, compile=args.compile)  # fmt: skip
    for (line, text), ids, new in zip(prompts, prompt_ids, news, strict=True):
        reason = _stop_reason(new, len(ids), eot, context)
        completion_ids = new[:-1] if reason == "eot" else new
        completion = tokenizer.decode(completion_ids)
        if args.json:
            # "line": where the prompt is in the file (blank lines are skipped).
            print(json.dumps({"prompt": text, "completion": completion,
                              "completion_ids": completion_ids, "prompt_tokens": len(ids),
                              "stop": reason, "line": line}))  # fmt: skip
        else:  # one line per prompt: line breaks of the completion are shown as \n
            one_line = completion.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n")
            print(text + one_line)
    return 0


def register(sub) -> None:
    ge = sub.add_parser(
        "generate", help="continue every prompt of a file (batched)",
        description="Continue each non-blank line of --prompts (UTF-8; - reads stdin) with a "
        "trained run, many prompts at once. Each prompt stops at the end-of-text token, "
        "after --max-new-tokens, or at the model's context. Prints one line per prompt "
        "(the prompt and its completion, line breaks shown as \\n), or with --json one "
        "object per prompt: prompt, completion, completion_ids (without the end-of-text "
        "id), prompt_tokens, stop (eot, max_new_tokens or context), line (its line number).",
    )  # fmt: skip
    ge.add_argument("--run", type=Path, required=True, help="run directory")
    ge.add_argument("--checkpoint", type=Path, help="a checkpoint folder (default: latest)")
    ge.add_argument("--prompts", required=True, metavar="FILE",
                    help="one prompt per line (empty lines skipped); - for stdin")
    ge.add_argument("--max-new-tokens", type=positive_int, default=128)
    ge.add_argument("--temperature", type=finite_float, default=0.0, help="0 = greedy")
    ge.add_argument("--top-k", type=nonnegative_int, default=0, help="0 = off")
    ge.add_argument("--top-p", type=finite_float, default=1.0, help="1 = off")
    ge.add_argument("--seed", type=nonnegative_int, default=0,
                    help="sampling seed (used modulo 2^64); prompt i's draws depend on "
                    "(seed, i) only")
    ge.add_argument("--batch-size", type=positive_int, default=32,
                    help="prompts decoded together (grouped by length)")
    ge.add_argument("--table-placement", choices=["device", "host"], default="device",
                    help="keep the tables on the model's device or in host memory")
    ge.add_argument("--json", action="store_true", help="one JSON object per prompt")
    ge.add_argument("--compile", action="store_true",
                    help="run the model under torch.compile: faster decoding after tens of "
                         "seconds of compilation (worth it for long generations)")
    ge.set_defaults(handler=cmd_generate)
