"""`jtok checkpoint consolidate`: a distributed checkpoint's single-process files."""

from __future__ import annotations

import argparse
from pathlib import Path

from jtok.cli.common import UsageError, check_run_and_checkpoint


def cmd_consolidate(args: argparse.Namespace) -> int:
    from jtok.nn.model import build_model
    from jtok.run import checkpoint as ckpt
    from jtok.run.dcp import has_dcp, load_dcp
    from jtok.run.lock import run_lock
    from jtok.run.rundir import saved_run_config
    from jtok.training.optim import Optimizers

    check_run_and_checkpoint(args)
    run_cfg = saved_run_config(args.run)
    targets = ([args.checkpoint] if args.checkpoint is not None
               else [c for c in ckpt.list_checkpoints(args.run) if has_dcp(c)])  # fmt: skip
    if not targets:
        raise UsageError(f"{args.run} has no distributed (DCP) checkpoint to consolidate")
    with run_lock(args.run):  # no trainer may rotate the checkpoint away meanwhile
        for ckpt_dir in targets:
            if not has_dcp(ckpt_dir):
                raise UsageError(f"--checkpoint {ckpt_dir} is not a distributed checkpoint")
            state = ckpt.validate_checkpoint(ckpt_dir, build_model(run_cfg.model, device="meta"),
                                             with_optimizer=True)  # fmt: skip
            if ckpt.has_single_file(ckpt_dir) and not args.force:
                print(f"{ckpt_dir}: already consolidated")
                continue
            # One process, the whole model: DCP reads every process's part into it.
            model = build_model(run_cfg.model, device="cpu")
            optimizers = Optimizers(model, run_cfg.train)
            load_dcp(ckpt_dir, model, optimizers, state.get("optimizer"))
            ckpt.write_single_files(ckpt_dir, model, optimizers)
            print(f"{ckpt_dir}: wrote {ckpt.MODEL_FILE} and {ckpt.OPTIMIZER_FILE}")
    return 0


def register(sub) -> None:
    group = sub.add_parser("checkpoint", help="checkpoint tools",
                           description="Tools for a run's checkpoints.")  # fmt: skip
    commands = group.add_subparsers(dest="checkpoint_command", metavar="COMMAND", required=True)
    cons = commands.add_parser(
        "consolidate", help="write a distributed checkpoint's single-process files",
        description="A run trained by several processes saves each checkpoint with "
        "torch.distributed.checkpoint (every process writes its part). This reads such a "
        "checkpoint whole, on one process, and adds the single-process files "
        "(model.safetensors, optimizer.safetensors) beside it: the format export and other "
        "tools read, and what to share. eval, sample and a resume read either format.",
    )
    cons.add_argument("--run", type=Path, required=True, help="run directory")
    cons.add_argument("--checkpoint", type=Path, help="one checkpoint folder (default: every "
                      "distributed checkpoint of the run)")
    cons.add_argument("--force", action="store_true", help="rewrite files already written")
    cons.set_defaults(handler=cmd_consolidate, command="checkpoint consolidate")
