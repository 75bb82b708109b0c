"""JTok and JTok-M against direct transcriptions of METHOD.md's equations."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_ids, tiny

from jtok.nn.model import build_model
from jtok.nn.routing import balance_loss, route_topk
from jtok.tables.mixers import JTokM


def layer_table(model, layer):
    """E_l as (V, n, d), cut out of the fused storage by hand (rows (l*V + x)*n + i)."""
    tables = model.token_tables
    V, n = model.cfg.vocab_size, tables.tables_per_layer
    slot = tables.slot(layer)
    table = tables.weight[slot * V * n : (slot + 1) * V * n].view(V, n, -1)
    assert torch.equal(table, tables.layer_weight(layer))
    return table


def block_parts(block, h, cos, sin):
    """h~ and m of a block, computed with the block's own sub-modules."""
    h_tilde = h + block.attn(block.attn_norm(h), cos, sin)
    m = block.ffn(block.ffn_norm(h_tilde))
    return h_tilde, (m[0] if isinstance(m, tuple) else m)


def run_block(model, layer, ids, h):
    T = ids.shape[1]
    rows = model.token_tables.lookup(ids)
    block = model.blocks[layer]
    out, _, aux = block(h, model.rope_cos[:T], model.rope_sin[:T], None,
                        rows.layers[model.token_tables.slot(layer)], rows.inverse_N)
    return out, aux


def test_jtok_with_zero_scale_equals_the_baseline_bit_for_bit():
    base = build_model(tiny(), seed=3)
    jtok = build_model(tiny(tokmod__kind="jtok"), seed=4)
    missing, unexpected = jtok.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == [] and all("tokmod" in k or "token_tables" in k for k in missing)
    with torch.no_grad():
        for block in jtok.blocks:
            block.tokmod.scale.zero_()
    ids = random_ids(base.cfg, batch=2, seq=32)
    assert torch.equal(jtok(ids).logits, base(ids).logits)


def test_jtok_block_equals_equations_7_to_9():
    cfg = tiny(tokmod__kind="jtok", tokmod__layers="1")
    model = build_model(cfg, seed=5)
    block = model.blocks[1]
    with torch.no_grad():
        block.tokmod.scale.normal_()  # a non-trivial s_l
    ids = random_ids(cfg, batch=2, seq=12)
    h = torch.randn(2, 12, cfg.d_model)
    out, _ = run_block(model, 1, ids, h)

    E = layer_table(model, 1)[:, 0]  # (V, d)
    s, eps = block.tokmod.scale, cfg.tokmod.eps
    h_tilde, m = block_parts(block, h, model.rope_cos[:12], model.rope_sin[:12])
    expected = torch.empty_like(h)
    for b in range(2):
        for t in range(12):
            e = E[ids[b, t]]
            u = e / (torch.sqrt((e * e).sum()) + eps)  # Eq 7
            gate = 1 + s * u  # Eq 8
            expected[b, t] = h_tilde[b, t] + m[b, t] * gate  # Eq 9
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_jtokm_block_equals_equations_10_to_13(name):
    cfg = tiny(name, tokmod__kind="jtokm", tokmod__n_e="4", tokmod__top_k="2")
    model = build_model(cfg, seed=6)
    layer = 1
    block = model.blocks[layer]
    with torch.no_grad():
        block.tokmod.scale.normal_()
        block.tokmod.router.normal_()  # spread the routing over the pool
    ids = random_ids(cfg, batch=2, seq=10)
    h = torch.randn(2, 10, cfg.d_model)
    out, aux = run_block(model, layer, ids, h)

    E = layer_table(model, layer)  # (V, n_e, d)
    R = block.tokmod.router.T  # (d, n_e)
    s, eps, K = block.tokmod.scale, cfg.tokmod.eps, cfg.tokmod.top_k
    N_l = cfg.n_layers
    h_tilde, m = block_parts(block, h, model.rope_cos[:10], model.rope_sin[:10])
    expected = torch.empty_like(h)
    for b in range(2):
        for t in range(10):
            x = h[b, t]
            g = (x / torch.sqrt(x.pow(2).mean() + cfg.norm_eps)) @ R  # Eq 10
            G = torch.topk(g, K).indices
            sig = torch.sigmoid(g)
            w = {int(i): sig[i] / sig[G].sum() for i in G}  # Eq 11
            e = sum(w[i] * E[ids[b, t], i] for i in w)  # Eq 12
            r = (1 / math.sqrt(2 * N_l)) * s * e / (torch.sqrt((e * e).sum()) + eps)  # Eq 13
            expected[b, t] = h_tilde[b, t] + m[b, t] + r
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert aux is not None and aux.ndim == 0


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_topk_weights_are_nonnegative_sum_to_one_and_pick_the_largest(score_func):
    logits = torch.randn(64, 5) * 3
    weights, index, probs = route_topk(logits, 2, score_func, renormalize=True)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(64))
    torch.testing.assert_close(probs.sum(-1), torch.ones(64))
    assert torch.equal(index.sort(-1).values, logits.topk(2).indices.sort(-1).values)


