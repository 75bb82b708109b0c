"""Run under torchrun by tests/test_parallel.py: train each configuration of a JSON list in
turn (one launch for many configurations keeps the multi-process tests fast).

An item is ``{"config", "out"}`` and optionally: "resume" (with "copy_from" and "drop": a
copy of another run without its last checkpoint), "allow_changes" (config keys a resume
may change), "exchange_path" (force the sharded store's path for this run), or
``{"paths": out}``: compare the sharded store's two exchange paths (tests/dist_paths.py).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from jtok.config import RunConfig
from jtok.tables.sharded import ShardedTables
from jtok.training.loop import train


def record_share(cfg, out):
    """What this process held of a sharded table (rows, RowAdam state), after a short run."""
    from jtok.nn.model import build_model
    from jtok.training.optim import Optimizers

    model = build_model(cfg.model, table_placement="sharded")
    store = model.token_tables
    optimizers = Optimizers(model, cfg.train)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 9))
    model(ids).logits.sum().backward()
    optimizers.step()
    state = optimizers.optimizers[-1].state[store.weight]
    share = {"n_rows": store.n_rows, "rows": store.weight.shape[0], "d": store.weight.shape[1],
             "exp_avg": list(state["exp_avg"].shape), "row_step": list(state["row_step"].shape)}
    Path(out, f"share_{dist.get_rank()}.json").write_text(json.dumps(share))


if __name__ == "__main__":
    dist.init_process_group("gloo")  # once: every run of the launch shares it
    for item in json.loads(sys.argv[1]):
        if "paths" in item:
            from dist_paths import compare_paths

            compare_paths(item["paths"])
            continue
        if "copy_from" in item:  # a resume: the main process prepares the copy
            if dist.get_rank() == 0:
                import shutil

                shutil.copytree(item["copy_from"], item["out"])
                shutil.rmtree(Path(item["out"], "checkpoints", item["drop"]))
            dist.barrier()
        cfg = RunConfig.from_dict(item["config"])
        ShardedTables.exchange_path = item.get("exchange_path", "auto")
        train(cfg, item["out"], resume=item.get("resume", False), progress=False,
              allow_changes=set(item.get("allow_changes", ())), log=lambda message: None)
        ShardedTables.exchange_path = "auto"
        if cfg.train.table_placement == "sharded":
            record_share(cfg, item["out"])
    dist.destroy_process_group()
