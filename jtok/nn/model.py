"""The decoder-only backbone, dense or MoE, with JTok / JTok-M on any subset of layers.

A pre-norm Transformer (METHOD.md, "Backbone"):
    a  = Attn(RMSNorm(h))      h~ = h + a
    m  = FFN(RMSNorm(h~))      h' = h~ + m          (baseline)
JTok changes the last line to h' = h~ + m * (1 + s u); JTok-M to h' = h~ + m + r
(see jtok/tokmod.py). The model is a plain nn.Module built from one `ModelConfig`;
training, distribution and table offload wrap it from outside.

Shape suffixes where they help: B batch, T time, D width, H heads, G kv heads, Dh head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jtok.config import ModelConfig
from jtok.nn.ffn import MoE, SwiGLU
from jtok.tables.mixers import JTok, JTokM
from jtok.tables.store import TokenRows, make_store


class RMSNorm(nn.Module):
    # Optimizer roles of this module's parameters (jtok.training.optim.parameter_roles).
    PARAM_ROLES = {"weight": "norm"}

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Statistics in fp32 even under autocast; cast back to the input dtype.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def rope_tables(cfg: ModelConfig, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin of shape (max_seq_len, head_dim / 2) for rotary position embeddings."""
    half = cfg.head_dim // 2
    inv_freq = cfg.rope_base ** (-torch.arange(half, device=device, dtype=torch.float64) / half)
    angles = torch.arange(cfg.max_seq_len, device=device, dtype=torch.float64)[:, None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BHTDh: Tensor, cos_TDh2: Tensor, sin_TDh2: Tensor) -> Tensor:
    """Rotate the two halves of each head's features (the GPT-NeoX / Llama layout)."""
    x1, x2 = x_BHTDh.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos_TDh2 - x2 * sin_TDh2, x2 * cos_TDh2 + x1 * sin_TDh2), dim=-1)
    return rotated.type_as(x_BHTDh)


@dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated.

    Prompts of different lengths share one cache by left padding: row b's first `pad[b]`
    slots hold no token. Attention never reads those slots (`valid`), and RoPE positions
    count from each row's first real token, so a padded row computes what it would alone.
    """

    keys: list[Tensor]  # per layer (B, G, max_len, Dh)
    values: list[Tensor]
    pos: int = 0  # slots already filled (the same for every row)
    pad: Tensor | None = None  # int64 (B,): left-padding slots per row; None: no padding
    valid: Tensor | None = None  # bool (B, max_len): slot holds a real token (with `pad`)
    min_pad: int = 0  # min(pad), kept on the host: the length check needs no device sync

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int | None = None,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
              pad: Sequence[int] | Tensor | None = None) -> KVCache:  # fmt: skip
        """A cache for `batch` rows; `pad` (one count per row) for left-padded prompts."""
        shape = (batch, cfg.n_kv_heads, max_len or cfg.max_seq_len, cfg.head_dim)

        def per_layer() -> list[Tensor]:
            return [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]

        cache = cls(keys=per_layer(), values=per_layer())
        if pad is not None:
            pad_B = torch.as_tensor(pad, dtype=torch.long, device=device).reshape(-1)
            if pad_B.numel() != batch or bool((pad_B < 0).any()):
                raise ValueError(f"pad needs {batch} counts >= 0, got {pad_B.tolist()}")
            if bool(pad_B.any()):  # all zeros: the unpadded path, unchanged
                cache.pad, cache.min_pad = pad_B, int(pad_B.min())
                cache.valid = torch.arange(shape[2], device=device)[None, :] >= pad_B[:, None]
        return cache

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def positions(self, T: int) -> Tensor:
        """RoPE positions (B, T) of the next T slots: each row counts from its first token.
        Padding slots get position 0 (what they compute is never read)."""
        slots = torch.arange(self.pos, self.pos + T, device=self.pad.device)
        return (slots[None, :] - self.pad[:, None]).clamp_min(0)

    def attention_mask(self, T: int) -> Tensor:
        """Which filled slots (B, 1, T, pos + T) each of T new queries of a padded cache reads.

        A real query reads the real slots up to its own; a padding query reads only its
        own slot, so its row stays finite (a fully masked row would be NaN, and NaN values
        of masked slots still poison the weighted sum: 0 * NaN = NaN)."""
        S = self.pos + T
        valid = self.valid[:, None, None, :S]
        if T == 1:  # one real query per row: every real slot so far
            return valid
        key = torch.arange(S, device=valid.device)
        query = torch.arange(self.pos, S, device=valid.device)[:, None]
        return (valid | (key == query)) & (key <= query)

    def select(self, rows: Tensor) -> None:
        """Keep only `rows` (int64 indices), e.g. dropping sequences that have finished."""
        for layer in range(len(self.keys)):
            self.keys[layer] = self.keys[layer].index_select(0, rows)
            self.values[layer] = self.values[layer].index_select(0, rows)
        if self.pad is not None:
            self.pad, self.valid = self.pad[rows], self.valid[rows]
            self.min_pad = int(self.pad.min()) if self.pad.numel() else 0

    def longest(self, T: int) -> int:
        """The longest row's length (tokens) once T more slots are filled."""
        return self.pos + T - self.min_pad


