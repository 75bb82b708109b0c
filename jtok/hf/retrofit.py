"""Retrofit: JTok (Eq 7-9) or JTok-M (Eq 10-13) attached to an existing Hugging Face decoder.

    import jtok
    model = AutoModelForCausalLM.from_pretrained(DIR)           # Llama, Qwen2, Qwen3, Mistral
    jtok.retrofit(model, kind="jtokm", n_e=5, top_k=2)          # in place; returns the model
    jtok.hf.retrofit.freeze_backbone(model)                     # train tables, routers, s only

What is added, and where. One module, ``model.jtok_retrofit`` (`RetrofitTables`), holds a
jtok table store (`jtok.tables.store.make_store`: "device" or "host" placement, the same
stores native jtok models use) and one jtok mixer per table-carrying layer
(`jtok.tables.mixers.JTok` / `JTokM`). Three kinds of hooks connect them to the HF model;
no HF module is replaced, so every HF parameter keeps its name, and the HF model's own
``save_pretrained`` / ``from_pretrained``, tied weights and ``generate`` are untouched:

1. A forward pre-hook on the base model (``model.model``, the module that receives
   ``input_ids``): HF decoder layers never see token ids, so the ids are read here, once per
   forward, and turned into keys and rows (`CurrentTokenKey`, then ``store.rows``: one
   gather for every layer, as `jtok.nn.model.JTokModel.forward` does). A call with
   ``inputs_embeds`` and no ``input_ids`` is refused (`RetrofitInputError`): the tables are
   indexed by token id. Decode steps of ``generate`` pass the new token's ids with the KV
   cache, so each step reads the rows of exactly the tokens it computes; left-padding tokens
   read their own rows, and what they compute is masked out of every real position's
   attention, as without tables.
2. A forward pre-hook on each table-carrying decoder layer keeps its input h (JTok-M's
   router reads the layer INPUT, RMSNorm(h) R, Eq 10; the native `Block` passes the same h).
3. A forward hook on that layer's ``mlp`` replaces the FFN update m by the modulated update.

Why hook (3) is exactly Eq 9 / Eq 13 for these families. Llama, Qwen2, Qwen3 and Mistral
decoder layers are pre-norm with two plain residual adds and no norm after the FFN:
``h~ = h + attn(input_layernorm(h))``; ``h' = h~ + mlp(post_attention_layernorm(h~))``. The
residual add happens in the layer after ``mlp`` returns, so returning ``m * (1 + s u)``
gives h' = h~ + m * gate (Eq 9: the skip path untouched) and returning ``m + r`` gives
h' = h~ + m + r (Eq 13). The mixers take (h_in, h~, m, rows, inverse) and return h~ plus
the update; they are called with a zero h~, so they return the update alone. (Families
with a norm after the FFN, such as Gemma's post_feedforward_layernorm, would modulate
before that norm, which is not Eq 9 / 13: they are refused.)

Initialisation (outputs unchanged at step 0). Rows are L2-normalised (Eq 7 / Eq 12), so
they cannot start at zero; the scale s starts at 0 (`DEFAULT_SCALE_INIT`): JTok's gate is
1 + 0 * u = 1 exactly and JTok-M's r = 0 * e = 0 exactly, so logits are bit-identical to
the HF model's. The tables and routers then get no gradient until s moves: s's own
gradient is nonzero (sum of dL/dh' * m * u for JTok, dL/dh' * u / sqrt(2 N_l) for JTok-M),
so Adam moves s by about its lr at the first step and the tables start learning at the
second (benchmarks/retrofit_warmstart.py measures it: a small nonzero s buys nothing).

Options are a JSON-able dict (`retrofit_options`); ``retrofit(model, **options)`` rebuilds
the same layout, which is how `jtok.hf.retrofit_io.load_retrofit` restores a saved model.
This module imports jtok.nn / jtok.tables / jtok.config only, never training or run code.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch
from torch import Tensor, nn

from jtok.config import ModelConfig, TokModConfig
from jtok.errors import JTokError
from jtok.tables.mixers import JTok, JTokM
from jtok.tables.store import PLACEMENTS, TokenRows, make_store

ATTRIBUTE = "jtok_retrofit"  # the added module's name on the HF model (its state_dict prefix)
# Families whose decoder layer is h' = h~ + mlp(norm(h~)) with h~ = h + attn(norm(h)).
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
# s = 0: outputs unchanged at step 0 (see the module docstring and the README's measurement).
DEFAULT_SCALE_INIT = 0.0
KINDS = ("jtok", "jtokm")
RETROFIT_PLACEMENTS = ("device", "host")  # "sharded" needs jtok's distributed trainer


class RetrofitError(JTokError):
    """A model cannot be retrofitted (or a retrofitted one used) as asked."""


class RetrofitInputError(RetrofitError):
    """A retrofitted model was called without token ids (``inputs_embeds`` alone)."""


def table_model_config(hf_config, tokmod: TokModConfig) -> ModelConfig:
    """A jtok `ModelConfig` that describes what the stores and mixers read of the HF model.

    Stores read vocab_size, d_model and the tokmod section; mixers read d_model, n_layers
    (N_l of Eq 13's 1/sqrt(2 N_l): all layers, as natively) and norm_eps (the router's
    RMSNorm, Eq 10, at the HF model's rms_norm_eps). The other fields are placeholders
    that only satisfy ModelConfig's checks (one head of width d); nothing reads them.
    """
    return ModelConfig(vocab_size=int(hf_config.vocab_size), d_model=int(hf_config.hidden_size),
                       n_layers=int(hf_config.num_hidden_layers), n_heads=1, n_kv_heads=1,
                       norm_eps=float(getattr(hf_config, "rms_norm_eps", 1e-6)),
                       tokmod=tokmod)  # fmt: skip


class RetrofitTables(nn.Module):
    """The tables (a jtok store), one mixer per table-carrying layer, and the hooks' state.

    Parameters (and their optimizer roles, `jtok.training.optim.parameter_roles`):
    ``tables.weight`` ("table"; a host store's via `store_parameters`), ``mixers.<i>.scale``
    ("scale", through `param_role_overrides`: its own lr, ``train.scale_lr_mult``) and,
    for JTok-M, ``mixers.<i>.router`` ("router")."""

    def __init__(self, cfg: ModelConfig, options: dict[str, Any]):
        super().__init__()
        self.cfg = cfg
        self.options = dict(options)
        self.layers = cfg.tokmod_layers  # HF decoder-layer indices that carry tables
        mixer = JTok if cfg.tokmod.kind == "jtok" else JTokM
        with torch.device("cpu"):  # built and initialised on the host, then moved as a whole
            self.tables = make_store(cfg, options["table_placement"])
            self.mixers = nn.ModuleList(mixer(cfg) for _ in self.layers)
        if hasattr(self.tables, "materialize"):  # the host store is built on meta
            self.tables.materialize()
        self._rows: TokenRows | None = None  # this forward's rows, every layer (hook 1)
        # slot -> (the layer's input h, whether a gradient-checkpointing recompute of the
        # layer will need it again) (hook 2)
        self._layer_inputs: dict[int, tuple[Tensor, bool]] = {}
        self._balance: list[Tensor] = []  # JTok-M balance losses of this forward
        # Rows gathered ahead for the next forward (a trainer's host-store prefetch), used
        # by that forward in place of a lookup of its ids: `use_rows`.
        self._given_rows: TokenRows | None = None

    def param_role_overrides(self) -> dict[str, str]:
        """Optimizer roles that differ from the mixer classes' own: the scales s start at 0
        and need a larger step than a norm gain ("scale": ``train.scale_lr_mult``)."""
        return {f"mixers.{slot}.scale": "scale" for slot in range(len(self.mixers))}

    def use_rows(self, rows: TokenRows | None) -> None:
        """The rows of the next forward's ids, gathered ahead (None: look them up)."""
        self._given_rows = rows

    @torch.no_grad()
    def initialize(self, seed: int) -> None:
        """Tables N(0, table_init_std^2), routers N(0, router_init_std^2), s = scale_init.

        Drawn on the host from `seed` (the global RNG is untouched), so a device and a host
        store of the same seed hold the same values."""
        tok = self.cfg.tokmod
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.tables.weight.normal_(0.0, tok.table_init_std, generator=gen)  # still on the host
        for mixer in self.mixers:
            mixer.scale.fill_(tok.initial_scale(self.cfg.d_model))
            if isinstance(mixer, JTokM):
                mixer.router.normal_(0.0, tok.router_init_std, generator=gen)

    # ---- the hooks ------------------------------------------------------------------------

    def capture_ids(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook of the base model: the token ids -> every layer's rows, once a forward."""
        ids = kwargs.get("input_ids") if "input_ids" in kwargs else (args[0] if args else None)
        if ids is None:
            raise RetrofitInputError(
                "a model retrofitted with jtok tables needs input_ids: its tables are indexed "
                "by token id, so a call with inputs_embeds alone cannot be served")  # fmt: skip
        self._layer_inputs.clear()
        self._balance = []
        given, self._given_rows = self._given_rows, None
        self._rows = given if given is not None else self.tables.lookup(ids)

    def capture_layer_input(self, slot: int, module: nn.Module, args: tuple, kwargs: dict):
        """Pre-hook of a decoder layer: its input h, for JTok-M's router (Eq 10).

        transformers checkpoints a layer's `forward`, not its `__call__`: under gradient
        checkpointing this hook runs once and the mlp hook twice (forward, then the
        recompute in backward), so h is then kept until the next forward."""
        recomputed = (module.training and torch.is_grad_enabled()
                      and getattr(module, "gradient_checkpointing", False))  # fmt: skip
        self._layer_inputs[slot] = (args[0] if args else kwargs["hidden_states"], recomputed)

    def modulate_ffn_update(self, slot: int, module: nn.Module, args: tuple, m: Tensor):
        """Forward hook of a layer's mlp: m -> m * (1 + s u) (Eq 9) or m + r (Eq 13)."""
        h_in, recomputed = self._layer_inputs.get(slot, (None, False))
        if h_in is None or self._rows is None:
            raise RetrofitError("a retrofitted mlp ran outside its decoder layer's forward "
                                "(its input and token rows were not captured)")  # fmt: skip
        if not recomputed:  # not held past its use: no activation outlives its forward
            del self._layer_inputs[slot]
        # A zero h~ makes the mixer return the update alone (the layer adds h~ itself). Of m's
        # dtype: the mixers cast their fp32 result back to h~'s dtype.
        update, balance = self.mixers[slot](h_in, m.new_zeros(()), m, self._rows.layers[slot],
                                            self._rows.inverse_N)  # fmt: skip
        if balance is not None:
            self._balance.append(balance)
        return update

    def balance_loss(self) -> Tensor | None:
        """aux_weight * sum over layers of the last forward's JTok-M balance losses (as
        `JTokModel` weighs them); None when there are none (JTok, or no grad)."""
        if not self._balance:
            return None
        return self.cfg.tokmod.aux_weight * torch.stack(self._balance).sum()

    def balance_mean(self) -> Tensor | None:
        """The unweighted mean over layers of the last forward's balance losses (the
        ``tokmod_balance`` metric of a native model); None when there are none."""
        return torch.stack(self._balance).mean().detach() if self._balance else None


def _decoder_layers(hf_model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(the base model that receives input_ids, its decoder layers) of a supported model."""
    config = getattr(hf_model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise RetrofitError(f"retrofit supports the model types {list(SUPPORTED_MODEL_TYPES)}, "
                            f"not {model_type!r}")  # fmt: skip
    base = getattr(hf_model, "base_model", hf_model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) != config.num_hidden_layers:
        raise RetrofitError(f"{type(hf_model).__name__} has no list of "
                            f"{config.num_hidden_layers} decoder layers at .layers")  # fmt: skip
    for layer in layers:
        if not hasattr(layer, "mlp") or hasattr(layer, "post_feedforward_layernorm"):
            raise RetrofitError(f"{type(layer).__name__} is not a pre-norm layer whose FFN "
                                "update is added straight to the residual stream")  # fmt: skip
    return base, layers


def retrofit(hf_model: nn.Module, kind: str = "jtokm", *, n_e: int = 5, top_k: int = 2,
             layers: list[int] | None = None, table_placement: str = "device",
             scale_init: float = DEFAULT_SCALE_INIT, table_init_std: float = 1.0,
             router_init_std: float = 0.02, aux_weight: float = 1e-4, eps: float = 1e-6,
             dedup: bool = True, sparse_grad: bool = True, seed: int = 0,
             initialize: bool = True) -> nn.Module:  # fmt: skip
    """Attach JTok or JTok-M tables to `hf_model` (in place) and return it.

    kind: "jtok" (one table per layer, Eq 7-9) or "jtokm" (n_e tables, top_k routed, Eq
    10-13). layers: decoder-layer indices that carry tables (None: all). table_placement:
    "device" (the tables are a Parameter that moves with the model) or "host" (host memory;
    only a batch's rows reach the accelerator). scale_init: s at step 0 (0 keeps the
    outputs unchanged). The remaining options are `TokModConfig`'s, with its defaults.
    `initialize=False` leaves the new tensors unset, for a caller that loads them next.
    """
    if getattr(hf_model, ATTRIBUTE, None) is not None:
        raise RetrofitError("this model is already retrofitted with jtok tables")
    if kind not in KINDS:
        raise RetrofitError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if table_placement not in RETROFIT_PLACEMENTS:
        extra = " (sharded tables need jtok's own trainer)" if table_placement in PLACEMENTS else ""
        raise RetrofitError(f"table_placement must be one of {list(RETROFIT_PLACEMENTS)}, got "
                            f"{table_placement!r}{extra}")  # fmt: skip
    if not math.isfinite(scale_init):
        raise RetrofitError(f"scale_init must be a finite number, got {scale_init!r}")
    base, decoder_layers = _decoder_layers(hf_model)
    tokmod = TokModConfig(kind=kind, layers=None if layers is None else [int(x) for x in layers],
                          n_e=n_e, top_k=top_k, aux_weight=aux_weight, eps=eps,
                          table_init_std=table_init_std, scale_init=float(scale_init),
                          router_init_std=router_init_std, dedup=dedup,
                          sparse_grad=sparse_grad)  # fmt: skip
    cfg = table_model_config(hf_model.config, tokmod)  # checks every value (ConfigError)
    options = {"kind": kind, **{f.name: getattr(tokmod, f.name) for f in _OPTION_FIELDS},
               "table_placement": table_placement, "seed": int(seed)}  # fmt: skip
    tables = RetrofitTables(cfg, options)
    if initialize:
        tables.initialize(seed)
    param = next(hf_model.parameters(), None)
    if param is not None and param.device.type != "meta":
        tables.to(param.device)  # a host store's matrix stays in host memory (unregistered)
    hf_model.add_module(ATTRIBUTE, tables)
    # Bound methods (and partials of them) as hooks: copy.deepcopy of the model maps them to
    # the copy's RetrofitTables, so a copied model never reads its original's rows.
    base.register_forward_pre_hook(tables.capture_ids, with_kwargs=True)
    for slot, index in enumerate(tables.layers):
        layer = decoder_layers[index]
        layer.register_forward_pre_hook(functools.partial(tables.capture_layer_input, slot),
                                        with_kwargs=True)  # fmt: skip
        layer.mlp.register_forward_hook(functools.partial(tables.modulate_ffn_update, slot))
    return hf_model


# TokModConfig fields a retrofit records as options (kind is recorded first, by hand).
_OPTION_FIELDS = tuple(f for f in dataclasses.fields(TokModConfig)
                       if f.name in ("layers", "n_e", "top_k", "scale_init", "table_init_std",
                                     "router_init_std", "aux_weight", "eps", "dedup",
                                     "sparse_grad"))  # fmt: skip
OPTION_NAMES = ("kind", *(f.name for f in _OPTION_FIELDS), "table_placement", "seed")


def retrofit_tables(hf_model: nn.Module) -> RetrofitTables:
    """The `RetrofitTables` of a retrofitted model."""
    tables = getattr(hf_model, ATTRIBUTE, None)
    if not isinstance(tables, RetrofitTables):
        raise RetrofitError("this model is not retrofitted with jtok tables (jtok.retrofit)")
    return tables


def is_retrofitted(hf_model: nn.Module) -> bool:
    return isinstance(getattr(hf_model, ATTRIBUTE, None), RetrofitTables)


def retrofit_options(hf_model: nn.Module) -> dict[str, Any]:
    """The options of a retrofitted model, JSON-able: ``retrofit(fresh, **options)`` rebuilds
    the same layout (and, with the same seed, the same initial values)."""
    return dict(retrofit_tables(hf_model).options)


def balance_loss(hf_model: nn.Module) -> Tensor | None:
    """The weighted JTok-M balance loss of the model's last forward, to add to the LM loss
    when training (None for JTok, or when the forward ran without grad)."""
    return retrofit_tables(hf_model).balance_loss()


def freeze_backbone(hf_model: nn.Module) -> int:
    """requires_grad=False on every HF parameter; the retrofit's tables, routers and scales
    stay trainable. Returns the number of parameters frozen."""
    own = {id(p) for p in retrofit_tables(hf_model).parameters()}
    frozen = 0
    for param in hf_model.parameters():
        if id(param) not in own and param.requires_grad:
            param.requires_grad_(False)
            frozen += 1
    return frozen
