"""Residual-stream std after each block of trained runs, on the first 8 x 256 validation tokens.

    python3 results/ablations/hidden_std.py results/ablations/runs/*/

METHOD.md: without 1/sqrt(2 N_l) "the hidden-state std grows past 5". The runs keep only their
last checkpoint, so this reads the end of training, not its start.
"""

import sys
from pathlib import Path

import numpy as np
import torch

from jtok.data import load_manifest
from jtok.run.checkpoint import load_run


def block_output_stds(run_dir: Path, tokens: int = 8 * 256) -> list[float]:
    cfg, model, _ = load_run(run_dir)
    manifest = load_manifest(Path(cfg.train.data))
    dtype = np.dtype(manifest["dtype"])
    ids = np.fromfile(Path(cfg.train.data) / "val.bin", dtype=dtype)[:tokens].astype(np.int64)
    stds: list[float] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: stds.append(out[0].std().item()))
             for block in model.blocks]  # fmt: skip
    with torch.no_grad():
        model(torch.from_numpy(ids).view(-1, cfg.train.seq_len))
    for hook in hooks:
        hook.remove()
    return stds


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        stds = block_output_stds(Path(arg))
        print(f"{Path(arg).name:<28}", " ".join(f"{s:6.2f}" for s in stds))
