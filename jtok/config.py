"""One typed configuration for a jtok model: backbone, MoE and token-indexed modulation.

Everything that shapes a model lives here, and only here (the JSON, override and
type-check machinery behind these dataclasses is jtok.config_io): the model, the accounting in
`jtok.flops`, the CLI and (later) the trainer read these dataclasses. Values are checked
when a config is built, and every error names the offending field with its dotted path
(e.g. ``tokmod.top_k``) so a user can fix it from the message alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from jtok.config_io import (  # noqa: F401  (ConfigError, config_keys, ...: re-exported)
    ConfigError,
    _ConfigBase,
    _require,
    _require_choice,
    _require_finite,
    _require_positive,
    config_keys,
    unknown_key_error,
)

MOE_SCORE_FUNCS = ("softmax", "sigmoid")
MOE_BALANCE_METHODS = ("aux_loss", "aux_free", "none")
TOKMOD_KINDS = ("none", "jtok", "jtokm")


@dataclass
class MoEConfig:
    """Mixture-of-experts FFN. ``num_experts == 0`` means every layer uses a dense SwiGLU."""

    num_experts: int = 0  # routed experts per MoE layer; 0 disables MoE
    num_shared_experts: int = 0  # always-active experts, fused into one SwiGLU
    top_k: int = 2  # routed experts per token (token-choice)
    expert_hidden: int = 0  # SwiGLU hidden width of one expert (routed and shared)
    score_func: str = "softmax"  # "softmax" or "sigmoid" router scores
    renormalize: bool = True  # rescale the top-k scores to sum to 1
    balance: str = "aux_loss"  # "aux_loss" (Switch), "aux_free" (bias, DeepSeek-V3) or "none"
    aux_weight: float = 0.01  # lambda of the Switch-style loss when balance == "aux_loss"
    bias_update_rate: float = 1e-3  # step of the selection bias when balance == "aux_free"
    first_dense_layers: int = 0  # leading layers that keep a dense FFN (DeepSeekMoE style)

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def validate(self, prefix: str = "moe.") -> None:
        _require_finite(self, prefix)
        _require(self.num_experts >= 0, prefix + "num_experts", "must be >= 0")
        _require(self.num_shared_experts >= 0, prefix + "num_shared_experts", "must be >= 0")
        _require(self.first_dense_layers >= 0, prefix + "first_dense_layers", "must be >= 0")
        _require_choice(self.score_func, prefix + "score_func", MOE_SCORE_FUNCS)
        _require_choice(self.balance, prefix + "balance", MOE_BALANCE_METHODS)
        _require(self.aux_weight >= 0, prefix + "aux_weight", "must be >= 0")
        _require(self.bias_update_rate >= 0, prefix + "bias_update_rate", "must be >= 0")
        if self.enabled:
            _require_positive(self, prefix, "top_k", "expert_hidden")
            _require(
                self.top_k <= self.num_experts,
                prefix + "top_k",
                f"top_k={self.top_k} exceeds num_experts={self.num_experts}",
            )


@dataclass
class TokModConfig:
    """Token-indexed modulation (METHOD.md): none, JTok (Eq 7-9) or JTok-M (Eq 10-13)."""

    kind: str = "none"  # "none", "jtok" or "jtokm"
    layers: list[int] | None = None  # layer indices that carry tables; None = every layer
    n_e: int = 5  # JTok-M: tables per layer (the modulator pool)
    top_k: int = 2  # JTok-M: modulators mixed per token (K)
    aux_weight: float = 1e-4  # JTok-M: lambda of the Switch-style load-balancing loss
    eps: float = 1e-6  # added to the L2 norm before dividing (Eq 8 / Eq 12)
    # OPEN (init): tables ~ N(0, table_init_std^2). Only the direction of a row matters
    # after the L2 projection, but the norm sets how fast Adam turns it: a step of size lr
    # per element rotates a row by about lr / table_init_std radians.
    table_init_std: float = 1.0
    # OPEN (init of s). None picks by kind. JTok: s = 1, a gentle gate 1 + s u of about
    # 1 +- 1/sqrt(d) per element (s = 0 would give the tables no gradient at the first
    # step). JTok-M: s = sqrt(d), so that s u is unit-RMS per element and Eq 13's
    # 1/sqrt(2 N_l) alone sets the size of each layer's update, as the paper's account of
    # that factor implies (without it the hidden std "grows past 5": with s = 1 the whole
    # sum over layers could not). Measured (results/scale-init, d = 128, 3M tokens):
    # s = 1 made JTok-M worse than the baseline (Adam grew s at its top rate all run);
    # s = sqrt(d) made it better.
    scale_init: float | None = None
    router_init_std: float = 0.02  # JTok-M router R_l ~ N(0, std^2)
    # Ablation switches (METHOD.md calls both essential): False drops the L2 projection
    # of Eq 7 / Eq 12, or JTok-M's 1/sqrt(2 N_l) factor of Eq 13.
    l2_normalize: bool = True
    depth_scaling: bool = True
    dedup: bool = True  # gather each distinct token id of a batch once, then expand
    # Sparse (row-wise) table gradients, for jtok.training.optim.RowAdam: a batch touches a few
    # hundred rows of a table that can dwarf the backbone, and a dense gradient plus a
    # dense optimizer step over all of it costs more than the rest of the training step.
    # Set false to train the tables with a dense optimizer such as torch's AdamW.
    sparse_grad: bool = True

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def initial_scale(self, d_model: int) -> float:
        """The value s starts from (scale_init, or the kind's default)."""
        if self.scale_init is not None:
            return float(self.scale_init)
        return math.sqrt(d_model) if self.kind == "jtokm" else 1.0

    @property
    def tables_per_layer(self) -> int:
        return {"none": 0, "jtok": 1, "jtokm": self.n_e}[self.kind]

    def validate(self, prefix: str = "tokmod.") -> None:
        _require_finite(self, prefix)
        _require_choice(self.kind, prefix + "kind", TOKMOD_KINDS)
        _require_positive(self, prefix, "n_e", "top_k", "eps", "table_init_std")
        _require(
            self.top_k <= self.n_e, prefix + "top_k", f"K={self.top_k} exceeds n_e={self.n_e}"
        )
        _require(self.aux_weight >= 0, prefix + "aux_weight", "must be >= 0")
        _require(self.router_init_std >= 0, prefix + "router_init_std", "must be >= 0")
        if self.layers is not None:
            _require(
                len(set(self.layers)) == len(self.layers), prefix + "layers", "has duplicates"
            )
            # An empty list would give JTok / JTok-M no table at all: a baseline in disguise.
            _require(self.kind == "none" or len(self.layers) > 0, prefix + "layers",
                     f"is empty: {self.kind} needs a layer (omit it for every layer, or "
                     "set tokmod.kind=none)")  # fmt: skip


@dataclass
class ModelConfig(_ConfigBase):
    """A decoder-only model: backbone fields, plus the `moe` and `tokmod` sections."""

    vocab_size: int = 512
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4  # grouped-query attention when < n_heads
    ffn_hidden: int = 192  # SwiGLU hidden width of the dense FFN
    rope_base: float = 10000.0
    max_seq_len: int = 256  # longest sequence the RoPE table and KV cache cover
    tie_embeddings: bool = False  # share the input embedding with the output head
    norm_eps: float = 1e-5
    init_std: float = 0.02  # std of matrices and embeddings (output projections are scaled)
    moe: MoEConfig = field(default_factory=MoEConfig)
    tokmod: TokModConfig = field(default_factory=TokModConfig)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe.enabled and layer >= self.moe.first_dense_layers

    @property
    def tokmod_layers(self) -> list[int]:
        """Indices of the layers that carry token-indexed tables, ascending."""
        if not self.tokmod.enabled:
            return []
        if self.tokmod.layers is None:
            return list(range(self.n_layers))
        return sorted(self.tokmod.layers)

    def validate(self) -> None:
        _require_finite(self, "")
        _require_positive(
            self, "", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
            "ffn_hidden", "rope_base", "max_seq_len", "norm_eps", "init_std",
        )  # fmt: skip
        _require(
            self.d_model % self.n_heads == 0,
            "n_heads",
            f"n_heads={self.n_heads} does not divide d_model={self.d_model}",
        )
        _require(
            self.n_heads % self.n_kv_heads == 0,
            "n_kv_heads",
            f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}",
        )
        _require(self.head_dim % 2 == 0, "n_heads", "head dim d_model/n_heads must be even (RoPE)")
        self.moe.validate()
        self.tokmod.validate()
        for layer in self.tokmod.layers or []:
            _require(
                0 <= layer < self.n_layers,
                "tokmod.layers",
                f"layer {layer} out of range for n_layers={self.n_layers}",
            )

