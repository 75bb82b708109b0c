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


def _left_padded(cfg, lengths, extra, seed=0, pad_id=0):
    """Sequences of `lengths` + `extra` tokens, and their prompts left-padded into (B, P)."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, cfg.vocab_size, (n + extra,), generator=gen) for n in lengths]
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n :] = seqs[b][:n]
    return seqs, ids, [width - n for n in lengths]


@pytest.mark.parametrize("name, overrides", VARIANTS, ids=IDS)
def test_left_padded_rows_compute_what_each_row_computes_alone(name, overrides):
    cfg = tiny(name, **overrides)
    model = build_model(cfg, seed=3).eval()
    lengths, extra = [5, 11, 1, 8], 4
    seqs, ids, pad = _left_padded(cfg, lengths, extra)
    with torch.no_grad():
        cache = KVCache.empty(cfg, batch=4, max_len=max(lengths) + extra, pad=pad)
        steps = [model(ids, cache=cache).logits]
        for t in range(extra):
            next_ids = torch.stack([s[n + t] for s, n in zip(seqs, lengths, strict=True)])[:, None]
            steps.append(model(next_ids, cache=cache).logits)
        batched = torch.cat(steps, dim=1)
        for b in range(len(lengths)):  # position 0 of a row is its first real token
            alone = model(seqs[b][None]).logits[0]
            torch.testing.assert_close(batched[b, pad[b] :], alone, rtol=1e-4, atol=1e-5)


def test_padding_ids_never_change_a_real_position():
    cfg = tiny(tokmod__kind="jtokm")
    model = build_model(cfg, seed=4).eval()
    logits = []
    for pad_id in (0, 17):
        _, ids, pad = _left_padded(cfg, [3, 9, 6], 0, pad_id=pad_id)
        with torch.no_grad():
            cache = KVCache.empty(cfg, batch=3, max_len=9, pad=pad)
            out = model(ids, cache=cache).logits
        logits.append(torch.cat([out[b, p:] for b, p in enumerate(pad)]))
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-6)
    assert torch.isfinite(out).all()  # padding queries too: they see their own slot


def test_dropping_rows_from_a_padded_cache_keeps_the_others():
    cfg = tiny(tokmod__kind="jtok")
    model = build_model(cfg, seed=5).eval()
    lengths = [4, 7, 2]
    seqs, ids, pad = _left_padded(cfg, lengths, 3)
    with torch.no_grad():
        cache = KVCache.empty(cfg, batch=3, max_len=10, pad=pad)
        model(ids, cache=cache)
        cache.select(torch.tensor([0, 2]))  # row 1 (the longest) has finished
        assert cache.batch == 2 and cache.min_pad == 3
        step = model(torch.stack([seqs[0][4], seqs[2][2]])[:, None], cache=cache).logits
        alone = [model(seqs[b][None, : lengths[b] + 1]).logits[0, -1] for b in (0, 2)]
    torch.testing.assert_close(step[:, 0], torch.stack(alone), rtol=1e-4, atol=1e-5)


def test_a_padded_cache_may_hold_more_slots_than_the_context_but_no_longer_row():
    cfg = tiny(max_seq_len="8")
    model = build_model(cfg, seed=6).eval()
    with torch.no_grad():
        cache = KVCache.empty(cfg, batch=2, max_len=12, pad=[3, 0])
        model(torch.ones(2, 6, dtype=torch.long), cache=cache)
        cache.select(torch.tensor([0]))  # the 6-token row left; the 3-token row continues
        for _ in range(5):  # slots 6..10: row 0 reaches 8 tokens, its context
            model(torch.ones(1, 1, dtype=torch.long), cache=cache)
        assert cache.pos == 11 and cache.longest(0) == 8
        with pytest.raises(ValueError, match="exceeds"):
            model(torch.ones(1, 1, dtype=torch.long), cache=cache)
