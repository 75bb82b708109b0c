"""jtok: token-indexed parameter scaling (JTok, JTok-M) for PyTorch language models."""

from jtok.config import ConfigError, ModelConfig, MoEConfig, TokModConfig, preset
from jtok.flops import count_flops, count_params, summarize
from jtok.model import JTokModel, KVCache, ModelOutput, build_model

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "JTokModel", "KVCache", "ModelConfig", "ModelOutput", "MoEConfig",
    "TokModConfig", "build_model", "count_flops", "count_params", "preset", "summarize",
]  # fmt: skip