SCHEDULES = ("cosine", "wsd", "constant")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
TABLE_PLACEMENTS = ("device", "host", "sharded")
PARALLEL_MODES = ("ddp", "fsdp")


@dataclass
class TrainConfig(_ConfigBase):
    """How to train: data, batch, schedule, optimizer roles, evaluation and checkpoints.

    Optimizer roles (see jtok.training.optim.parameter_roles): "matrix" (attention / FFN / expert
    weights) take lr and weight_decay; "embedding" (input embedding, head), "norm"
    (RMSNorm gains, JTok scales s_l) and "router" (MoE and JTok-M routers) take their lr
    multiplier and no decay; "table" (token-indexed tables) takes table_lr_mult and
    table_weight_decay, 0 by default: on an L2-normalised table, decay only shrinks the
    norm and so raises the effective step size (METHOD.md).
    """

    data: str = ""  # a directory written by `jtok data prepare`
    seq_len: int = 256
    batch_size: int = 16  # sequences per optimizer step, summed over all processes
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int = 1000  # optimizer steps
    lr: float = 3e-3
    schedule: str = "cosine"  # "cosine", "wsd" (warmup-stable-decay) or "constant"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled decay of the "matrix" role
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    # The input embedding and head at 3x the base lr: on docs-en (results/calibration, d128
    # L4, V 2048, 3M tokens) the baseline ended 5.2% lower with x3 than with x1 (x10: 4.4%).
    # Every earlier comparison of JTok(-M) against an x1 baseline overstates its gain, since
    # JTok-M hardly depends on this multiplier (-0.5% vs the x3 baseline).
    embed_lr_mult: float = 3.0
    norm_lr_mult: float = 1.0
    router_lr_mult: float = 1.0
    # Tables are L2-normalised rows of std table_init_std (1.0); Adam moves each element by
    # about lr per step, so a row turns by about lr * table_lr_mult / std radians a step.
    # At the matrices' lr the tables stay near their random init for hundreds of steps,
    # and JTok-M's additive update is then noise: in the demo setting (600 steps,
    # lr 3e-3) JTok-M ended 2.1% worse than the baseline with x1 and 2.8% better with x30.
    # On docs-en (results/ablations, 732 steps): x1 9.3% worse than the baseline, x10 / x30 /
    # x100 2.8% / 6.2% / 8.1% better; at the narrow compute-optimal sizes x300 beat x30 by
    # 1-2% (results/table-lr-narrow); in results/calibration (d128 L4, 3M tokens) JTok-M
    # ended at 3.7092 / 3.7053 / 3.7287 / 3.7314 with x30 / x300 / x1000 / x3000: x300 is
    # the best measured, x1000 and beyond lose.
    table_lr_mult: float = 300.0
    table_weight_decay: float = 0.0
    # Retrofits only (jtok train --init-from-hf; jtok.hf.retrofit). freeze_backbone: train
    # the tables, routers and scales, not the HF model's own weights. scale_lr_mult: the lr
    # multiplier of the retrofit's scales s (role "scale"; a native model's scales are
    # "norm"). s starts at 0 (outputs unchanged) and the tables learn only as fast as s
    # grows: at 30 x lr a retrofit catches up with the native init within ~100 steps, at
    # 1 x lr it is far behind after 300 (benchmarks/results/retrofit_warmstart_seed*.json).
    freeze_backbone: bool = False
    scale_lr_mult: float = 30.0
    eval_every: int = 200  # steps between validations (and at the end); 0: only at the end
    eval_tokens: int = 131072  # validation tokens per evaluation
    save_every: int = 200  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # "auto" takes CUDA when available
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model
    # Where the token-indexed tables live (jtok.tables.store): "device" (a Parameter on the
    # model's device), "host" (host memory; only a batch's rows reach the accelerator) or
    # "sharded" (each of W processes holds 1/W of the rows: embedding parallelism).
    # A run-time choice: checkpoints are the same either way, and a resume may change it.
    table_placement: str = "device"
    # Backbone data parallelism under torchrun (jtok.parallel.wrap): "ddp" replicates the
    # model, "fsdp" shards parameters, gradients and optimizer state (FSDP2). A run-time
    # choice; one process ignores it.
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "") -> None:
        _require_finite(self, prefix)
        _require_positive(self, prefix, "seq_len", "batch_size", "grad_accum", "steps",
                          "log_every", "keep_checkpoints", "eval_tokens")  # fmt: skip
        _require(self.lr > 0, prefix + "lr", f"must be positive, got {self.lr!r}")
        _require(
            self.batch_size % self.grad_accum == 0,
            prefix + "grad_accum",
            f"grad_accum={self.grad_accum} does not divide batch_size={self.batch_size}",
        )
        _require_choice(self.schedule, prefix + "schedule", SCHEDULES)
        _require_choice(self.device, prefix + "device", DEVICES)
        _require_choice(self.precision, prefix + "precision", PRECISIONS)
        _require_choice(self.table_placement, prefix + "table_placement", TABLE_PLACEMENTS)
        _require_choice(self.parallel, prefix + "parallel", PARALLEL_MODES)
        for name in ("warmup_steps", "eval_every", "save_every", "weight_decay", "grad_clip",
                     "table_weight_decay", "adam_eps"):  # fmt: skip
            _require(getattr(self, name) >= 0, prefix + name, "must be >= 0")
        for name in ("embed_lr_mult", "norm_lr_mult", "router_lr_mult", "table_lr_mult",
                     "scale_lr_mult"):  # fmt: skip
            _require(getattr(self, name) >= 0, prefix + name, "must be >= 0")
        _require(0 < self.decay_fraction <= 1, prefix + "decay_fraction", "must be in (0, 1]")
        _require(0 <= self.min_lr_ratio <= 1, prefix + "min_lr_ratio", "must be in [0, 1]")
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(self, name) < 1, prefix + name, "must be in [0, 1)")


