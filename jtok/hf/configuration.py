"""`JTokConfig`: a jtok `ModelConfig` and the table placement, as a transformers config.

The jtok config is the one source of truth: config.json holds it whole under
``jtok_model`` (the dict of `jtok.config.ModelConfig.to_dict`). The attributes with the
names transformers' tools look for (``hidden_size``, ``num_hidden_layers``,
``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``vocab_size``,
``max_position_embeddings``, ``rms_norm_eps``, ``tie_word_embeddings``) are derived from
it on every construction, so an edited copy of one of them in a config.json cannot
disagree with the model.

``table_placement`` ("device" or "host") is where the token-indexed tables live once
loaded (jtok.tables.store); it is a run-time choice, not part of the checkpoint:
``from_pretrained(DIR, table_placement="host")`` overrides the saved value.

Saved configs carry ``auto_map`` pointing at ``modeling_jtok.py``, a two-line file
written beside config.json that imports these classes from the installed jtok, so
``trust_remote_code=True`` loads a directory without ``import jtok.hf`` first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from jtok.config import ModelConfig
from jtok.tables.store import PLACEMENTS

MODEL_TYPE = "jtok"
REMOTE_CODE_FILE = "modeling_jtok.py"
REMOTE_CODE = '''"""jtok's transformers classes, for `trust_remote_code=True`.

They live in the jtok package (https://pypi.org/project/jtok/): pip install 'jtok[transformers]'.
"""

from jtok.hf import JTokConfig, JTokForCausalLM

__all__ = ["JTokConfig", "JTokForCausalLM"]
'''
AUTO_MAP = {"AutoConfig": "modeling_jtok.JTokConfig",
            "AutoModelForCausalLM": "modeling_jtok.JTokForCausalLM"}  # fmt: skip

# transformers' names for the backbone's shape, derived from the jtok config.
DERIVED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings",
           "rms_norm_eps", "tie_word_embeddings")  # fmt: skip


def write_remote_code(save_directory: str | os.PathLike) -> None:
    """Write the `trust_remote_code` entry point beside a saved config."""
    Path(save_directory, REMOTE_CODE_FILE).write_text(REMOTE_CODE, encoding="utf-8")


class JTokConfig(PretrainedConfig):
    """A jtok model (``jtok_model``: a ModelConfig dict) and where its tables live."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(self, jtok_model: dict[str, Any] | ModelConfig | None = None,
                 table_placement: str = "device", use_cache: bool = True,
                 **kwargs: Any) -> None:  # fmt: skip
        for name in DERIVED:  # recomputed below from jtok_model, never read from a file
            kwargs.pop(name, None)
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(**kwargs)
        if isinstance(jtok_model, ModelConfig):
            cfg = jtok_model
        else:
            cfg = ModelConfig.from_dict(dict(jtok_model or {}))  # validated: a ConfigError
        if table_placement not in PLACEMENTS:
            raise ValueError(f"table_placement must be one of {list(PLACEMENTS)}, got "
                             f"{table_placement!r}")  # fmt: skip
        self.jtok_model = cfg.to_dict()
        self.table_placement = table_placement
        self.use_cache = use_cache
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.d_model
        self.num_hidden_layers = cfg.n_layers
        self.num_attention_heads = cfg.n_heads
        self.num_key_value_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.intermediate_size = cfg.ffn_hidden
        self.max_position_embeddings = cfg.max_seq_len
        self.rms_norm_eps = cfg.norm_eps
        self.tie_word_embeddings = cfg.tie_embeddings

    @property
    def model_config(self) -> ModelConfig:
        """The jtok ModelConfig (a fresh, validated copy)."""
        return ModelConfig.from_dict(self.jtok_model)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any):
        """config.json, and modeling_jtok.py for ``trust_remote_code`` loading."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory)
        return result

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoConfig") -> None:
        # transformers calls this after loading the class as remote code, and a registered
        # class copies its own source files into every directory it saves to. The saved
        # auto_map already points at modeling_jtok.py: nothing to register.
        return None
