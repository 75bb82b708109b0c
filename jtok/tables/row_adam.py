"""The row optimizer of token-indexed tables (it belongs to the tables, not to training).

`RowAdam` updates only the rows of a table that received a gradient. A batch touches a
few hundred of the vocabulary's rows, so a dense Adam step over a table of L * n_e * V * d
entries (and the dense gradient it needs) would cost far more than the whole forward.
"""

from __future__ import annotations

import torch
from torch import Tensor


class RowAdam(torch.optim.Optimizer):
    """Adam for tables with sparse (row-wise) gradients, with decoupled weight decay.

    Each row is its own Adam whose clock ticks only when the row receives a nonzero
    gradient: other rows keep their moments and values unchanged ("lazy" Adam), and
    the bias correction uses the row's own step count, so a rare token's first update has
    the same size as a frequent token's. This differs from dense AdamW, whose momentum
    keeps moving rows that are absent from the batch.

    Gradients must be sparse COO tensors over dim 0 (``nn.Embedding(sparse=True)``,
    ``F.embedding(..., sparse=True)`` or `TokModConfig.sparse_grad`).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):  # fmt: skip
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid RowAdam hyperparameters lr={lr} betas={betas} eps={eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # Optimizer.load_state_dict casts state tensors to the parameter's dtype; the
        # per-row step counts are integers.
        for state in self.state.values():
            if "row_step" in state:
                state["row_step"] = state["row_step"].to(torch.int64)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError(
                        "RowAdam needs sparse gradients; build the table with sparse=True"
                    )
                gathered_rows, values = _distinct_rows(p.grad)
                kept = nonzero_positions(values)
                if kept.numel() == 0:  # nothing to step (no rows, all zero, or width 0)
                    continue
                self._step_rows(p, gathered_rows.index_select(0, kept), values, kept, group)
        return loss

    def _step_rows(self, p: Tensor, rows: Tensor, values: Tensor, kept: Tensor,
                   group: dict) -> None:  # fmt: skip
        """Lazy Adam on the distinct `rows` of `p`, whose gradients are `values[kept]`."""
        state = self._state_of(p)
        beta1, beta2 = group["betas"]
        # Each row's clock and bias corrections, (R, 1) columns, computed over all the rows at
        # once and then sliced: torch.pow's vectorised and scalar paths differ in the last
        # bit, so computing them per block would make a row's update depend on where the
        # block boundaries fall.
        # m_hat / (sqrt(v_hat) + eps) = (m * c2 / c1) / (sqrt(v) + eps * c2) with
        # c1 = 1 - beta1^t, c2 = sqrt(1 - beta2^t): the per-row corrections fold into two
        # columns and the big tensors are touched three times.
        step = state["row_step"].index_add_(0, rows, torch.ones_like(rows))[rows]
        step = step.to(values.dtype).view(-1, *([1] * (values.dim() - 1)))
        bias2_sqrt = torch.sqrt(1 - torch.pow(beta2, step))
        step_size = -group["lr"] * bias2_sqrt / (1 - torch.pow(beta1, step))
        eps_column = bias2_sqrt * group["eps"]
        # Cache blocking (CPU): the update makes about a dozen passes over the rows' p, m, v
        # and g. Over all rows at once each pass streams megabytes from memory; a block of
        # rows at a time, the passes after a block's first read hit the core's cache. These
        # elementwise ops give the same bits on a tensor's vectorised body and its scalar
        # tail, so the result is bit-identical whatever the block size (tested, with blocks
        # of one row). On an accelerator one block: there each extra block is a round of
        # kernel launches.
        block = _block_rows(values, _UPDATE_BLOCK_BYTES)
        for start in range(0, rows.numel(), block):
            part = slice(start, start + block)
            grad = values.index_select(0, kept[part])
            _update_rows(p, state, rows[part], grad, step_size[part], eps_column[part], group)

    def _state_of(self, p: Tensor) -> dict:
        """p's moments and per-row step counts, made when a row of p is first stepped."""
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            state["row_step"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
        return state


# Bytes of gradient rows per block on the CPU. The update's block, with its rows of p, m and
# v and the temporaries, stays within a core's 1 MB cache; the zero test's block (two
# reductions over the same rows) within its cache too. Measured on the small preset's real
# gradients, one thread: update blocks of 128 KiB-1 MiB all take about 0.83x the one-block
# step.
_UPDATE_BLOCK_BYTES = 256 << 10
_TEST_BLOCK_BYTES = 1 << 20


def _block_rows(values: Tensor, block_bytes: int) -> int:
    """Rows per block: all of them off the CPU (see `RowAdam._step_rows`)."""
    if values.device.type != "cpu":
        return values.shape[0]
    return max(1, block_bytes // (values[0].numel() * values.element_size()))


def _update_rows(p: Tensor, state: dict, rows: Tensor, grad: Tensor, step_size: Tensor,
                 eps_column: Tensor, group: dict) -> None:  # fmt: skip
    """The moments and values of `rows` (distinct) stepped, given their bias-corrected step
    sizes and eps (see `RowAdam._step_rows`)."""
    beta1, beta2 = group["betas"]
    exp_avg = state["exp_avg"].index_select(0, rows).lerp_(grad, 1 - beta1)
    exp_avg_sq = state["exp_avg_sq"].index_select(0, rows)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    # index_put_ rather than index_copy_: the same rows written (each once, the rows are
    # distinct), and on a CPU about 1.5x faster for scattered rows. (One (V, 2, d) tensor for
    # both moments halves the scattered accesses but makes the elementwise ops below
    # strided, several times slower: measured.)
    state["exp_avg"].index_put_((rows,), exp_avg)
    state["exp_avg_sq"].index_put_((rows,), exp_avg_sq)
    denom = exp_avg_sq.sqrt_().add_(eps_column)
    update = exp_avg.div_(denom).mul_(step_size)
    if group["weight_decay"]:
        current = p.index_select(0, rows)
        update.add_(current, alpha=-group["lr"] * group["weight_decay"])
    p.index_add_(0, rows, update)


def _distinct_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """(row indices, row values) of a sparse gradient, each row once, in increasing order.

    Gradients gathered through deduplicated ids already hold each row once in increasing
    order; only otherwise is the (sorting) coalesce paid."""
    rows = grad._indices()[0]
    if not grad.is_coalesced() and rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
        grad = grad.coalesce()
        rows = grad._indices()[0]
    return rows, grad._values()


def nonzero_positions(values: Tensor) -> Tensor:
    """Positions (int64, increasing) of the gradient rows that are not all zero.

    A gathered row that no position used (a JTok-M table that was not routed to) is not
    stepped. A row is zero iff its max and min are: two reductions that allocate nothing,
    where any() on floats first writes an (R, d) "!= 0" temporary (about 2.5x slower on a
    CPU); on the CPU a block of rows at a time, so the second reads the rows from cache.
    NaN propagates through amax and is != 0, so a NaN row is kept, as any() keeps it."""
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=values.device)
    flat = values.reshape(values.shape[0], -1)
    used = torch.empty(flat.shape[0], dtype=torch.bool, device=flat.device)
    block = _block_rows(flat, _TEST_BLOCK_BYTES)
    for start in range(0, flat.shape[0], block):
        rows = flat[start : start + block]
        torch.logical_or(rows.amax(dim=1) != 0, rows.amin(dim=1) != 0,
                         out=used[start : start + block])  # fmt: skip
    return used.nonzero().squeeze(1)
