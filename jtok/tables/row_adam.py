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
                rows, values = _distinct_rows(p.grad)
                if values.numel() == 0:  # no rows (a zeroed gradient), or rows of width 0
                    continue
                # Cache blocking (CPU): the step reads the gradient once to find its nonzero
                # rows and makes about a dozen passes over those rows' p, m, v and g. Done
                # over the whole gradient, each pass streams tens of MB from memory; done a
                # block of gathered rows at a time, the passes after the first hit the
                # core's cache. Every row's update is independent of the others', so the
                # result is bit-identical whatever the block size (tested). Measured on
                # the small preset's table gradient (20,000 gathered rows, 8,000 nonzero),
                # one thread: 0.55x the time of the one-block step. On an accelerator one
                # block: there each extra block is a round of kernel launches.
                block = _block_rows(values)
                for start in range(0, rows.numel(), block):
                    kept_rows, grad = _nonzero_rows(rows[start : start + block],
                                                    values[start : start + block])  # fmt: skip
                    if kept_rows.numel():
                        _step_rows(p, self._state_of(p), kept_rows, grad, group)
        return loss

    def _state_of(self, p: Tensor) -> dict:
        """p's moments and per-row step counts, made when a row of p is first stepped."""
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            state["row_step"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
        return state


# Gradient bytes per block of the CPU step: with the kept rows' p, m, v and g (about 40% of
# a block's rows at n_e 5, K 2) it stays within a 1-2 MB core cache. Measured: 1.5-4 MiB
# blocks all take about 0.55x the unblocked step; 8 MiB 0.65x.
_CPU_BLOCK_BYTES = 2 << 20


def _block_rows(values: Tensor) -> int:
    """Gradient rows per block of the step: all of them off the CPU (see `RowAdam.step`)."""
    if values.device.type != "cpu":
        return values.shape[0]
    return max(1, _CPU_BLOCK_BYTES // (values[0].numel() * values.element_size()))


def _step_rows(p: Tensor, state: dict, rows: Tensor, grad: Tensor, group: dict) -> None:
    """Lazy Adam on the distinct `rows` of `p`, whose gradients are `grad`."""
    beta1, beta2 = group["betas"]
    step = state["row_step"].index_add_(0, rows, torch.ones_like(rows))[rows]
    step = step.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))

    exp_avg = state["exp_avg"].index_select(0, rows).lerp_(grad, 1 - beta1)
    exp_avg_sq = state["exp_avg_sq"].index_select(0, rows)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    # index_put_ rather than index_copy_: the same rows written (each once, the rows are
    # distinct), and on a CPU about 1.5x faster for scattered rows. (One (V, 2, d) tensor for
    # both moments halves the scattered accesses but makes the elementwise ops below
    # strided, several times slower: measured.)
    state["exp_avg"].index_put_((rows,), exp_avg)
    state["exp_avg_sq"].index_put_((rows,), exp_avg_sq)

    # m_hat / (sqrt(v_hat) + eps) = (m * c2 / c1) / (sqrt(v) + eps * c2) with
    # c1 = 1 - beta1^t, c2 = sqrt(1 - beta2^t): the per-row corrections fold into two (R, 1)
    # columns and the big tensors are touched three times.
    bias2_sqrt = torch.sqrt(1 - torch.pow(beta2, step))
    step_size = -group["lr"] * bias2_sqrt / (1 - torch.pow(beta1, step))
    denom = exp_avg_sq.sqrt_().add_(bias2_sqrt * group["eps"])
    update = exp_avg.div_(denom).mul_(step_size)
    if group["weight_decay"]:
        values = p.index_select(0, rows)
        update.add_(values, alpha=-group["lr"] * group["weight_decay"])
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


def _nonzero_rows(rows: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """The rows (and their values) whose gradient is not all zero.

    A gathered row that no position used (a JTok-M table that was not routed to) is not
    stepped."""
    if values.numel() == 0:
        return rows[:0], values[:0]
    flat = values.reshape(values.shape[0], -1)
    # A row is zero iff its max and min are: two reductions that allocate nothing, where
    # any() on floats first writes an (R, d) "!= 0" temporary (about 2.5x slower on a CPU).
    # NaN propagates through amax and is != 0, so a NaN row is kept, as any() keeps it.
    used = torch.logical_or(flat.amax(dim=1) != 0, flat.amin(dim=1) != 0)
    keep = used.nonzero().squeeze(1)
    return rows.index_select(0, keep), values.index_select(0, keep)
