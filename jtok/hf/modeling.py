"""`JTokForCausalLM`: jtok's `JTokModel` behind transformers' `PreTrainedModel` and
`GenerationMixin`.

The model is wrapped, not re-implemented: ``self.model`` is a `jtok.nn.model.JTokModel`
and every forward is its forward. What this module adds is the translation between the
two interfaces.

The KV cache. transformers hands the forward a `Cache` (by default a `DynamicCache`),
jtok's attention reads and writes a `jtok.nn.model.KVCache`. Each forward builds a
KVCache for this call only: per layer the keys and values the transformers cache holds
(``cache.layers[i].keys``, its first ``get_seq_length()`` slots, or up to the
``cache_position`` older releases pass) followed by empty slots for the new tokens.
jtok's attention writes the new keys into those slots and attends over all of them;
then the new slots go back through the public ``cache.update(keys, values, layer)``.
So decoding computes only the new tokens (a real incremental path), the transformers
cache stays the one source of truth (generate's `reorder_cache` for beam search,
`crop`, `batch_select_indices` act on it and jtok sees the result), and jtok's model
code is used unchanged. The price is one copy of the past keys per step into the
step's buffer, on top of DynamicCache's own concatenation: the same order of memory
traffic DynamicCache has anyway. (Keeping a preallocated jtok KVCache inside a custom
`Cache` subclass would save the copy, but would not work with the caches transformers
creates or a caller passes in.)

Padding and positions. A 2-D ``attention_mask`` (batch, past + new) with zeros (left
padding, as generate passes for batched prompts) or explicit ``position_ids`` give
each row its own RoPE positions (from ``position_ids``, else the running count of its
unmasked tokens, as transformers counts them) and hide its masked slots from attention,
through jtok's padded-cache path (`KVCache.pad`). Without padding the forward is jtok's
unpadded path, bit for bit.

Loading. `from_pretrained` builds the model with `jtok.nn.model.build_model` at the
config's (or the caller's) ``table_placement`` and loads ``model.safetensors`` with
`jtok.run.checkpoint.load_model_weights`: host tables are filled straight in host
memory and never pass through the accelerator. The weight file uses jtok's checkpoint
names (``embed.weight``, ``blocks.0.attn.wqkv.weight``, ``token_tables.weight``, ...), so
it is the same file format as a jtok checkpoint's model.safetensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import cached_file

from jtok.config import ModelConfig
from jtok.hf.configuration import JTokConfig
from jtok.io import save_tensors
from jtok.nn.model import JTokModel, KVCache, build_model
from jtok.run.checkpoint import MODEL_FILE, load_model_weights, model_tensors
from jtok.tables.store import PLACEMENTS

# The output field that holds the cache: "cache" in recent transformers 5 releases,
# "past_key_values" before.
_CACHE_FIELD = ("cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__
                else "past_key_values")  # fmt: skip
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision",
               "subfolder", "token")  # fmt: skip
# from_pretrained arguments that do not apply to a jtok model (the Auto classes pass some).
_IGNORED_KWARGS = ("_from_auto", "trust_remote_code", "adapter_kwargs", "code_revision",
                   "_commit_hash", "use_safetensors", "weights_only", "low_cpu_mem_usage",
                   "attn_implementation", "ignore_mismatched_sizes", "disable_mmap",
                   "fusion_config", "_fast_init")  # fmt: skip
# Arguments callers such as lm-eval's hf model always pass, usually unset: ignored when
# unset (None or empty), refused when they ask for something a jtok model cannot do.
_UNSUPPORTED_KWARGS = ("gguf_file", "max_memory", "quantization_config", "offload_folder",
                       "tp_plan", "device_mesh")  # fmt: skip


class _PaddedStepCache(KVCache):
    """A KVCache whose rows follow transformers' 2-D attention mask and position ids.

    jtok's padded path asks the cache for the rows' positions (`positions`), which slots
    each query reads (`attention_mask`) and the longest row (`longest`); here they come
    from the caller's mask and positions instead of a left-padding count."""

    step_positions: Tensor  # (B, T) RoPE positions of the new tokens
    step_longest: int  # the largest position + 1

    def positions(self, T: int) -> Tensor:
        return self.step_positions

    def attention_mask(self, T: int) -> Tensor:
        # A query reads the unmasked slots up to its own, and always its own slot, so a
        # masked query's row stays finite (what it computes is never read).
        S = self.pos + T
        key = torch.arange(S, device=self.valid.device)
        query = torch.arange(self.pos, S, device=self.valid.device)[:, None]
        return ((self.valid[:, None, :S] | (key == query)) & (key <= query))[:, None]

    def longest(self, T: int) -> int:
        return self.step_longest