def test_jtokm_routing_weights_are_normalised_sigmoids_of_the_top_k():
    cfg = tiny(tokmod__kind="jtokm")
    mod = JTokM(cfg)
    torch.nn.init.normal_(mod.router)
    h = torch.randn(3, 7, cfg.d_model)
    weights, index, _ = mod.route(h)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(21))
    logits = F.rms_norm(h.reshape(-1, cfg.d_model), (cfg.d_model,), eps=cfg.norm_eps) @ mod.router.T
    sig = torch.sigmoid(logits).gather(-1, index)
    torch.testing.assert_close(weights, sig / sig.sum(-1, keepdim=True))


def test_balance_loss_equals_its_formula():
    logits = torch.randn(40, 5)
    _, index, probs = route_topk(logits, 2, "sigmoid", renormalize=True)
    n = 5
    P = [probs[:, i].mean() for i in range(n)]
    f = [(index == i).sum() / index.numel() for i in range(n)]
    expected = n * sum(P[i] * f[i] for i in range(n))
    torch.testing.assert_close(balance_loss(probs, index), expected)


def test_balance_loss_is_lowest_under_uniform_load():
    k = 2
    # Uniform: rows take turns between the pairs (0,1) and (2,3), with mirrored scores.
    uniform = torch.tensor([[2.0, 2.0, -2.0, -2.0], [-2.0, -2.0, 2.0, 2.0]]).repeat(10, 1)
    skewed = torch.tensor([[3.0, 2.0, -2.0, -2.0]]).repeat(20, 1)
    partly = torch.cat([uniform[:10], skewed[:10]])
    losses = []
    for logits in (uniform, partly, skewed):
        _, index, probs = route_topk(logits, k, "sigmoid", renormalize=True)
        losses.append(balance_loss(probs, index))
    torch.testing.assert_close(losses[0], torch.tensor(1.0))
    assert losses[0] < losses[1] < losses[2]


def test_model_aux_loss_is_lambda_times_the_sum_over_layers():
    cfg = tiny(tokmod__kind="jtokm", tokmod__aux_weight="0.01")
    model = build_model(cfg, seed=0)
    ids = random_ids(cfg)
    out = model(ids)
    per_layer = []
    h = model.embed(ids)
    for block in model.blocks:
        h_out, aux = run_block(model, block.layer, ids, h)
        per_layer.append(aux)
        h = h_out
    torch.testing.assert_close(out.aux_loss, 0.01 * torch.stack(per_layer).sum())


def grads_of_tables(cfg, ids):
    model = build_model(cfg, seed=0)
    out = model(ids)
    out.logits.square().mean().backward()
    return model, model.token_tables.weight.grad


