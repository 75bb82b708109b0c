"""The device store's routed gather (RoutedRows): JTok-M training reads a layer's rows after
its router, only the (key, table) pairs some position routes to. It must train exactly as
the up-front gather of every key's n rows does, and its gradient must hold only the
routed rows."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_ids, tiny

from jtok.config import TrainConfig
from jtok.nn.model import build_model
from jtok.tables.store import RoutedRows
from jtok.training.loop import clip_grad_norm_
from jtok.training.optim import Optimizers


def _step(model, optimizers, micro_batches) -> tuple[list[float], float]:
    """One optimizer step over `micro_batches` (accumulated gradients), clipped at 1."""
    losses = []
    for ids in micro_batches:
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        (loss + out.aux_loss).backward()
        losses.append(loss.item())
    norm = clip_grad_norm_(list(model.parameters()), 1.0)
    optimizers.step()
    optimizers.zero_grad()
    return losses, norm


@pytest.mark.parametrize("n_e,top_k,dedup,accum", [(5, 2, True, 1), (8, 2, False, 1),
                                                   (6, 3, True, 2)])  # fmt: skip
def test_routed_training_is_bit_identical_to_the_up_front_gather(n_e, top_k, dedup, accum):
    cfg = tiny(tokmod__kind="jtokm", tokmod__n_e=n_e, tokmod__top_k=top_k,
               tokmod__dedup=str(dedup).lower())  # fmt: skip
    routed, up_front = build_model(cfg, seed=0), build_model(cfg, seed=0)
    up_front.token_tables.routed_gather = False
    assert routed.token_tables.routed_gather
    # A large step, so the gradient norm passes the clip threshold in some steps.
    train_cfg = TrainConfig(seq_len=16, lr=3e-2)
    opts = {id(m): Optimizers(m, train_cfg) for m in (routed, up_front)}
    clipped = 0
    for step in range(6):
        batches = [random_ids(cfg, batch=3, seq=17, seed=10 * step + i) for i in range(accum)]
        got = _step(routed, opts[id(routed)], batches)
        want = _step(up_front, opts[id(up_front)], batches)
        assert got == want, step  # losses and gradient norm, exactly
        clipped += want[1] > 1.0
    assert clipped > 0
    for (name, a), b in zip(routed.named_parameters(), up_front.parameters(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(opts[id(routed)].optimizers, opts[id(up_front)].optimizers, strict=True):
        for state_a, state_b in zip(a.state.values(), b.state.values(), strict=True):
            for key in state_a:
                assert torch.equal(state_a[key], state_b[key]), key


def test_routed_gradient_holds_exactly_the_routed_rows():
    cfg = tiny(tokmod__kind="jtokm", tokmod__n_e=8, tokmod__top_k=2)
    ids = random_ids(cfg, batch=2, seq=12, seed=3)
    grads = {}
    for routed in (True, False):
        model = build_model(cfg, seed=1)
        model.token_tables.routed_gather = routed
        out = model(ids)
        (out.logits.square().mean() + out.aux_loss).backward()
        grads[routed] = model.token_tables.weight.grad.coalesce()
    up_front = grads[False]
    used = up_front.values().flatten(1).ne(0).any(1)
    assert not used.all()  # some gathered rows were routed to by no position
    # The routed gradient: every used row and nothing else, with the same values.
    assert torch.equal(grads[True].indices()[0], up_front.indices()[0][used])
    assert torch.equal(grads[True].values(), up_front.values()[used])
    assert grads[True].values().flatten(1).ne(0).any(1).all()


def test_the_up_front_gather_where_routing_would_skip_nothing():
    ids = random_ids(tiny(), batch=2, seq=5)
    for overrides in ({"tokmod__kind": "jtok"},
                      {"tokmod__kind": "jtokm", "tokmod__n_e": 3, "tokmod__top_k": 3},
                      {"tokmod__kind": "jtokm", "tokmod__sparse_grad": "false"}):
        tables = build_model(tiny(**overrides), seed=0).token_tables
        rows = tables.lookup(ids)
        assert all(isinstance(block, torch.Tensor) for block in rows.layers), overrides
    tables = build_model(tiny(tokmod__kind="jtokm"), seed=0).token_tables
    assert all(isinstance(layer, RoutedRows) for layer in tables.lookup(ids).layers)
    with torch.no_grad():  # evaluation and decoding read the up-front blocks
        assert all(isinstance(block, torch.Tensor) for block in tables.lookup(ids).layers)
