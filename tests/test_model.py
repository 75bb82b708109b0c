import pytest
import torch
from conftest import random_ids, tiny

from jtok.nn.model import KVCache, build_model

VARIANTS = [
    ("tiny", {}),
    ("tiny", {"tokmod__kind": "jtok"}),
    ("tiny", {"tokmod__kind": "jtokm", "tokmod__n_e": "3", "tokmod__top_k": "2"}),
    ("tiny-moe", {"tokmod__kind": "jtokm"}),
    ("tiny-moe", {"moe__score_func": "sigmoid", "moe__balance": "aux_free"}),
]
IDS = ["dense", "jtok", "jtokm", "moe-jtokm", "moe-sigmoid"]


@pytest.mark.parametrize("name, overrides", VARIANTS, ids=IDS)
def test_changing_a_future_token_never_changes_earlier_logits(name, overrides):
    cfg = tiny(name, **overrides)
    model = build_model(cfg, seed=1).eval()
    ids = random_ids(cfg, batch=1, seq=24)
    cut = 11
    changed = ids.clone()
    changed[0, cut:] = (changed[0, cut:] + 7) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :cut], b[:, :cut], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, cut:], b[:, cut:])  # the change did reach the model


@pytest.mark.parametrize("name, overrides", VARIANTS, ids=IDS)
def test_incremental_decoding_with_the_kv_cache_equals_a_full_forward(name, overrides):
    cfg = tiny(name, **overrides)
    model = build_model(cfg, seed=2).eval()
    ids = random_ids(cfg, batch=2, seq=20)
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache.empty(cfg, batch=2, max_len=32)
        prefill = model(ids[:, :8], cache=cache).logits  # a prompt
        chunk = model(ids[:, 8:12], cache=cache).logits  # a chunk after a prefix (masked)
        steps = [model(ids[:, t : t + 1], cache=cache).logits for t in range(12, 20)]
    incremental = torch.cat([prefill, chunk, *steps], dim=1)
    assert cache.pos == 20
    torch.testing.assert_close(incremental, full, rtol=1e-4, atol=1e-5)


def test_seeded_construction_is_deterministic_and_seeds_differ():
    cfg = tiny("tiny-moe", tokmod__kind="jtokm")
    a, b, c = (build_model(cfg, seed=s).state_dict() for s in (7, 7, 8))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["token_tables.weight"], c["token_tables.weight"])
    assert not torch.equal(a["blocks.0.attn.wqkv.weight"], c["blocks.0.attn.wqkv.weight"])


def test_init_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(tiny(), seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_tied_embeddings_share_one_tensor():
    model = build_model(tiny(tie_embeddings="true"))
    assert model.head.weight is model.embed.weight


def test_sequences_longer_than_max_seq_len_are_refused():
    cfg = tiny()
    model = build_model(cfg)
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, cfg.max_seq_len + 1, dtype=torch.long))


def test_backward_reaches_every_parameter():
    cfg = tiny("tiny-moe", tokmod__kind="jtokm", moe__num_experts="2", moe__top_k="2")
    model = build_model(cfg)
    out = model(random_ids(cfg, batch=2, seq=16))
    (out.logits.square().mean() + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