@pytest.mark.parametrize("kind", ["jtok", "jtokm"])
@pytest.mark.parametrize("sparse", [False, True])
def test_only_rows_of_tokens_in_the_batch_receive_gradient(kind, sparse):
    cfg = tiny(tokmod__kind=kind, tokmod__sparse_grad=str(sparse).lower())
    ids = torch.tensor([[3, 17, 3, 99, 250, 17]])
    model, grad = grads_of_tables(cfg, ids)
    grad = grad.to_dense() if sparse else grad
    V, n = cfg.vocab_size, cfg.tokmod.tables_per_layer
    present = set(ids.flatten().tolist())
    for slot in range(len(cfg.tokmod_layers)):
        g = grad[slot * V * n : (slot + 1) * V * n].view(V, n, -1)
        touched = set(torch.nonzero(g.abs().sum((1, 2))).flatten().tolist())
        assert touched == present, (slot, touched)
    if kind == "jtokm":
        # Within a present token's rows, only the tables routed to receive gradient.
        g = grad[: V * n].view(V, n, -1)
        chosen = {(int(x), int(i)) for x, row in
                  zip(ids.flatten(), model.blocks[0].tokmod.route(model.embed(ids))[1], strict=True)
                  for i in row}  # fmt: skip
        nonzero = {(int(x), int(i)) for x, i in torch.nonzero(g.abs().sum(-1))}
        assert nonzero == chosen


@pytest.mark.parametrize("kind", ["jtok", "jtokm"])
@pytest.mark.parametrize("dedup", [True, False])
@pytest.mark.parametrize("sparse", [False, True])
def test_fused_lookup_equals_a_per_layer_embedding_reference(kind, dedup, sparse):
    cfg = tiny(tokmod__kind=kind, tokmod__layers="[0, 1]",
               tokmod__dedup=str(dedup).lower(), tokmod__sparse_grad=str(sparse).lower())
    model = build_model(cfg, seed=1)
    tables = model.token_tables
    tables.routed_gather = False  # the up-front blocks; tests/test_tables_routed.py: the rest
    V, n, d = cfg.vocab_size, cfg.tokmod.tables_per_layer, cfg.d_model
    reference = torch.nn.ModuleList(torch.nn.Embedding(V, n * d) for _ in cfg.tokmod_layers)
    with torch.no_grad():
        for layer, emb in zip(cfg.tokmod_layers, reference, strict=True):
            emb.weight.copy_(tables.layer_weight(layer).reshape(V, n * d))
    ids = torch.tensor([[5, 9, 5, 5, 42], [9, 1, 0, 42, 5]])
    probe = torch.randn(len(cfg.tokmod_layers), ids.numel(), n, d)

    rows = tables.lookup(ids)
    fused_loss = 0.0
    for slot, block_rows in enumerate(rows.layers):
        expanded = block_rows[rows.inverse_N]  # (N, n, d)
        ref = reference[slot](ids.flatten()).view(-1, n, d)
        assert torch.equal(expanded, ref)
        fused_loss = fused_loss + (expanded * probe[slot]).sum()
    ref_loss = sum((reference[s](ids.flatten()).view(-1, n, d) * probe[s]).sum()
                   for s in range(len(reference)))  # fmt: skip
    fused_loss.backward()
    ref_loss.backward()
    grad = tables.weight.grad.to_dense() if sparse else tables.weight.grad
    for slot, emb in enumerate(reference):
        layer_grad = grad[slot * V * n : (slot + 1) * V * n].reshape(V, n * d)
        torch.testing.assert_close(layer_grad, emb.weight.grad)


@pytest.mark.parametrize("kind", ["jtok", "jtokm"])
def test_deduplicated_model_equals_the_plain_one(kind):
    ids = torch.tensor([[7, 7, 7, 3, 7, 3, 1, 1]])
    out = {}
    for dedup in (True, False):
        cfg = tiny(tokmod__kind=kind, tokmod__dedup=str(dedup).lower())
        model, grad = grads_of_tables(cfg, ids)
        out[dedup] = (model(ids).logits, grad.to_dense())
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-5, atol=1e-7)


