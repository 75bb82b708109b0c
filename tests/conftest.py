import pytest
import torch

from jtok.config import preset
from jtok.model import build_model


@pytest.fixture(autouse=True)
def _small_cpu_threads():
    # Tiny models: more threads only add scheduling noise on a 2-core machine.
    torch.set_num_threads(1)
    yield


def tiny(name: str = "tiny", **overrides):
    """A tiny preset with dotted-key overrides given as keyword args (dots as '__')."""
    return preset(name).with_overrides({k.replace("__", "."): v for k, v in overrides.items()})


def tiny_model(name: str = "tiny", seed: int = 0, **overrides):
    return build_model(tiny(name, **overrides), seed=seed)


def random_ids(cfg, batch=2, seq=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
