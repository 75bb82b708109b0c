"""JTok-M under torch.compile: the inference spelling inductor fuses (issue 12, compiled
decoding), a compiled model's decode step, and routing that traces without graph breaks."""

import pytest
import torch
from conftest import random_ids, tiny
from test_tokmod import jtokm_layer_case, plain_jtokm

from jtok.nn.model import build_model

# ---- the inference spelling for torch.compile (issue 12, compiled decoding) ----------------


@pytest.mark.parametrize("seq", [1, 9])
@pytest.mark.parametrize("n_e,top_k", [(5, 2), (8, 3)])
def test_compiled_inference_spelling_equals_the_plain_formulation(seq, n_e, top_k):
    """`_compiled_inference` (what a compiled JTok-M layer runs without autograd) computes
    Eq 10-13 to fp32 rounding; run eagerly here, so the test checks the spelling itself."""
    from jtok.tables.mixers import _compiled_inference

    model, mod, ids, (h, h_tilde, m) = jtokm_layer_case(seq, n_e, top_k)
    with torch.no_grad():
        rows = model.token_tables.lookup(ids)
        out = _compiled_inference(mod, h, h_tilde, m, rows.layers[0], rows.inverse_N)
        expected = plain_jtokm(mod, h, h_tilde, m, rows.layers[0], rows.inverse_N)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_compiled_inference_spelling_breaks_ties_toward_the_lower_table():
    from jtok.tables.mixers import _compiled_inference

    cfg = tiny(tokmod__kind="jtokm", tokmod__n_e="6", tokmod__top_k="2")
    model = build_model(cfg, seed=2)
    mod = model.blocks[0].tokmod
    with torch.no_grad():
        mod.router.zero_()  # every logit 0: all six tables tie
        mod.scale.fill_(1.0)
    ids = random_ids(cfg, batch=2, seq=1, seed=1)
    h = torch.randn(2, 1, cfg.d_model)
    zero = torch.zeros_like(h)
    with torch.no_grad():
        rows = model.token_tables.lookup(ids)
        out = _compiled_inference(mod, h, zero, zero, rows.layers[0], rows.inverse_N)
    e = rows.layers[0][:, :2].mean(1)  # tables 0 and 1, weighted alike
    expected = e / (e.norm(dim=-1, keepdim=True) + mod.eps) * mod.residual_factor
    torch.testing.assert_close(out.view_as(expected), expected)


def test_compiled_model_decodes_the_eager_models_logits():
    """torch.compile of a JTok-M model gives the eager model's logits for a decode step
    with a KV cache (one token per row: one graph, no break; the compiled layers run
    `_compiled_inference`)."""
    from jtok.nn.model import KVCache

    cfg = tiny(tokmod__kind="jtokm", tokmod__n_e="5", tokmod__top_k="2", n_layers="2")
    model = build_model(cfg, seed=2).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.tokmod.router.normal_()
            block.tokmod.scale.normal_()
    compiled = torch.compile(model, dynamic=False)
    ids = random_ids(cfg, batch=2, seq=5, seed=4)
    nxt = random_ids(cfg, batch=2, seq=1, seed=5)
    with torch.no_grad():
        results = []
        for forward in (model, compiled):
            cache = KVCache.empty(cfg, 2, max_len=8)
            model(ids, cache=cache)  # the prompt, eagerly
            results.append(forward(nxt, cache=cache).logits)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_selection_counts_are_bincounts_and_routing_compiles_without_graph_breaks():
    """Training under torch.compile: routing (JTok-M's and the MoE router's) traces into
    the graph. In a dense JTok-M model the only break is the dedup key's `unique` (a
    data-dependent shape), before the first layer; an MoE layer also breaks where it hands
    its expert counts to the grouped matmul (`tolist`). `bincount` broke the graph at every
    routed layer."""
    from jtok.nn.routing import selection_counts

    index = torch.tensor([[0, 3], [3, 1], [0, 3]])
    assert selection_counts(index, 6).tolist() == torch.bincount(index.flatten(),
                                                                 minlength=6).tolist()
    for name, kind in (("tiny", "jtokm"), ("tiny-moe", "jtokm"), ("tiny-moe", "none")):
        cfg = tiny(name, tokmod__kind=kind)
        model = build_model(cfg, seed=0).train()
        explained = torch._dynamo.explain(model)(random_ids(cfg, batch=2, seq=12))
        where = {str(b.user_stack[-1].filename).rsplit("/jtok/", 1)[-1]
                 for b in explained.break_reasons}  # fmt: skip
        allowed = {"tables/keys.py"} if name == "tiny" else {"tables/keys.py", "nn/ffn.py"}
        assert where <= allowed and (kind == "none" or "tables/keys.py" in where), where