@dataclass
class RunConfig(_ConfigBase):
    """Everything a training run needs; written as config.json into the run directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _require(
            self.train.seq_len <= self.model.max_seq_len,
            "train.seq_len",
            f"seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
        )


def effective_dict(run_cfg: RunConfig) -> dict[str, Any]:
    """The config as a dict, with the fields of a disabled section (no tables, no MoE)
    blanked: two configs with equal effective dicts train the same run."""
    data = run_cfg.to_dict()
    if data["model"]["tokmod"]["kind"] == "none":
        data["model"]["tokmod"] = {"kind": "none"}
    if data["model"]["moe"]["num_experts"] == 0:
        data["model"]["moe"] = {"num_experts": 0}
    return data


def config_differences(recorded: dict[str, Any] | None, planned: RunConfig) -> list[str]:
    """'dotted.key: old -> new' for each field where a recorded run config (a config.json
    or a results line) differs in effect from the planned one.

    The recorded dict goes through RunConfig first, so fields added to the config since it
    was written take their defaults instead of counting as differences."""
    if recorded is None:
        return []
    try:
        old = effective_dict(RunConfig.from_dict(recorded))
    except ConfigError:
        return ["(unreadable config)"]

    def walk(a: Any, b: Any, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [d for k in sorted(set(a) | set(b))
                    for d in walk(a.get(k), b.get(k), f"{prefix}{k}.")]  # fmt: skip
        return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]

    return walk(old, effective_dict(planned), "")