def test_jtok_and_jtokm_can_sit_on_any_subset_of_layers():
    cfg = tiny("tiny-moe", tokmod__kind="jtokm", tokmod__layers="[1]")
    model = build_model(cfg)
    assert model.blocks[0].tokmod is None and isinstance(model.blocks[1].tokmod, JTokM)
    assert model.token_tables.weight.shape == (cfg.vocab_size * cfg.tokmod.n_e, cfg.d_model)
    out = model(random_ids(cfg))
    assert torch.isfinite(out.logits).all()


def test_fused_eq13_gradient_matches_autograd_of_the_plain_formula():
    from jtok.tables.mixers import _AddScaledUnit

    torch.manual_seed(0)
    base = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    e = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    s = torch.randn(8, dtype=torch.float64, requires_grad=True)
    c, eps = 0.3, 1e-6
    assert torch.autograd.gradcheck(lambda b, x, y: _AddScaledUnit.apply(b, x, y, c, eps),
                                    (base, e, s))  # fmt: skip
    plain = base + c * s * e / (e.norm(dim=-1, keepdim=True) + eps)
    torch.testing.assert_close(_AddScaledUnit.apply(base, e, s, c, eps), plain)


@pytest.mark.parametrize("kind", ["jtok", "jtokm"])
def test_ablation_switches_drop_exactly_the_norm_or_the_depth_factor(kind):
    ids = random_ids(tiny(), batch=1, seq=6)
    h = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(0))
    outs, base = {}, None
    for name, overrides in {
        "full": {},
        "no_norm": {"tokmod__l2_normalize": "false"},
        "no_depth": {"tokmod__depth_scaling": "false"},
    }.items():
        # Same seed and shapes: every variant has the same weights and routing.
        model = build_model(tiny(tokmod__kind=kind, tokmod__layers="[1]", **overrides), seed=11)
        with torch.no_grad():
            model.blocks[1].tokmod.scale.normal_(generator=torch.Generator().manual_seed(1))
        outs[name] = run_block(model, 1, ids, h)[0]
        block = model.blocks[1]
        h_tilde, m = block_parts(block, h, model.rope_cos[:6], model.rope_sin[:6])
        if kind == "jtok" and name == "no_norm":
            E = layer_table(model, 1)[:, 0]
            expected = h_tilde + m * (1 + block.tokmod.scale * E[ids[0]])
            torch.testing.assert_close(outs[name], expected, rtol=1e-5, atol=1e-6)
        base = h_tilde + m
    if kind == "jtok":
        assert torch.equal(outs["full"], outs["no_depth"])  # JTok has no depth factor
        return
    r_full, r_no_depth, r_no_norm = (outs[k] - base for k in ("full", "no_depth", "no_norm"))
    # tiny has N_l = 2 layers: without the factor the update is sqrt(2 * 2) = 2x larger.
    torch.testing.assert_close(r_no_depth, 2 * r_full, rtol=1e-4, atol=1e-6)
    # Without the norm, each row is the normalised update times ||e|| + eps (> 1 here).
    ratio = r_no_norm / r_full
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-3, atol=1e-3)
    assert (ratio[..., 0] > 1).all()


def test_router_learns_from_the_lm_loss_only_when_k_is_at_least_two():
    def router_grad_norm(top_k):
        cfg = tiny(tokmod__kind="jtokm", tokmod__n_e="4", tokmod__top_k=str(top_k),
                   tokmod__aux_weight="0")  # fmt: skip
        model = build_model(cfg, seed=0)
        out = model(random_ids(cfg))
        (out.logits.square().mean() + out.aux_loss).backward()
        return float(model.blocks[0].tokmod.router.grad.norm())

    # K = 1: w = sigmoid(g) / sigmoid(g) = 1, so only rounding residue reaches the router.
    assert router_grad_norm(1) < 1e-6 * router_grad_norm(2)
    assert router_grad_norm(2) > 0


