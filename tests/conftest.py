import pytest
import torch

from jtok.nn.model import build_model
from jtok.presets import preset


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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small prepared dataset (BPE vocab 320) from generated English-like text."""
    import random

    from jtok.data import prepare

    root = tmp_path_factory.mktemp("tiny_data")
    rng = random.Random(0)
    words = ("the king and queen of a land by the sea went to see what the fool had "
             "said about stars rain bread swords honour night day love war").split()
    text = "\n\n".join(
        " ".join(rng.choice(words) for _ in range(rng.randint(30, 90))) for _ in range(400)
    )
    (root / "corpus.txt").write_text(text)
    out = root / "prepared"
    prepare([str(root / "corpus.txt")], out, vocab_size=320, val_fraction=0.1,
            progress=False, log=lambda msg: None)  # fmt: skip
    return out


def tiny_run_config(data_dir, **train_overrides):
    from jtok.config import RunConfig, TrainConfig

    model = preset("tiny").with_overrides({"vocab_size": "320", "tokmod.kind": "jtokm"})
    # The LR multipliers are pinned at the values the tolerances of the equality tests
    # (tests/test_parallel.py) were set for: at x300 a table step is 0.9, and fp32 rounding
    # across processes shows up in it (see assert_weights_close).
    train = dict(data=str(data_dir), seq_len=32, batch_size=8, steps=12, lr=3e-3,
                 warmup_steps=2, eval_every=6, eval_tokens=2048, save_every=4, log_every=1,
                 table_lr_mult=30.0, embed_lr_mult=1.0)  # fmt: skip
    train.update(train_overrides)
    return RunConfig(model=model, train=TrainConfig(**train))