class JTokForCausalLM(PreTrainedModel, GenerationMixin):
    """A jtok model as a transformers causal LM: ``self.model`` is the `JTokModel`."""

    config_class = JTokConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _supports_sdpa = True  # jtok's attention is torch's scaled_dot_product_attention

    def __init__(self, config: JTokConfig, model: JTokModel | None = None):
        super().__init__(config)
        cfg = config.model_config
        if model is None:  # a fresh model, initialised as jtok initialises it (seed 0)
            model = build_model(cfg, seed=0, table_placement=config.table_placement)
        elif model.cfg.to_dict() != cfg.to_dict():
            raise ValueError("the jtok model's config differs from config.jtok_model")
        self.model = model
        self.post_init()

    @classmethod
    def from_jtok(cls, model: JTokModel, **config_kwargs: Any) -> JTokForCausalLM:
        """Wrap a built (e.g. trained) JTokModel; `config_kwargs` go to JTokConfig
        (eos_token_id, pad_token_id, ...). The table placement is the model's."""
        placement = getattr(model.token_tables, "placement", "device")
        config = JTokConfig(jtok_model=model.cfg, table_placement=placement, **config_kwargs)
        return cls(config, model=model)

    # ---- what transformers asks of a model ------------------------------------------------

    def _init_weights(self, module: torch.nn.Module) -> None:
        # build_model initialises every tensor (or from_pretrained loads it): transformers'
        # generic initialisation must not overwrite jtok's.
        return None

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoModel") -> None:
        return None  # see JTokConfig.register_for_auto_class

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.head

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        # generate() turns the 2-D mask into a 4-D one for compilable caches (StaticCache);
        # jtok's forward takes the 2-D mask whatever the cache.
        return attention_mask

    # ---- forward ------------------------------------------------------------------------

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache=None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | Tensor = 0,
                return_dict: bool | None = None, **kwargs: Any):  # fmt: skip
        """Logits of `input_ids` (B, T) continuing `cache` (a transformers Cache)."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)  # the name before "cache"
        # Older transformers 5 releases pass each token's slot in the cache; newer ones
        # leave it to the cache's length (a static cache of those releases cannot tell).
        cache_position = kwargs.pop("cache_position", None)
        for name in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(name, None):
                raise ValueError(f"{name}: jtok's transformers model returns logits only")
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("jtok's tables are indexed by token id: pass input_ids "
                             "(inputs_embeds are not supported)")  # fmt: skip
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache()
        if not use_cache:
            cache = None

        past = 0
        if cache is not None:
            past = (int(cache_position[0]) if cache_position is not None
                    else int(cache.get_seq_length()))  # fmt: skip
        step = self._step_cache(input_ids, attention_mask, position_ids, cache, past)
        longest = step.longest(input_ids.shape[1]) if step is not None else input_ids.shape[1]
        if longest > self.model.cfg.max_seq_len:
            raise ValueError(f"the sequence reaches {longest} tokens, beyond the model's "
                             f"context of {self.model.cfg.max_seq_len} (max_seq_len): ask "
                             "generate for fewer new tokens")  # fmt: skip
        out = self.model(input_ids, cache=step)
        if cache is not None:
            slots = {"cache_position": torch.arange(past, step.pos, device=input_ids.device)}
            for layer in range(self.model.cfg.n_layers):
                cache.update(step.keys[layer][:, :, past:], step.values[layer][:, :, past:],
                             layer, cache_kwargs=slots)  # fmt: skip

        logits = out.logits
        if isinstance(logits_to_keep, int):
            if logits_to_keep > 0:
                logits = logits[:, -logits_to_keep:]
        else:
            logits = logits[:, logits_to_keep]
        loss = None
        if labels is not None:
            extra = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index",
                                            "shift_labels") if k in kwargs}  # fmt: skip
            loss = self.loss_function(logits=out.logits, labels=labels,
                                      vocab_size=self.model.cfg.vocab_size, **extra)  # fmt: skip
            if self.training:  # the balance losses jtok's trainer adds
                loss = loss + out.aux_loss
        result = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return result if return_dict else result.to_tuple()

    def _step_cache(self, ids_BT: Tensor, attention_mask: Tensor | None,
                    position_ids: Tensor | None, cache, past: int) -> KVCache | None:  # fmt: skip
        """jtok's KVCache for this forward (see the module docstring) after `past` cached
        tokens, or None for a plain forward (no cache, no padding, default positions)."""
        B, T = ids_BT.shape
        device = ids_BT.device
        standard = True
        valid_BS = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (B, past + T):
                raise ValueError("attention_mask must be 2-D (batch, past + new tokens) = "
                                 f"({B}, {past + T}), got "
                                 f"{tuple(attention_mask.shape)}")  # fmt: skip
            valid_BS = attention_mask.to(device=device, dtype=torch.bool)
            standard = bool(valid_BS.all())
        default_positions = torch.arange(past, past + T, device=device)
        if position_ids is not None:
            positions_BT = position_ids.to(device=device, dtype=torch.long).expand(B, T)
            standard = standard and bool((positions_BT == default_positions).all())
        elif not standard:  # transformers' rule: count each row's unmasked tokens
            positions_BT = (valid_BS.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
        if standard and cache is None:
            return None

        cfg = self.model.cfg
        dtype = self.model.embed.weight.dtype
        keys, values = [], []
        for layer in range(cfg.n_layers):
            shape = (B, cfg.n_kv_heads, past + T, cfg.head_dim)
            k, v = (torch.empty(shape, device=device, dtype=dtype) for _ in range(2))
            if past:
                held = cache.layers[layer]
                if held.keys.shape[0] != B:
                    raise ValueError(f"the cache holds {held.keys.shape[0]} rows, the input {B}")
                k[:, :, :past] = held.keys[:, :, :past]
                v[:, :, :past] = held.values[:, :, :past]
            keys.append(k)
            values.append(v)
        if standard:
            return KVCache(keys=keys, values=values, pos=past)
        if valid_BS is None:
            valid_BS = torch.ones(B, past + T, dtype=torch.bool, device=device)
        pad_B = (~valid_BS).long().cumprod(-1).sum(-1)  # leading masked slots
        step = _PaddedStepCache(keys=keys, values=values, pos=past, pad=pad_B, valid=valid_BS,
                                min_pad=int(pad_B.min()))  # fmt: skip
        step.step_positions = positions_BT
        step.step_longest = int(positions_BT.max()) + 1
        return step

    # ---- saving and loading -------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True,
                        state_dict: dict | None = None, push_to_hub: bool = False,
                        **kwargs: Any) -> None:  # fmt: skip
        """config.json (+ modeling_jtok.py), generation_config.json and model.safetensors
        (jtok's tensor names, each tensor once). Options about sharding and serialization
        formats do not apply and are ignored."""
        if state_dict is not None:
            raise ValueError("save_pretrained(state_dict=...) is not supported for jtok models")
        if push_to_hub:
            raise ValueError("save_pretrained(push_to_hub=True) is not supported: save, then "
                             "call model.push_to_hub(repo_id)")  # fmt: skip
        if not is_main_process:
            return
        directory = Path(save_directory)
        if directory.is_file():
            raise ValueError(f"{directory} is a file, not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        self.config.architectures = [type(self).__name__]
        self.config.dtype = self.model.embed.weight.dtype
        self.config.save_pretrained(directory)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(directory)
        metadata = {"format": "pt", "jtok_config": json.dumps(self.model.cfg.to_dict())}
        save_tensors(model_tensors(self.model), directory / MODEL_FILE, metadata=metadata)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any,
                        config: JTokConfig | str | os.PathLike | None = None,
                        table_placement: str | None = None, device_map: Any = None,
                        dtype: Any = None, torch_dtype: Any = None,
                        **kwargs: Any) -> JTokForCausalLM:  # fmt: skip
        """Load a directory (or Hub repository) that `save_pretrained` / `jtok export`
        wrote. ``table_placement`` ("device" or "host") overrides the config's;
        ``device_map`` is one device ("cpu", "cuda", "cuda:1", {"": device} or "auto":
        the GPU if there is one); ``dtype`` casts the weights after loading (device
        tables only). Other keyword arguments that name config attributes set them."""
        if model_args:
            raise TypeError("JTokForCausalLM.from_pretrained takes no positional model "
                            "arguments")  # fmt: skip
        hub = {name: kwargs.pop(name) for name in _HUB_KWARGS if name in kwargs}
        output_loading_info = kwargs.pop("output_loading_info", False)
        for name in _IGNORED_KWARGS:
            kwargs.pop(name, None)
        for name in _UNSUPPORTED_KWARGS:
            if kwargs.pop(name, None):
                raise TypeError(f"{name} is not supported for a jtok model")
        if not isinstance(config, JTokConfig):
            config, kwargs = JTokConfig.from_pretrained(
                pretrained_model_name_or_path if config is None else config,
                return_unused_kwargs=True, **hub, **kwargs)  # fmt: skip
        else:
            for name in [k for k in kwargs if hasattr(config, k)]:
                setattr(config, name, kwargs.pop(name))
        if kwargs:
            raise TypeError(f"unexpected keyword arguments for a jtok model: {sorted(kwargs)}")
        if table_placement is not None:
            config.table_placement = table_placement
        if config.table_placement not in PLACEMENTS:
            raise ValueError(f"table_placement must be one of {list(PLACEMENTS)}, got "
                             f"{config.table_placement!r}")  # fmt: skip
        device = _one_device(device_map)
        dtype = _dtype(torch_dtype if dtype is None else dtype)
        if dtype not in (None, torch.float32) and config.table_placement == "host":
            raise ValueError("host tables are float32: load with dtype=torch.float32 or "
                             "table_placement='device'")  # fmt: skip

        weights = cached_file(pretrained_model_name_or_path, MODEL_FILE, **hub)
        model_cfg: ModelConfig = config.model_config
        jtok_model = build_model(model_cfg, device=device, table_placement=config.table_placement)
        load_model_weights(Path(weights).parent, jtok_model)  # host tables: loaded in place
        model = cls(config, model=jtok_model)
        try:
            model.generation_config = GenerationConfig.from_pretrained(
                pretrained_model_name_or_path, **hub)  # fmt: skip
        except OSError:  # no generation_config.json: keep the one made from the config
            pass
        if dtype not in (None, torch.float32):
            model.to(dtype)
        model.eval()
        if output_loading_info:  # load_model_weights accepts an exact fit only
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [],
                           "error_msgs": []}  # fmt: skip
        return model


def _one_device(device_map: Any) -> torch.device:
    """The single device a jtok model loads onto."""
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError("device_map: a jtok model loads onto one device, got "
                             f"{sorted(map(str, devices))}")  # fmt: skip
        device_map = devices.pop()
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def _dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"dtype: unknown dtype {dtype!r}")
        return value
    return dtype
