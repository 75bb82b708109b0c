"""jtok: token-indexed parameter scaling (JTok, JTok-M) for PyTorch language models.

The public names below are imported on first use, so that the command line (and
`jtok --help`) starts without loading torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ConfigError": "jtok.config", "ModelConfig": "jtok.config", "MoEConfig": "jtok.config",
    "RunConfig": "jtok.config", "TokModConfig": "jtok.config", "TrainConfig": "jtok.config",
    "preset": "jtok.presets", "count_flops": "jtok.flops", "count_params": "jtok.flops",
    "summarize": "jtok.flops", "JTokModel": "jtok.nn.model", "KVCache": "jtok.nn.model",
    "ModelOutput": "jtok.nn.model", "build_model": "jtok.nn.model",
    "train": "jtok.training.loop", "Optimizers": "jtok.training.optim",
    "generate": "jtok.inference.generate", "RowAdam": "jtok.tables.row_adam",
    "JTokError": "jtok.errors", "retrofit": "jtok.hf.retrofit",
    "save_retrofit": "jtok.hf.retrofit_io", "load_retrofit": "jtok.hf.retrofit_io",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jtok' has no attribute {name!r}")