class Attention(nn.Module):
    """Grouped-query causal self-attention through scaled_dot_product_attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # q, k and v come from one matmul.
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim,
                              bias=False)  # fmt: skip
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor,
                cache: KVCache | None = None, layer: int = 0) -> Tensor:  # fmt: skip
        """`cos` / `sin`: (T, Dh/2), or (B, 1, T, Dh/2) for per-row positions."""
        B, T, _ = x_BTD.shape
        q, k, v = self.wqkv(x_BTD).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
             self.n_kv_heads * self.head_dim], dim=-1)  # fmt: skip
        q_BHTDh = apply_rope(q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
        k_BGTDh = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v_BGTDh = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)

        start = 0
        if cache is not None:
            start = cache.pos
            cache.keys[layer][:, :, start : start + T] = k_BGTDh
            cache.values[layer][:, :, start : start + T] = v_BGTDh
            k_BGTDh = cache.keys[layer][:, :, : start + T]
            v_BGTDh = cache.values[layer][:, :, : start + T]

        mask = None
        if cache is not None and cache.pad is not None:  # left-padded rows
            mask = cache.attention_mask(T)
        elif start > 0 and T > 1:  # a chunk after a prefix: query i sees keys <= start + i
            key_pos = torch.arange(start + T, device=x_BTD.device)
            query_pos = torch.arange(start, start + T, device=x_BTD.device)
            mask = key_pos[None, :] <= query_pos[:, None]
        # A Python branch, not is_causal=(...): under torch.compile with symbolic lengths
        # the expression is a SymBool, which SDPA's flag refuses.
        causal = False
        if mask is None and start == 0 and T > 1:
            causal = True
        out_BHTDh = F.scaled_dot_product_attention(
            q_BHTDh, k_BGTDh, v_BGTDh, attn_mask=mask, is_causal=causal,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # fmt: skip
        return self.wo(out_BHTDh.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoE(cfg.d_model, cfg.moe) if cfg.is_moe_layer(layer) else SwiGLU(
            cfg.d_model, cfg.ffn_hidden
        )
        self.tokmod: JTok | JTokM | None = None
        if layer in cfg.tokmod_layers:
            self.tokmod = JTok(cfg) if cfg.tokmod.kind == "jtok" else JTokM(cfg)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None,
                rows_UnD: Tensor | None, inverse_N: Tensor | None,
                ) -> tuple[Tensor, Tensor | None, Tensor | None]:  # fmt: skip
        """Returns (h', FFN balance loss or None, JTok-M balance loss or None)."""
        h_tilde = h + self.attn(self.attn_norm(h), cos, sin, cache, self.layer)
        if isinstance(self.ffn, MoE):
            m, ffn_aux = self.ffn(self.ffn_norm(h_tilde))
        else:
            m, ffn_aux = self.ffn(self.ffn_norm(h_tilde)), None
        if self.tokmod is None:
            return h_tilde + m, ffn_aux, None
        h_out, tok_aux = self.tokmod(h, h_tilde, m, rows_UnD, inverse_N)
        return h_out, ffn_aux, tok_aux


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, V)
    # Weighted sum of the balance losses (MoE aux_weight, tokmod aux_weight); add it to
    # the language-modelling loss when training.
    aux_loss: Tensor
    # The unweighted balance losses averaged over layers, for logging.
    aux_terms: dict[str, Tensor] = field(default_factory=dict)


