import pytest
import torch

from jtok.tables.row_adam import RowAdam


def reference_row_adam(p, grads_per_step, lr, betas, eps, wd):
    """Each row an independent Adam(W) that steps only when its gradient row is nonzero."""
    p = p.clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    steps = [0] * p.shape[0]
    for g in grads_per_step:
        for r in range(p.shape[0]):
            if g[r].abs().sum() == 0:
                continue
            steps[r] += 1
            t = steps[r]
            m[r] = betas[0] * m[r] + (1 - betas[0]) * g[r]
            v[r] = betas[1] * v[r] + (1 - betas[1]) * g[r] ** 2
            m_hat, v_hat = m[r] / (1 - betas[0] ** t), v[r] / (1 - betas[1] ** t)
            p[r] = p[r] - lr * wd * p[r] - lr * m_hat / (v_hat.sqrt() + eps)
    return p


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_row_adam_equals_independent_per_row_adam(wd):
    torch.manual_seed(0)
    weight = torch.randn(10, 6)
    table = torch.nn.Embedding(10, 6, sparse=True)
    with torch.no_grad():
        table.weight.copy_(weight)
    opt = RowAdam(table.parameters(), lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    batches = [torch.tensor([1, 3, 3]), torch.tensor([3, 7]), torch.tensor([1, 9, 0, 3])]
    dense_grads = []
    for ids in batches:
        probe = torch.randn(ids.numel(), 6)
        (table(ids) * probe).sum().backward()
        dense_grads.append(table.weight.grad.to_dense())
        opt.step()
        opt.zero_grad()
    expected = reference_row_adam(weight, dense_grads, 0.05, (0.8, 0.95), 1e-6, wd)
    torch.testing.assert_close(table.weight.detach(), expected, rtol=1e-5, atol=1e-6)
    untouched = [2, 4, 5, 6, 8]
    assert torch.equal(table.weight[untouched].detach(), weight[untouched])


def test_row_adam_steps_only_rows_with_a_nonzero_gradient():
    """A gathered row whose gradient is exactly zero (a JTok-M table nobody was routed to)
    is not stepped; a row that is nonzero only below zero, or NaN, is."""
    table = torch.nn.Embedding(6, 4, sparse=True)
    before = table.weight.detach().clone()
    opt = RowAdam(table.parameters(), lr=0.1)
    ids = torch.tensor([1, 2, 3, 4])
    probe = torch.tensor([[0.0, 0.0, 0.0, 0.0],           # row 1: zero gradient
                          [-1.0, -2.0, -0.5, -3.0],       # row 2: all negative
                          [0.0, 0.0, 2.0, 0.0],           # row 3: one positive entry
                          [0.0, float("nan"), 0.0, 0.0]])  # row 4: NaN
    (table(ids) * probe).sum().backward()
    opt.step()
    steps = opt.state[table.weight]["row_step"]
    assert steps.tolist() == [0, 0, 1, 1, 1, 0]
    assert torch.equal(table.weight[[0, 1, 5]].detach(), before[[0, 1, 5]])
    assert not torch.equal(table.weight[2].detach(), before[2])
    assert torch.isnan(table.weight[4]).any()
    # A gradient zeroed in place (zero_grad(set_to_none=False)) steps nothing, without error.
    after = table.weight.detach().clone()
    opt.zero_grad(set_to_none=False)
    opt.step()
    torch.testing.assert_close(table.weight.detach(), after, rtol=0, atol=0, equal_nan=True)
    assert opt.state[table.weight]["row_step"].tolist() == [0, 0, 1, 1, 1, 0]


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_row_adam_block_size_never_changes_a_result(monkeypatch, wd):
    """The CPU step runs over blocks of gradient rows (cache blocking); with blocks of one,
    three and all rows the parameters and the optimizer state are bit-identical. Enough rows
    and steps that the per-row bias corrections run through torch.pow's vectorised path,
    whose last bit differs from its scalar path (so they must not be computed per block), with
    zero rows and an uncoalesced gradient (repeated, unsorted rows)."""
    from jtok.tables import row_adam

    n_rows, width, gathered = 700, 8, 600

    def run(block_bytes):
        monkeypatch.setattr(row_adam, "_UPDATE_BLOCK_BYTES", block_bytes)
        monkeypatch.setattr(row_adam, "_TEST_BLOCK_BYTES", block_bytes)
        gen = torch.Generator().manual_seed(0)
        table = torch.nn.Parameter(torch.randn(n_rows, width, generator=gen))
        opt = RowAdam([table], lr=0.05, betas=(0.9, 0.95), eps=1e-6, weight_decay=wd)
        for step in range(14):
            rows = torch.randperm(n_rows, generator=gen)[:gathered].sort().values
            values = torch.randn(gathered, width, generator=gen)
            values[torch.rand(gathered, generator=gen) < 0.4] = 0
            values[3:6] = 0  # a whole block of zero rows at 3 rows per block
            if step == 2:  # repeated and unsorted rows: coalesced before the blocks
                rows, values = torch.cat([rows, rows[:5]]).flip(0), torch.cat([values, values[:5]])
            table.grad = torch.sparse_coo_tensor(rows[None], values, (n_rows, width),
                                                 check_invariants=True)  # fmt: skip
            opt.step()
        return table.detach(), opt.state[table]

    row_bytes = width * 4
    results = [run(row_bytes), run(3 * row_bytes), run(1 << 30)]
    reference, ref_state = results[-1]
    assert ref_state["row_step"].max() >= 8  # counts where pow's two paths disagree
    for weights, state in results[:-1]:
        assert torch.equal(weights, reference)
        for key in ("exp_avg", "exp_avg_sq", "row_step"):
            assert torch.equal(state[key], ref_state[key]), key


def test_row_adam_refuses_dense_gradients():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    p.grad = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match="sparse"):
        RowAdam([p]).step()


def test_row_adam_trains_a_jtokm_model_with_sparse_tables():
    from conftest import random_ids, tiny

    from jtok.nn.model import build_model

    cfg = tiny(tokmod__kind="jtokm", tokmod__sparse_grad="true")
    model = build_model(cfg)
    tables = model.token_tables.weight
    rest = [p for p in model.parameters() if p is not tables]
    opts = [torch.optim.AdamW(rest, lr=1e-2), RowAdam([tables], lr=1e-2)]
    ids = random_ids(cfg, batch=4, seq=32)
    losses = []
    for _ in range(15):
        out = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        (loss + out.aux_loss).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
