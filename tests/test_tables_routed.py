"""The device store's routed gather (RoutedRows): JTok-M training reads a layer's rows after
its router, only the (key, table) pairs some position routes to. It must train exactly as
the up-front gather of every key's n rows does, and its gradient must hold only the
routed rows."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import random_ids, tiny

from jtok.config import TrainConfig
from jtok.nn.model import build_model
from jtok.tables.routed import RoutedRows
from jtok.training.loop import clip_grad_norm_
from jtok.training.optim import Optimizers


def _table_gradient(cfg, ids, routed: bool) -> torch.Tensor:
    """The table's sparse gradient of one forward and backward, with either gather."""
    model = build_model(cfg, seed=1)
    model.token_tables.routed_gather = routed
    out = model(ids)
    (out.logits.square().mean() + out.aux_loss).backward()
    return model.token_tables.weight.grad


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


@pytest.mark.parametrize("n_e,top_k,layers,accum", [(5, 2, 2, 1), (8, 2, 6, 1), (6, 3, 2, 3)])
def test_routed_training_is_bit_identical_to_the_up_front_gather(n_e, top_k, layers, accum):
    cfg = tiny(tokmod__kind="jtokm", tokmod__n_e=n_e, tokmod__top_k=top_k, n_layers=layers)
    routed, up_front = build_model(cfg, seed=0), build_model(cfg, seed=0)
    up_front.token_tables.routed_gather = False
    assert routed.token_tables.routed_gather
    # A large step, so the gradient norm passes the clip threshold in some steps.
    train_cfg = TrainConfig(seq_len=16, lr=3e-2)
    opts = {id(m): Optimizers(m, train_cfg) for m in (routed, up_front)}
    clipped = 0
    for step in range(6):
        batches = [random_ids(cfg, batch=4, seq=33, seed=10 * step + i) for i in range(accum)]
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
    grads = {routed: _table_gradient(cfg, ids, routed) for routed in (True, False)}
    # The routed rows' gradients of all layers arrive as one gradient, in row order.
    rows = grads[True]._indices()[0]
    assert bool((rows[1:] > rows[:-1]).all())
    up_front = grads[False].coalesce()
    used = up_front.values().flatten(1).ne(0).any(1)
    assert not used.all()  # some gathered rows were routed to by no position
    # The routed gradient: every used row and nothing else, with the same values.
    routed = grads[True].coalesce()
    assert torch.equal(routed.indices()[0], up_front.indices()[0][used])
    assert torch.equal(routed.values(), up_front.values()[used])
    assert routed.values().flatten(1).ne(0).any(1).all()


def test_the_up_front_gather_where_routing_would_skip_nothing():
    ids = random_ids(tiny(), batch=2, seq=5)
    for overrides in ({"tokmod__kind": "jtok"},
                      {"tokmod__kind": "jtokm", "tokmod__n_e": 3, "tokmod__top_k": 3},
                      # without dedup a row's copies are summed in an order that depends
                      # on the whole gradient's layout: not bit-identical, so not routed
                      {"tokmod__kind": "jtokm", "tokmod__dedup": "false"},
                      {"tokmod__kind": "jtokm", "tokmod__sparse_grad": "false"}):
        tables = build_model(tiny(**overrides), seed=0).token_tables
        rows = tables.lookup(ids)
        assert all(isinstance(block, torch.Tensor) for block in rows.layers), overrides
    tables = build_model(tiny(tokmod__kind="jtokm"), seed=0).token_tables
    assert all(isinstance(layer, RoutedRows) for layer in tables.lookup(ids).layers)
    with torch.no_grad():  # evaluation and decoding read the up-front blocks
        assert all(isinstance(block, torch.Tensor) for block in tables.lookup(ids).layers)


def test_frozen_tables_are_read_the_same_and_get_no_gradient():
    cfg = tiny(tokmod__kind="jtokm", tokmod__n_e=8, tokmod__top_k=2)
    ids = random_ids(cfg, batch=2, seq=12, seed=4)
    logits = {}
    for routed in (True, False):
        model = build_model(cfg, seed=1)
        model.token_tables.routed_gather = routed
        model.token_tables.weight.requires_grad_(False)
        out = model(ids)
        out.logits.sum().backward()
        assert model.token_tables.weight.grad is None
        logits[routed] = out.logits
    assert torch.equal(logits[True], logits[False])


def test_replicated_table_mean_over_three_processes_is_the_same_for_both_gathers(monkeypatch):
    # average_table_gradients at world size 3, its all-gathers replaced by the concatenation
    # of the three processes' pieces (each process's gradient from its own batch).
    import jtok.parallel.distributed as distributed

    cfg = tiny(tokmod__kind="jtokm", tokmod__n_e=8, tokmod__top_k=2)
    env = distributed.DistEnv(rank=0, world_size=3)
    means = {}
    for routed in (True, False):
        grads = [_table_gradient(cfg, random_ids(cfg, batch=4, seq=24, seed=rank), routed)
                 for rank in range(3)]  # fmt: skip
        sent: list[list[torch.Tensor]] = [[], []]  # indices, then values, per process
        calls = itertools.count()  # each process gathers its indices, then its values

        def record(tensor, env, sent=sent, calls=calls):
            sent[next(calls) % 2].append(tensor)
            return tensor

        table = torch.nn.Parameter(torch.zeros_like(build_model(cfg).token_tables.weight))
        monkeypatch.setattr(distributed, "_all_gather_rows", record)
        for grad in grads:  # what each process would send
            table.grad = grad
            distributed.average_table_gradients([table], env)
        pieces = iter([torch.cat(sent[0]), torch.cat(sent[1])])
        monkeypatch.setattr(distributed, "_all_gather_rows",
                            lambda tensor, env, pieces=pieces: next(pieces))  # fmt: skip
        table.grad = grads[0]
        distributed.average_table_gradients([table], env)
        means[routed] = table.grad
    assert torch.equal(means[True].indices(), means[False].indices())
    assert torch.equal(means[True].values(), means[False].values())


def test_compiled_training_gets_the_eager_table_gradient():
    # The routed gather hands its gradients over by a side effect that a compiled backward
    # drops: compiled, the tables used to get no gradient at all (and trained not at all).
    # Under torch.compile the store takes the up-front gather. aot_eager traces forward and
    # backward as inductor does, without its code generation.
    cfg = tiny(tokmod__kind="jtokm", tokmod__n_e=8, tokmod__top_k=2)
    ids = random_ids(cfg, batch=2, seq=16, seed=0)
    grads = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model = build_model(cfg, seed=1)
        assert model.token_tables.routed_gather
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        out = forward(ids)
        (out.logits.square().mean() + out.aux_loss).backward()
        grads[compiled] = model.token_tables.weight.grad
    assert grads[True] is not None
    eager, traced = grads[False].coalesce().to_dense(), grads[True].coalesce().to_dense()
    assert eager.abs().max() > 0
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-9)
