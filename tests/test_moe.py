import pytest
import torch
import torch.nn.functional as F

from jtok.config import MoEConfig
from jtok.nn.ffn import MoE, update_balance_bias
from jtok.nn.routing import route_topk


def make_moe(seed=0, **kw):
    cfg = MoEConfig(**{"num_experts": 4, "num_shared_experts": 1, "top_k": 2,
                       "expert_hidden": 16, **kw})  # fmt: skip
    moe = MoE(24, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return moe


def per_expert_loop(moe, x):
    """Reference: every expert in turn, over the tokens that chose it."""
    x_TD = x.reshape(-1, x.shape[-1])
    logits = x_TD.float() @ moe.router.weight.float().T
    weights, index, _ = route_topk(
        logits, moe.cfg.top_k, moe.cfg.score_func, moe.cfg.renormalize,
        moe.selection_bias if moe.cfg.balance == "aux_free" else None,
    )
    y = torch.zeros_like(x_TD)
    for e in range(moe.cfg.num_experts):
        for t in range(x_TD.shape[0]):
            for slot in range(moe.cfg.top_k):
                if index[t, slot] == e:
                    gate, up = (x_TD[t] @ moe.w13[e]).chunk(2)
                    y[t] = y[t] + weights[t, slot] * ((F.silu(gate) * up) @ moe.w2[e])
    if moe.shared is not None:
        y = y + moe.shared(x_TD)
    return y.view_as(x)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("balance", ["aux_loss", "aux_free"])
def test_grouped_computation_equals_a_per_expert_loop(score_func, balance):
    moe = make_moe(score_func=score_func, balance=balance)
    x = torch.randn(3, 5, 24, requires_grad=True)
    y, _ = moe(x)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = per_expert_loop(moe, x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    probe = torch.randn_like(y)
    grads = torch.autograd.grad((y * probe).sum(), [x, moe.w13, moe.w2])
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), [x_ref, moe.w13, moe.w2])
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_dropless_under_extreme_imbalance():
    moe = make_moe(num_shared_experts=0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 10.0  # everyone's favourite
        moe.router.weight[1] = 5.0
    x = torch.rand(64, 24) + 0.5  # positive inputs: every token prefers experts 0 and 1
    y, _ = moe(x)
    torch.testing.assert_close(y, per_expert_loop(moe, x), rtol=1e-5, atol=1e-5)
    assert (y.abs().sum(-1) > 0).all()  # no token lost its experts to a capacity limit


def test_aux_free_bias_shifts_selection_toward_underloaded_experts():
    moe = make_moe(balance="aux_free", bias_update_rate=0.1, num_shared_experts=0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0
    x = torch.rand(32, 24) + 0.5
    moe.train()
    moe(x)
    load = moe.load_since_update.clone()
    assert load[0] == 32  # every token picked expert 0
    update_balance_bias(moe)
    assert moe.selection_bias[0] < 0 and (moe.load_since_update == 0).all()
    assert all(moe.selection_bias[e] > 0 for e in range(4) if load[e] < load.mean())
    # The bias changes which experts are picked but never the weights of those picked.
    with torch.no_grad():
        moe.selection_bias.copy_(torch.tensor([-5.0, 0.0, 5.0, 5.0]))
    _, aux = moe(x)
    assert aux is None
    torch.testing.assert_close(moe(x)[0], per_expert_loop(moe, x), rtol=1e-5, atol=1e-5)


def test_aux_loss_is_returned_only_for_the_aux_loss_method():
    x = torch.randn(8, 24)
    assert make_moe(balance="aux_loss")(x)[1] is not None
    assert make_moe(balance="none")(x)[1] is None
