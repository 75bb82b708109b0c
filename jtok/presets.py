"""Named model shapes: tiny / tiny-moe (tests), small (benchmarks), and the paper's
dense-190m and moe-17b-a2b."""

from __future__ import annotations

import dataclasses
import typing

from jtok.config import ConfigError, ModelConfig, MoEConfig, TokModConfig


def _tiny() -> ModelConfig:
    return ModelConfig(
        vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
        ffn_hidden=192, max_seq_len=128,
    )  # fmt: skip


def _tiny_moe() -> ModelConfig:
    moe = MoEConfig(num_experts=4, num_shared_experts=1, top_k=2, expert_hidden=64)
    return dataclasses.replace(_tiny(), moe=moe)


def _small() -> ModelConfig:
    # The benchmark shape of the core issue: d=256, L=6.
    return ModelConfig(
        vocab_size=8192, d_model=256, n_layers=6, n_heads=8, n_kv_heads=4,
        ffn_hidden=768, max_seq_len=512,
    )  # fmt: skip


def _dense_190m() -> ModelConfig:
    # The paper's small dense model: L=12, d=768, V=50304; SwiGLU width 4d and an untied
    # head give 190M backbone parameters. JTok on every layer adds L*V*d = 464M.
    return ModelConfig(
        vocab_size=50304, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
        ffn_hidden=3072, max_seq_len=2048,
    )  # fmt: skip


def _moe_17b_a2b() -> ModelConfig:
    # The paper's largest run: 28 layers, d=2048, V=152064, 64 routed + 1 shared expert,
    # top-6, JTok-M with n_e=5, K=2 (28*5*152064*2048 = 43.6B token-indexed parameters).
    # Expert width 1408 (DeepSeekMoE-16B's) gives about 17B backbone parameters.
    return ModelConfig(
        vocab_size=152064, d_model=2048, n_layers=28, n_heads=16, n_kv_heads=16,
        ffn_hidden=10944, rope_base=1e6, max_seq_len=4096,
        moe=MoEConfig(
            num_experts=64, num_shared_experts=1, top_k=6, expert_hidden=1408,
            score_func="sigmoid", balance="aux_free",
        ),
        tokmod=TokModConfig(kind="jtokm", n_e=5, top_k=2),
    )  # fmt: skip


PRESETS: dict[str, typing.Callable[[], ModelConfig]] = {
    "tiny": _tiny,
    "tiny-moe": _tiny_moe,
    "small": _small,
    "dense-190m": _dense_190m,
    "moe-17b-a2b": _moe_17b_a2b,
}


def preset(name: str) -> ModelConfig:
    """A fresh copy of the named preset."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]()
