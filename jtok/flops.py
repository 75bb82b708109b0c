"""Parameter and FLOP accounting as pure functions of a `ModelConfig`.

Nothing here builds a model, so paper-scale configs are counted instantly; a test checks
the counts against real (tiny and meta-device) models and the FLOPs against
`torch.utils.flop_counter.FlopCounterMode`.

Conventions (METHOD.md, "Counting"):
- N_c (backbone parameters) counts every parameter that is not token-indexed: input
  embedding, head (once if tied), attention, FFN / experts, routers, norms, and the small
  dense parameters JTok adds (scales s_l, JTok-M routers R_l). For MoE, "active" counts
  the routed experts a token actually uses (top_k of num_experts); eta uses the active
  count, since N_c is meant as the compute parameters.
- N_n (token parameters) counts the tables: JTok L*V*d, JTok-M L*n_e*V*d.
- FLOPs are per token. A matmul of an m x n weight costs 2mn forward; training costs 3x
  forward (backward = 2x). Attention scores (QK^T and AV) cost 4*T*d per layer forward at
  context T, counted over the full T x T square, as FlopCounterMode does for SDPA's
  reference path (a causal kernel skips about half of it).
- Element-wise work of the modulation (norms, gates, adds) is an estimate, reported
  separately: it is memory-bound and tiny next to the matmuls.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from jtok.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    embedding: int
    head: int  # 0 when tied to the embedding
    attention: int
    dense_ffn: int
    shared_experts: int
    routed_experts: int
    routed_experts_active: int
    moe_routers: int
    norms: int
    tokmod_dense: int  # JTok / JTok-M scales and JTok-M routers
    token_params: int  # N_n

    @property
    def backbone(self) -> int:
        """N_c, total."""
        return self.backbone_active + self.routed_experts - self.routed_experts_active

    @property
    def backbone_active(self) -> int:
        """N_c, counting only the routed experts a token uses."""
        return (
            self.embedding + self.head + self.attention + self.dense_ffn + self.shared_experts
            + self.routed_experts_active + self.moe_routers + self.norms + self.tokmod_dense
        )  # fmt: skip


def count_params(cfg: ModelConfig) -> ParamCounts:
    d, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    moe, tok = cfg.moe, cfg.tokmod
    n_moe = sum(cfg.is_moe_layer(i) for i in range(L))
    n_tok = len(cfg.tokmod_layers)
    expert = 3 * d * moe.expert_hidden
    return ParamCounts(
        embedding=V * d,
        head=0 if cfg.tie_embeddings else V * d,
        attention=L * (d * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + d * d),
        dense_ffn=(L - n_moe) * 3 * d * cfg.ffn_hidden,
        shared_experts=n_moe * moe.num_shared_experts * expert,
        routed_experts=n_moe * moe.num_experts * expert,
        routed_experts_active=n_moe * moe.top_k * expert,
        moe_routers=n_moe * moe.num_experts * d,
        norms=(2 * L + 1) * d,
        tokmod_dense=n_tok * d * (1 + (tok.n_e if tok.kind == "jtokm" else 0)),
        token_params=n_tok * tok.tables_per_layer * V * d,
    )


@dataclass(frozen=True)
class FlopCounts:
    """Forward FLOPs per token, by kind."""

    matmul: float  # projections, FFN / experts, routers, head
    attention_scores: float
    tokmod_elementwise: float  # estimate

    @property
    def forward(self) -> float:
        return self.matmul + self.attention_scores + self.tokmod_elementwise

    @property
    def train(self) -> float:
        return 3 * self.forward


def count_flops(cfg: ModelConfig, seq_len: int | None = None) -> FlopCounts:
    """Forward FLOPs per token at context length `seq_len` (default: cfg.max_seq_len)."""
    T = seq_len or cfg.max_seq_len
    d, L, tok = cfg.d_model, cfg.n_layers, cfg.tokmod
    p = count_params(cfg)
    n_tok = len(cfg.tokmod_layers)
    # Every weight matrix a token passes through, once: 2 FLOPs per weight.
    matmul = 2 * (
        p.attention + p.dense_ffn + p.shared_experts + p.routed_experts_active + p.moe_routers
        + cfg.vocab_size * d
    )  # fmt: skip
    elementwise = 0.0
    if tok.kind == "jtok":
        # ||E[x]|| (2d), divide (d), 1 + s*u (2d), m * gate + h~ (2d)
        elementwise = n_tok * 7 * d
    elif tok.kind == "jtokm":
        matmul += n_tok * 2 * d * tok.n_e  # router
        # RMSNorm of h (4d), sum_i w_i E_i (2Kd), ||e|| (2d), e * coeff * s (2d),
        # h~ + m + r (2d)
        elementwise = n_tok * (10 + 2 * tok.top_k) * d
    return FlopCounts(
        matmul=float(matmul), attention_scores=float(L * 4 * T * d),
        tokmod_elementwise=float(elementwise),
    )  # fmt: skip


def summarize(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    """The figures `jtok info` prints: N_c, N_n, eta, rho, FLOPs per token, breakdown."""
    p = count_params(cfg)
    f = count_flops(cfg, seq_len)
    tok = cfg.tokmod
    return {
        "backbone_params": p.backbone,
        "active_backbone_params": p.backbone_active,
        "non_embedding_params": p.backbone - p.embedding - p.head,
        "token_params": p.token_params,
        "eta": p.token_params / p.backbone_active,
        "eta_total": p.token_params / p.backbone,
        "rho": tok.top_k / tok.n_e if tok.kind == "jtokm" else (1.0 if tok.enabled else 0.0),
        "seq_len": seq_len or cfg.max_seq_len,
        "train_flops_per_token": f.train,
        "inference_flops_per_token": f.forward,
        "params": asdict(p),
        "forward_flops": asdict(f),
    }


# ---- memory ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs, by kind. A lower bound: the allocator's slack, an optimizer
    step's temporaries, the framework itself and the data come on top."""

    params: int  # fp32 weights, tables included
    grads: int  # dense fp32 gradients; sparse table gradients hold the batch's rows only
    optimizer: int  # AdamW: 2 fp32 moments; RowAdam: 2 fp32 moments + an int64 step per row
    activations: int  # what one forward keeps for backward (0 when no batch is given)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations


