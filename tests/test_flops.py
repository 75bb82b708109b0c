import pytest
from conftest import random_ids, tiny
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from jtok.flops import count_flops, count_params, summarize
from jtok.nn.model import build_model

CASES = [
    ("tiny", {}),
    ("tiny", {"tokmod__kind": "jtok"}),
    ("tiny", {"tokmod__kind": "jtokm", "tie_embeddings": "true"}),
    ("tiny-moe", {"tokmod__kind": "jtokm", "tokmod__layers": "1"}),
    ("tiny-moe", {"moe__first_dense_layers": "1", "moe__num_shared_experts": "0"}),
]


@pytest.mark.parametrize("name, overrides", CASES)
def test_parameter_counts_match_the_model(name, overrides):
    cfg = tiny(name, **overrides)
    model = build_model(cfg)
    counts = count_params(cfg)
    params = dict(model.named_parameters())  # a tied weight appears once
    tables = params.pop("token_tables.weight", None)
    assert sum(p.numel() for p in params.values()) == counts.backbone
    assert (0 if tables is None else tables.numel()) == counts.token_params
    attention = sum(p.numel() for n, p in params.items() if ".attn." in n)
    assert attention == counts.attention


@pytest.mark.parametrize("name, overrides", CASES)
def test_training_flops_match_flop_counter_mode(name, overrides):
    cfg = tiny(name, **overrides)
    model = build_model(cfg)
    B, T = 2, 32
    ids = random_ids(cfg, batch=B, seq=T)
    # The math SDPA backend decomposes attention into bmm, which the counter sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(ids)
        (out.logits.float().square().mean() + out.aux_loss).backward()
    counted = counter.get_total_flops() / (B * T)
    flops = count_flops(cfg, seq_len=T)
    assert counted == pytest.approx(3 * (flops.matmul + flops.attention_scores), rel=0.01)
    assert counted == pytest.approx(flops.train, rel=0.05)  # plus the element-wise estimate


def test_summary_ratios():
    cfg = tiny(tokmod__kind="jtokm", tokmod__n_e="4", tokmod__top_k="1")
    s = summarize(cfg)
    assert s["rho"] == 0.25
    assert s["eta"] == pytest.approx(s["token_params"] / s["active_backbone_params"])
    assert s["token_params"] == cfg.n_layers * 4 * cfg.vocab_size * cfg.d_model


def test_moe_active_counts_only_the_routed_experts_used():
    cfg = tiny("tiny-moe")
    p = count_params(cfg)
    per_expert = 3 * cfg.d_model * cfg.moe.expert_hidden
    assert p.backbone - p.backbone_active == cfg.n_layers * (4 - 2) * per_expert
    assert count_flops(cfg).matmul < count_flops(tiny("tiny-moe", moe__top_k="4")).matmul


def test_token_parameters_add_almost_no_flops():
    base = count_flops(tiny("tiny")).train
    jtokm = count_flops(tiny("tiny", tokmod__kind="jtokm")).train
    assert 1.0 < jtokm / base < 1.05