@pytest.mark.parametrize(
    ("kind", "scale_init", "expected"),
    [("jtok", None, 1.0), ("jtokm", None, math.sqrt(64)), ("jtokm", 2.5, 2.5)],
)
def test_initial_scale_is_per_kind_unless_set(kind, scale_init, expected):
    cfg = tiny(tokmod__kind=kind, tokmod__scale_init=scale_init)
    model = build_model(cfg, seed=0)
    assert cfg.d_model == 64
    for block in model.blocks:
        assert torch.equal(block.tokmod.scale, torch.full((64,), expected))
    # JTok-M's s u is then unit-RMS per element (the update size is Eq 13's depth factor).
    if kind == "jtokm" and scale_init is None:
        u = torch.nn.functional.normalize(torch.randn(1000, 64), dim=-1)
        rms = (model.blocks[0].tokmod.scale.detach() * u).square().mean().sqrt()
        assert rms.item() == pytest.approx(1.0)


# ---- fast paths (issue 12, speed) against the plain formulation ------------------------------


def plain_jtokm(mod, h_in, h_tilde, m, rows_UnD, inverse_N):
    """Eq 10-13 spelled as before the speed work: mean, F.linear, sigmoid + gather, Python
    scalars, F.embedding_bag with its own offsets, c / (||e|| + eps)."""
    d, n = h_in.shape[-1], rows_UnD.shape[1]
    h = h_in.reshape(-1, d).float()
    rstd = torch.rsqrt(h.square().mean(-1, keepdim=True) + mod.norm_eps)
    scores = torch.sigmoid(F.linear(h, mod.router.float()) * rstd)
    index = scores.topk(mod.top_k, dim=-1, sorted=False).indices
    w = scores.gather(-1, index)
    w = w / w.sum(-1, keepdim=True)
    e = F.embedding_bag(inverse_N.unsqueeze(1) * n + index, rows_UnD.reshape(-1, d).float(),
                        per_sample_weights=w, mode="sum")  # fmt: skip
    base = (h_tilde + m).reshape(e.shape).float()
    norm = torch.linalg.vector_norm(e, dim=-1, keepdim=True)
    out = torch.addcmul(base, e * (mod.residual_factor / (norm + mod.eps)), mod.scale.float())
    return out.view_as(m)


def jtokm_layer_case(seq, n_e=5, top_k=2):
    """A JTok-M layer with random scale and router, its model, ids with a repeated id, and
    random (h, h~, m) of 3 rows x seq positions."""
    cfg = tiny(tokmod__kind="jtokm", tokmod__n_e=str(n_e), tokmod__top_k=str(top_k))
    model = build_model(cfg, seed=2)
    mod = model.blocks[0].tokmod
    with torch.no_grad():
        mod.scale.normal_()
        mod.router.normal_()
    ids = random_ids(cfg, batch=3, seq=seq, seed=1)
    ids[1, 0] = ids[0, 0]  # a repeated id
    gen = torch.Generator().manual_seed(3)
    h, h_tilde, m = (torch.randn(3, seq, cfg.d_model, generator=gen) for _ in range(3))
    return model, mod, ids, (h, h_tilde, m)


@pytest.mark.parametrize("seq", [1, 9])  # decoding (identity inverse) and a deduplicated batch
@pytest.mark.parametrize("grad", [False, True])
def test_jtokm_layer_equals_the_plain_formulation_bit_for_bit(seq, grad):
    model, mod, ids, (h, h_tilde, m) = jtokm_layer_case(seq)
    with torch.set_grad_enabled(grad):
        rows = model.token_tables.lookup(ids)  # with grad: RoutedRows, read after the router
        model.token_tables.routed_gather = False
        blocks = model.token_tables.lookup(ids)  # the up-front (U, n, d) blocks
        out, aux = mod(h, h_tilde, m, rows.layers[0], rows.inverse_N)
        expected = plain_jtokm(mod, h, h_tilde, m, blocks.layers[0], blocks.inverse_N)
    assert torch.equal(out, expected)
    assert (aux is not None) == grad  # the balance loss only where the router trains


