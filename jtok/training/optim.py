"""Optimizer roles, the two-optimizer bundle (AdamW + RowAdam) and the LR schedule."""

from __future__ import annotations

import contextlib

import torch

from jtok.errors import JTokError
from jtok.schedule import lr_factor  # noqa: F401  (the trainer imports it from here)
from jtok.tables.row_adam import RowAdam
from jtok.tables.store import TokenTables

# ---- optimizer roles and schedule --------------------------------------------------------

# "scale": a retrofit's per-dimension scales s (jtok.hf.retrofit), which start at 0 and
# need their own learning rate (train.scale_lr_mult); a native model's scales are "norm".
ROLES = ("matrix", "embedding", "norm", "router", "table", "scale")


class RoleError(JTokError):
    """A trainable parameter has no optimizer role, or two."""


def parameter_roles(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter, str]]:
    """(name, parameter, role) for every trainable parameter, each parameter once.

    Roles come from module types, not from parameter names: a module class declares the
    roles of its parameters in ``PARAM_ROLES`` (a path relative to the module -> role), and
    any other ``nn.Linear`` weight is a "matrix". Parameters are matched by identity, so a
    wrapper that renames them (DDP's ``module.``, torch.compile's ``_orig_mod.``, FSDP2's
    subclassed modules) changes nothing. Every trainable parameter must get exactly one
    role (nanochat asserts the same): a new parameter type fails loudly here instead of
    silently joining the matrices.
    """
    declared: dict[int, str] = {}
    for module in model.modules():
        for path, role in getattr(type(module), "PARAM_ROLES", {}).items():
            try:
                param = module.get_parameter(path)
            except AttributeError:
                continue  # e.g. an optional submodule this instance does not have
            if declared.setdefault(id(param), role) != role:
                raise RoleError(f"parameter {type(module).__name__}.{path} is declared both "
                                f"{declared[id(param)]!r} and {role!r}")  # fmt: skip
    # A module instance may override its parameters' roles (`param_role_overrides()`, a
    # path -> role dict): a retrofit gives its scales the "scale" role this way, while the
    # same mixer classes in a native model keep "norm".
    for module in model.modules():
        overrides = getattr(module, "param_role_overrides", None)
        if callable(overrides):
            for path, role in overrides().items():
                declared[id(module.get_parameter(path))] = role
    _declare_foreign_roles(model, declared)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            for param in module.parameters(recurse=False):
                declared.setdefault(id(param), "matrix")
    named = list(model.named_parameters())  # tied parameters appear once
    # Host and sharded tables (jtok.tables.host, .sharded) are Parameters the module does not
    # register, so that .to() and wrappers leave them alone; they are tables, for RowAdam.
    for module_name, module in model.named_modules():
        for param in getattr(module, "store_parameters", lambda: [])():
            declared[id(param)] = "table"
            named.append((f"{module_name}.weight", param))
    result = []
    for name, param in named:
        if not param.requires_grad:
            continue
        role = declared.get(id(param))
        if role is None:
            raise RoleError(f"parameter {name} has no optimizer role: declare it in its "
                            "module's PARAM_ROLES")  # fmt: skip
        if role not in ROLES:
            raise RoleError(f"parameter {name} has unknown role {role!r} (roles: {ROLES})")
        result.append((name, param, role))
    return result


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or type(
        module).__name__.endswith(("RMSNorm", "LayerNorm"))  # fmt: skip


def _declare_foreign_roles(model: torch.nn.Module, declared: dict[int, str]) -> None:
    """Roles of modules that declare none (a Hugging Face model's, for a retrofit), by
    type, as jtok's own classes map theirs: an ``nn.Embedding`` and the output head
    (``get_output_embeddings()``) are "embedding", the gains and biases of an RMSNorm or
    LayerNorm (HF's ``LlamaRMSNorm``, ``Qwen3RMSNorm``, ...) are "norm". Declared roles
    win (``setdefault``); other ``nn.Linear`` weights become "matrix" after this."""
    for module in model.modules():
        head = getattr(module, "get_output_embeddings", None)
        if callable(head) and not getattr(type(module), "PARAM_ROLES", None):
            with contextlib.suppress(Exception):  # not every HF class implements it
                out = head()
                if isinstance(out, torch.nn.Module):
                    for param in out.parameters(recurse=False):
                        declared.setdefault(id(param), "embedding")
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            declared.setdefault(id(module.weight), "embedding")
        elif _is_norm(module):
            for param in module.parameters(recurse=False):
                declared.setdefault(id(param), "norm")


def sparse_table_params(model: torch.nn.Module) -> set[int]:
    """ids of table parameters trained with sparse gradients (by RowAdam)."""
    found = set()
    for module in model.modules():
        if isinstance(module, TokenTables) and module.sparse_grad:
            found.update(id(p) for p in module.parameters(recurse=False))
        found.update(id(p) for p in getattr(module, "store_parameters", lambda: [])())
    return found


def role_hyperparameters(train_cfg) -> dict[str, tuple[float, float]]:
    """role -> (lr multiplier, weight decay), from a `TrainConfig`."""
    return {
        "matrix": (1.0, train_cfg.weight_decay),
        "embedding": (train_cfg.embed_lr_mult, 0.0),
        "norm": (train_cfg.norm_lr_mult, 0.0),
        "router": (train_cfg.router_lr_mult, 0.0),
        "table": (train_cfg.table_lr_mult, train_cfg.table_weight_decay),
        "scale": (train_cfg.scale_lr_mult, 0.0),
    }


class Optimizers:
    """AdamW over the dense parameters plus RowAdam over sparse-gradient tables.

    One object with the optimizer interface the trainer needs; each param group carries
    its role and ``base_lr`` so the schedule can scale every group by one factor.
    """

    def __init__(self, model: torch.nn.Module, train_cfg):
        dense: dict[str, list] = {role: [] for role in ROLES}
        sparse: list = []
        sparse_ids = sparse_table_params(model)
        self.roles = parameter_roles(model)
        for _, param, role in self.roles:
            (sparse if role == "table" and id(param) in sparse_ids else dense[role]).append(param)
        common = dict(betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.adam_eps)

        def group(role: str, params: list) -> dict:
            return {"params": params, "role": role, **self._group_hyper(role, train_cfg)}

        self.optimizers: list[torch.optim.Optimizer] = [
            torch.optim.AdamW([group(r, p) for r, p in dense.items() if p], **common)
        ]
        if sparse:
            self.optimizers.append(RowAdam([group("table", sparse)], **common))

    @staticmethod
    def _group_hyper(role: str, train_cfg) -> dict:
        mult, decay = role_hyperparameters(train_cfg)[role]
        base = train_cfg.lr * mult
        return {"lr": base, "base_lr": base, "weight_decay": decay}

    def apply_config(self, train_cfg) -> None:
        """Set every group's hyperparameters from `train_cfg` (after loading a checkpoint,
        whose saved groups would otherwise win over a change allowed on resume)."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                group.update(self._group_hyper(group["role"], train_cfg))
                group["betas"] = (train_cfg.beta1, train_cfg.beta2)
                group["eps"] = train_cfg.adam_eps

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