def estimate_memory(
    cfg: ModelConfig, training: bool = True, batch: int = 0, seq_len: int | None = None,
    activation_bytes: int = 4, include_tables: bool = True,
) -> MemoryEstimate:  # fmt: skip
    """Bytes to hold `cfg`'s model (and, when `training`, its gradients and the trainer's
    optimizer state), plus the activations of a forward over `batch` sequences of
    `seq_len` tokens (default max_seq_len) when `batch` > 0.

    Parameters are fp32. Training: every dense parameter has an fp32 gradient and AdamW's
    two fp32 moments. Tables with ``tokmod.sparse_grad`` have a gradient of the batch's
    rows only and RowAdam's two fp32 moments plus an int64 step per row; without it they
    are dense parameters like the rest. Activations count, per token, the logits with
    their gradient (fp32) and per layer the inputs of each matmul and of attention, at
    `activation_bytes` per element (2 under bf16 autocast); training keeps every layer's,
    inference one layer's at a time. `include_tables=False` leaves out the tables and their
    optimizer state (host placement: they live elsewhere; see `table_memory`).
    """
    p = count_params(cfg)
    d, tok = cfg.d_model, cfg.tokmod
    dense, tables = p.backbone, p.token_params
    sparse = tok.enabled and tok.sparse_grad
    rows = tables // d
    tokens = batch * (seq_len or cfg.max_seq_len)
    grads = optimizer = 0
    if training:
        touched = min(rows, tokens * tok.tables_per_layer * len(cfg.tokmod_layers))
        grads = 4 * dense + (4 * touched * d + 8 * touched if sparse else 4 * tables)
        optimizer = 8 * (dense + tables) + (8 * rows if sparse else 0)
    moe = cfg.moe
    ffn = (moe.top_k + moe.num_shared_experts) * moe.expert_hidden if moe.enabled else 0
    per_layer = 4 * d + 2 * cfg.n_kv_heads * cfg.head_dim + 3 * max(ffn, cfg.ffn_hidden)
    per_layer += (2 + tok.tables_per_layer) * d if tok.enabled else 0
    layers = cfg.n_layers if training else 1
    per_token = layers * per_layer * activation_bytes + (2 if training else 1) * 4 * cfg.vocab_size
    if not include_tables:
        host = table_memory(cfg, training)
        return MemoryEstimate(params=4 * dense, grads=max(0, grads - host.grads),
                              optimizer=optimizer - host.optimizer,
                              activations=tokens * per_token)  # fmt: skip
    return MemoryEstimate(params=4 * (dense + tables), grads=grads, optimizer=optimizer,
                          activations=tokens * per_token)  # fmt: skip


