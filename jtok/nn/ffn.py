"""Feed-forward blocks: the SwiGLU MLP and a dropless token-choice mixture of experts.

Shape suffixes: T tokens, D model width, H hidden width, E experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jtok.config import MoEConfig
from jtok.nn.routing import balance_loss, route_topk, selection_counts


class SwiGLU(nn.Module):
    """w2(silu(x w1) * (x w3)); w1 and w3 are stored as one matrix so one matmul does both."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def grouped_swiglu(x_TD: Tensor, counts: list[int], w13_EDH2: Tensor, w2_EHD: Tensor) -> Tensor:
    """SwiGLU of each expert over its contiguous segment of expert-sorted tokens.

    Segment e holds ``counts[e]`` rows; experts with no tokens are skipped. One matmul
    pair per expert over a contiguous slice, with no padding and no dropped tokens.
    """
    out_TD = torch.empty_like(x_TD)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        stop = start + count
        gate, up = (x_TD[start:stop] @ w13_EDH2[expert]).chunk(2, dim=-1)
        out_TD[start:stop] = (F.silu(gate) * up) @ w2_EHD[expert]
        start = stop
    return out_TD


class MoE(nn.Module):
    """Routed experts (token-choice top-k, dropless) plus optional shared experts.

    The router runs in fp32. Load balancing is either the Switch-style auxiliary loss
    (returned, unweighted, to the caller) or DeepSeek-V3's auxiliary-loss-free bias, which
    only shifts expert selection and is updated outside forward by `update_balance_bias`.
    """

    # Optimizer roles of this module's parameters (jtok.training.optim.parameter_roles).
    PARAM_ROLES = {"router.weight": "router", "w13": "matrix", "w2": "matrix"}

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        n, hidden = cfg.num_experts, cfg.expert_hidden
        self.router = nn.Linear(d_model, n, bias=False)
        self.w13 = nn.Parameter(torch.empty(n, d_model, 2 * hidden))  # gate | up, per expert
        self.w2 = nn.Parameter(torch.empty(n, hidden, d_model))
        self.shared = (
            SwiGLU(d_model, hidden * cfg.num_shared_experts) if cfg.num_shared_experts else None
        )
        self.register_buffer("selection_bias", torch.zeros(n), persistent=True)
        # Tokens routed to each expert since the last bias update (aux-free balancing).
        self.register_buffer("load_since_update", torch.zeros(n), persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x_TD = x.reshape(-1, x.shape[-1])
        logits_TE = F.linear(x_TD.float(), self.router.weight.float())
        bias = self.selection_bias if self.cfg.balance == "aux_free" else None
        # The balance loss only trains the router: skipped where nothing is trained (eval,
        # decoding), as JTok-M's is, so a benchmark compares equals.
        train_router = self.cfg.balance == "aux_loss" and torch.is_grad_enabled()
        weights_TK, index_TK, probs_TE = route_topk(
            logits_TE, self.cfg.top_k, self.cfg.score_func, self.cfg.renormalize, bias,
            need_probs=train_router,
        )  # fmt: skip
        aux = balance_loss(probs_TE, index_TK) if train_router else None

        # Sort the (token, slot) pairs by expert so each expert sees one contiguous block.
        counts_E = selection_counts(index_TK, self.cfg.num_experts)
        if self.training and self.cfg.balance == "aux_free":
            self.load_since_update += counts_E.to(self.load_since_update.dtype)
        order = torch.argsort(index_TK.flatten(), stable=True)
        token_of_pair = order // self.cfg.top_k
        expert_out = grouped_swiglu(
            x_TD[token_of_pair], counts_E.tolist(), self.w13.to(x.dtype), self.w2.to(x.dtype)
        )
        expert_out = expert_out * weights_TK.flatten()[order].unsqueeze(1).to(x.dtype)
        y_TD = torch.zeros_like(x_TD).index_add_(0, token_of_pair, expert_out)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.view_as(x), aux


@torch.no_grad()
def update_balance_bias(model: nn.Module) -> None:
    """One step of auxiliary-loss-free balancing for every MoE layer of `model`.

    Raise the selection bias of under-loaded experts and lower it for over-loaded ones by
    ``bias_update_rate`` (DeepSeek-V3), then reset the load counters. Call it after each
    optimizer step; it lives outside forward so that forward stays a pure function of
    its inputs and parameters.
    """
    for module in model.modules():
        if isinstance(module, MoE) and module.cfg.balance == "aux_free":
            load = module.load_since_update
            if load.sum() > 0:
                module.selection_bias += module.cfg.bias_update_rate * torch.sign(
                    load.mean() - load
                )
            load.zero_()
