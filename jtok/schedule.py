"""The learning-rate schedule: a pure function of (step, TrainConfig).

At the bottom of the import graph: the trainer steps by it, and the run layer uses it to
decide whether a resume may change ``train.steps`` (jtok.run.resume).
"""

from __future__ import annotations

import math


def lr_factor(step: int, train_cfg) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based).

    Linear warmup over warmup_steps, then "cosine" (to min_lr_ratio at the last step),
    "wsd" (constant, then a linear decay over the final decay_fraction of the steps) or
    "constant".
    """
    total, warmup, floor = train_cfg.steps, train_cfg.warmup_steps, train_cfg.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    if train_cfg.schedule == "constant":
        return 1.0
    if train_cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total - 1 - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = max(warmup, total - round(train_cfg.decay_fraction * total))
    if step < decay_start:
        return 1.0
    # Every step of the decay phase is below the peak; the last one is at the floor.
    progress = (step - decay_start + 1) / max(1, total - decay_start)
    return 1.0 - (1 - floor) * min(1.0, progress)