def table_memory(cfg: ModelConfig, training: bool = True) -> MemoryEstimate:
    """Bytes of the tables alone: fp32 rows and, when training, RowAdam's two moments and
    per-row step (what the host store keeps in host memory; the gradients of the batch's
    rows live where the rows are mixed, `memory_plan`'s "table row grads")."""
    tables = count_params(cfg).token_params
    rows = tables // cfg.d_model
    optimizer = 8 * tables + 8 * rows if training else 0
    return MemoryEstimate(params=4 * tables, grads=0, optimizer=optimizer, activations=0)


def memory_plan(cfg: ModelConfig, training: bool = True, world_size: int = 1,
                parallel: str = "ddp", table_placement: str = "device", batch: int = 0,
                seq_len: int | None = None, activation_bytes: int = 4) -> dict[str, dict]:
    """Bytes one process needs, item by item, on its device and in host memory.

    `parallel` "fsdp" shards the backbone's parameters, gradients and optimizer state over
    `world_size` processes (a block's parameters are gathered whole for its forward and
    backward, on top: `fsdp unsharded block`); "ddp" replicates them. The tables are
    replicated on every process's device ("device"), held in host memory ("host"), or split
    into 1/W per process ("sharded").
    `batch` is the micro-batch one process runs. Lower bounds, as `estimate_memory`'s."""
    backbone = estimate_memory(cfg, training, batch, seq_len, activation_bytes,
                               include_tables=False)  # fmt: skip
    tables = table_memory(cfg, training)
    shards = world_size if parallel == "fsdp" and world_size > 1 else 1
    # `backbone.grads` also holds the tables' gradients: with sparse gradients those of the
    # batch's rows (on the compute device whatever the placement, where the rows are mixed,
    # and never sharded by FSDP), otherwise the whole tables'. One fp32 gradient per dense
    # parameter is the rest.
    device = {"backbone params": backbone.params // shards,
              "backbone grads": (backbone.params if training else 0) // shards,
              "backbone optimizer": backbone.optimizer // shards,
              "activations": backbone.activations}  # fmt: skip
    table_grads = backbone.grads - backbone.params if training else 0
    if table_grads > 0:
        device["table row grads" if cfg.tokmod.sparse_grad else "table grads"] = table_grads
    if shards > 1:
        counts = count_params(cfg)
        per_block = (counts.backbone - counts.embedding - counts.head) // max(1, cfg.n_layers)
        device["fsdp unsharded block"] = 4 * per_block * (2 if training else 1)
    host: dict[str, int] = {}
    if tables.params:
        where = host if table_placement == "host" else device
        share = world_size if table_placement == "sharded" else 1  # 1/W of the rows each
        where["table rows"] = tables.params // share
        if training:
            where["table optimizer"] = tables.optimizer // share
    return {"device": device, "host": host,
            "device_total": sum(device.values()), "host_total": sum(host.values())}
