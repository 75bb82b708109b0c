"""Run under torchrun by tests/test_parallel.py: train each configuration of a JSON list in
turn (one launch for many configurations keeps the multi-process tests fast)."""

import json
import sys

import torch.distributed as dist

from jtok.config import RunConfig
from jtok.training.loop import train

if __name__ == "__main__":
    dist.init_process_group("gloo")  # once: every run of the launch shares it
    for item in json.loads(sys.argv[1]):
        cfg = RunConfig.from_dict(item["config"])
        train(cfg, item["out"], resume=item.get("resume", False), progress=False,
              log=lambda message: None)
    dist.destroy_process_group()
