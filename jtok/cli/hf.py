"""`jtok export`: a training run as a Hugging Face transformers model directory."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from jtok.cli.common import UsageError, check_run_and_checkpoint


def cmd_export(args: argparse.Namespace) -> int:
    # Everything is checked before the model loads: a mistake costs no loading time.
    check_run_and_checkpoint(args)
    try:
        importlib.import_module("jtok.hf")  # the transformers extra (and Auto registration)
    except ImportError as err:
        raise UsageError(str(err).splitlines()[0] if str(err) else repr(err)) from None
    from jtok.hf.export import check_out_dir, export_run
    from jtok.run.rundir import is_retrofit, saved_run_config

    if is_retrofit(saved_run_config(args.run)):  # jtok train --init-from-hf
        from jtok.hf.retrofit_export import export_retrofit_run

        step = export_retrofit_run(args.run, args.out, args.checkpoint, overwrite=args.overwrite)
        print(f"exported {args.run} (step {step}) to {args.out}: load it with "
              "jtok.load_retrofit (AutoModelForCausalLM.from_pretrained loads the backbone "
              "alone)")  # fmt: skip
        return 0
    check_out_dir(args.out, args.overwrite)
    step = export_run(args.run, args.out, args.checkpoint, overwrite=args.overwrite)
    print(f"exported {args.run} (step {step}) to {args.out}: load it with "
          "AutoModelForCausalLM.from_pretrained after `import jtok.hf`, or with "
          "trust_remote_code=True")  # fmt: skip
    return 0


def register(sub) -> None:
    ex = sub.add_parser(
        "export", help="write a run as a Hugging Face transformers model directory",
        description="Write a trained run (its latest checkpoint, or --checkpoint) to --out as "
        "a transformers model directory: config.json (model_type jtok, with auto_map), "
        "model.safetensors, generation_config.json and the run's tokenizer as a "
        "PreTrainedTokenizerFast (end-of-text as eos and pad token, left padding). Load it "
        "with AutoModelForCausalLM.from_pretrained(OUT) after `import jtok.hf`, or with "
        "trust_remote_code=True where jtok is installed. A retrofitted run (jtok train "
        "--init-from-hf) is written as the HF model's own directory plus "
        "jtok_retrofit.safetensors / .json and the tokenizer: load it with "
        "jtok.load_retrofit(OUT) (AutoModelForCausalLM gives the backbone alone). Needs the "
        "transformers extra: pip install 'jtok[transformers]'.",
    )  # fmt: skip
    ex.add_argument("--run", type=Path, required=True, help="run directory")
    ex.add_argument("--out", type=Path, required=True, help="directory to write")
    ex.add_argument("--checkpoint", type=Path, help="a checkpoint folder (default: latest)")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace an earlier export in --out")
    ex.set_defaults(handler=cmd_export)