class JTokModel(nn.Module):
    """Decoder-only LM; JTok / JTok-M per `cfg.tokmod`, MoE FFN per `cfg.moe`."""

    # Optimizer roles of this module's parameters (jtok.training.optim.parameter_roles).
    PARAM_ROLES = {"embed.weight": "embedding", "head.weight": "embedding"}

    def __init__(self, cfg: ModelConfig, table_placement: str = "device"):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        # Where the tables live is a run-time choice (jtok.tables.store.make_store).
        self.token_tables = make_store(cfg, table_placement) if cfg.tokmod.enabled else None
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def tie_weights(self) -> None:
        """Share the embedding with the head when configured (again after `to_empty`)."""
        if self.cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> JTokModel:
        """Initialise every tensor from `seed`; deterministic, and the global RNG is untouched.

        - embed, attention wqkv, FFN w13 (dense, shared, experts), MoE router, head:
          N(0, init_std^2)
        - attention wo, FFN w2 (dense, shared, experts): N(0, (init_std / sqrt(2 L))^2),
          so the residual stream's variance does not grow with depth (GPT-2)
        - RMSNorm weights: 1
        - token tables: N(0, tokmod.table_init_std^2); tokmod scale s:
          tokmod.initial_scale(d) (1 for JTok, sqrt(d) for JTok-M by default);
          JTok-M router: N(0, tokmod.router_init_std^2)
        - MoE selection bias: 0; RoPE tables: recomputed (they may have been built on meta)
        """
        cfg, tok = self.cfg, self.cfg.tokmod
        gen = torch.Generator(device=self.embed.weight.device).manual_seed(seed)
        std, out_std = cfg.init_std, cfg.init_std / (2 * cfg.n_layers) ** 0.5

        def normal(t: Tensor, s: float) -> None:
            t.normal_(0.0, s, generator=gen)

        normal(self.embed.weight, std)
        if not cfg.tie_embeddings:
            normal(self.head.weight, std)
        self.norm.weight.fill_(1.0)
        for block in self.blocks:
            block.attn_norm.weight.fill_(1.0)
            block.ffn_norm.weight.fill_(1.0)
            normal(block.attn.wqkv.weight, std)
            normal(block.attn.wo.weight, out_std)
            ffn = block.ffn
            swiglu = ffn if isinstance(ffn, SwiGLU) else ffn.shared
            if swiglu is not None:
                normal(swiglu.w13.weight, std)
                normal(swiglu.w2.weight, out_std)
            if isinstance(ffn, MoE):
                normal(ffn.router.weight, std)
                normal(ffn.w13, std)
                normal(ffn.w2, out_std)
                ffn.selection_bias.zero_()
                ffn.load_since_update.zero_()
            if block.tokmod is not None:
                block.tokmod.scale.fill_(tok.initial_scale(cfg.d_model))
                if isinstance(block.tokmod, JTokM):
                    normal(block.tokmod.router, tok.router_init_std)
        if self.token_tables is not None:
            table = self.token_tables.weight
            if table.device != gen.device:  # host tables beside an accelerator model
                gen = torch.Generator(device=table.device).manual_seed(seed)
            if hasattr(self.token_tables, "init_rows"):  # sharded: this process's rows only
                self.token_tables.init_rows(gen, tok.table_init_std)
            else:
                normal(table, tok.table_init_std)
        cos, sin = rope_tables(cfg, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        return self

    def forward(self, ids_BT: Tensor, cache: KVCache | None = None,
                token_rows: TokenRows | None = None) -> ModelOutput:  # fmt: skip
        """Logits for token ids (B, T).

        With `cache`, the ids continue the cached sequence and the cache advances; a
        cache with left padding (`KVCache.empty(pad=...)`) gives each row its own
        positions and hides its padding slots from attention.
        `token_rows` lets a caller supply the table rows (e.g. prefetched from host
        memory); by default they are gathered from `token_tables`.
        """
        B, T = ids_BT.shape
        start = cache.pos if cache is not None else 0
        longest = cache.longest(T) if cache is not None else T
        if longest > self.cfg.max_seq_len or (cache is not None and start + T > cache.max_len):
            raise ValueError(f"sequence length {longest} (cache slots {start + T}) exceeds "
                             "max_seq_len / cache length")  # fmt: skip
        if cache is not None and cache.pad is not None:  # left-padded: per-row positions
            positions_BT = cache.positions(T)
            cos, sin = self.rope_cos[positions_BT][:, None], self.rope_sin[positions_BT][:, None]
        else:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        if self.token_tables is not None and token_rows is None:
            token_rows = self.token_tables.lookup(ids_BT)

        h = self.embed(ids_BT)
        ffn_aux, tok_aux = [], []
        for block in self.blocks:
            rows = inverse = None
            if block.tokmod is not None:
                rows = token_rows.layers[self.token_tables.slot(block.layer)]
                inverse = token_rows.inverse_N
            h, f_aux, t_aux = block(h, cos, sin, cache, rows, inverse)
            if f_aux is not None:
                ffn_aux.append(f_aux)
            if t_aux is not None:
                tok_aux.append(t_aux)
        if cache is not None:
            cache.pos += T
        logits = self.head(self.norm(h))

        aux_loss = logits.new_zeros((), dtype=torch.float32)
        terms: dict[str, Tensor] = {}
        if ffn_aux:
            terms["moe_balance"] = torch.stack(ffn_aux).mean().detach()
            aux_loss = aux_loss + self.cfg.moe.aux_weight * torch.stack(ffn_aux).sum()
        if tok_aux:
            terms["tokmod_balance"] = torch.stack(tok_aux).mean().detach()
            aux_loss = aux_loss + self.cfg.tokmod.aux_weight * torch.stack(tok_aux).sum()
        return ModelOutput(logits=logits, aux_loss=aux_loss, aux_terms=terms)


def build_model(cfg: ModelConfig, seed: int = 0, device: torch.device | str = "cpu",
                table_placement: str = "device") -> JTokModel:  # fmt: skip
    """Construct and initialise a model. ``device="meta"`` allocates nothing (for counting).

    The modules are built on the meta device and materialised once, so construction
    neither draws from the global RNG nor initialises anything twice: `init_weights` is
    the only place values come from. With ``table_placement="host"`` the tables are
    allocated in host memory and never on `device` (jtok.tables.host).
    """
    with torch.device("meta"):
        model = JTokModel(cfg, table_placement)
    if str(device) != "meta":
        model.to_empty(device=device)
        if model.token_tables is not None and hasattr(model.token_tables, "materialize"):
            model.token_tables.materialize()
        model.tie_weights()
        model.init_weights(seed)
    return model
