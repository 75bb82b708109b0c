"""Optimizer roles, the two-optimizer bundle (AdamW + RowAdam) and the LR schedule."""

from __future__ import annotations

import math

import torch

from jtok.tables.row_adam import RowAdam

# ---- optimizer roles and schedule --------------------------------------------------------

ROLES = ("matrix", "embedding", "norm", "router", "table")


def param_role(name: str, param: torch.nn.Parameter) -> str:
    """The optimizer role of a parameter, from its name in `JTokModel.named_parameters`."""
    if name.startswith("token_tables."):
        return "table"
    if name in ("embed.weight", "head.weight"):
        return "embedding"
    if name.endswith(".router.weight") or name.endswith(".tokmod.router"):
        return "router"
    if param.ndim < 2:
        return "norm"  # RMSNorm gains and the JTok / JTok-M scales s_l
    return "matrix"


def role_hyperparameters(train_cfg) -> dict[str, tuple[float, float]]:
    """role -> (lr multiplier, weight decay), from a `TrainConfig`."""
    return {
        "matrix": (1.0, train_cfg.weight_decay),
        "embedding": (train_cfg.embed_lr_mult, 0.0),
        "norm": (train_cfg.norm_lr_mult, 0.0),
        "router": (train_cfg.router_lr_mult, 0.0),
        "table": (train_cfg.table_lr_mult, train_cfg.table_weight_decay),
    }


class Optimizers:
    """AdamW over the dense parameters plus RowAdam over sparse-gradient tables.

    One object with the optimizer interface the trainer needs; each param group carries
    its role and ``base_lr`` so the schedule can scale every group by one factor.
    """

    def __init__(self, model: torch.nn.Module, train_cfg):
        hyper = role_hyperparameters(train_cfg)
        dense: dict[str, list] = {role: [] for role in ROLES}
        sparse: list = []
        sparse_tables = bool(getattr(model, "cfg", None) and model.cfg.tokmod.sparse_grad)
        for name, param in model.named_parameters():
            role = param_role(name, param)
            (sparse if role == "table" and sparse_tables else dense[role]).append(param)
        common = dict(betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.adam_eps)

        def group(role: str, params: list) -> dict:
            mult, decay = hyper[role]
            base = train_cfg.lr * mult
            return {"params": params, "lr": base, "base_lr": base, "weight_decay": decay,
                    "role": role}  # fmt: skip

        self.optimizers: list[torch.optim.Optimizer] = [
            torch.optim.AdamW([group(r, p) for r, p in dense.items() if p], **common)
        ]
        if sparse:
            self.optimizers.append(RowAdam([group("table", sparse)], **common))

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_lr_factor(self, factor: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * factor

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != len(self.optimizers):
            raise ValueError("optimizer state does not match this model's optimizers")
        for opt, state in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(state)


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