def test_jtok_skips_the_gather_only_for_the_identity_map():
    from jtok.tables.keys import identity, is_identity

    cfg = tiny(tokmod__kind="jtok")
    model = build_model(cfg, seed=2)
    mod = model.blocks[0].tokmod
    with torch.no_grad():
        mod.scale.normal_()
    ids = random_ids(cfg, batch=4, seq=1)
    rows = model.token_tables.lookup(ids)  # one token per row: the cached identity map
    assert is_identity(rows.inverse_N) and rows.inverse_N is identity(4)
    assert not is_identity(torch.arange(4))  # equal values, not the cached map
    h, h_tilde, m = (torch.randn(4, 1, cfg.d_model) for _ in range(3))
    fast, _ = mod(h, h_tilde, m, rows.layers[0], rows.inverse_N)
    gathered, _ = mod(h, h_tilde, m, rows.layers[0], torch.arange(4))
    assert torch.equal(fast, gathered)


def test_fused_router_gradient_matches_autograd_of_the_plain_formula():
    from jtok.tables.mixers import _RouterLogits

    torch.manual_seed(0)
    h = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    R = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    eps = 1e-5
    assert torch.autograd.gradcheck(lambda x, r: _RouterLogits.apply(x, r, eps), (h, R))
    plain = (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)) @ R.T
    fused = _RouterLogits.apply(h, R, eps)
    torch.testing.assert_close(fused, plain)
    g = torch.randn_like(plain)
    expected = torch.autograd.grad(plain, (h, R), g)
    torch.testing.assert_close(torch.autograd.grad(fused, (h, R), g), expected)


def test_route_topk_without_probs_chooses_the_same():
    logits = torch.randn(32, 5) * 2
    for bias in (None, torch.randn(5)):
        full = route_topk(logits, 2, "sigmoid", renormalize=True, selection_bias_E=bias)
        lean = route_topk(logits, 2, "sigmoid", renormalize=True, selection_bias_E=bias,
                          need_probs=False)  # fmt: skip
        assert lean[2] is None
        assert torch.equal(lean[0], full[0]) and torch.equal(lean[1], full[1])


@pytest.mark.parametrize("kind", ["jtok", "jtokm"])
def test_inference_mode_decoding_then_training_in_one_process(kind):
    # The cached constants, offsets and identity maps made while decoding under
    # torch.inference_mode must not be inference tensors: training reuses them.
    from jtok.nn.model import KVCache
    from jtok.tables import keys, mixers

    for cache in (keys._identities, mixers._constants, mixers._offsets):
        cache.clear()
    cfg = tiny(tokmod__kind=kind)
    model = build_model(cfg, seed=0)
    ids = random_ids(cfg, batch=2, seq=6)
    with torch.inference_mode():
        kv = KVCache.empty(cfg, 2, max_len=8)
        model(ids[:, :5], cache=kv)
        decoded = model(ids[:, 5:6], cache=kv).logits
    with torch.no_grad():
        kv = KVCache.empty(cfg, 2, max_len=8)
        model(ids[:, :5], cache=kv)
        assert torch.equal(model(ids[:, 5:6], cache=kv).logits, decoded)
    out = model(ids[:, :1])  # training-mode forward with T = 1: the cached identity map
    (out.logits.square().mean() + out.aux_loss).backward()
    out = model(ids)
    (out.logits.square().mean() + out.aux_loss).backward()
    assert model.token_tables.weight.grad is not None
