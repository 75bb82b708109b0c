"""Token-indexed modulation: the tables, JTok (Eq 7-9) and JTok-M (Eq 10-13).

This module is where the method lives; everything else in jtok is a standard backbone.
Equation numbers refer to METHOD.md / arXiv 2602.00800.

Storage. All tables of a model are one parameter ``weight`` of shape
``(n_tok_layers * V * n, d)`` with n tables per layer: row ``(l * V + x) * n + i`` is
table i's row for token x in the l-th table-carrying layer. A forward does one gather for
all layers (`TokenTables.lookup`), and with ``dedup`` that gather reads each distinct
token id of the batch once (token frequencies are Zipfian, so a batch has far fewer
distinct ids than positions); the result splits into one contiguous (U, n, d) block per
layer. Each layer expands its block back to positions only after the work that depends
on the token alone (JTok's normalisation and gate) has been done once per distinct id.
With ``sparse_grad`` the table gradient holds only the gathered rows, and an optimizer
such as `jtok.tables.row_adam.RowAdam` updates only those that received a nonzero gradient (JTok-M
routes each position to K of n tables, so many gathered rows get none); a dense gradient
would be the size of the whole table every step.

Choices the paper leaves OPEN, and what we chose:
- Init: tables N(0, table_init_std^2), scale s = 1 (JTok) or sqrt(d) (JTok-M), router
  N(0, router_init_std^2). See TokModConfig for the reasons.
- The router's RMSNorm (Eq 10) has no learnable gain: a per-dimension gain in front of a
  linear router is absorbed by the router matrix itself, so a gain adds no expressivity.
- P_i in the balance loss uses the normalised sigmoid, the same scores that weigh the
  top-K (see `jtok.nn.routing.route_topk`).
- N_l in 1/sqrt(2 N_l) (Eq 13) is the model's total number of layers, whichever carry
  tables: it scales each residual update to the depth of the residual stream, as GPT-2's
  output-projection init does.
- One kind per model (JTok or JTok-M), on any subset of layers (``tokmod.layers``).
- Optimisation (outside this module): tables take a much larger step than the matrices
  (`TrainConfig.table_lr_mult`, 30 by default) and no weight decay. Measured in the demo
  setting: with the matrices' step JTok-M ends worse than the baseline, because its
  additive update stays near random for hundreds of steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jtok.config import ModelConfig, TokModConfig
from jtok.nn.routing import balance_loss, route_topk


def _add_scaled_unit(base_ND: Tensor, e_ND: Tensor, s_D: Tensor, c: float, eps: float):
    """Eq 13's update: (base + s * c * e / (||e|| + eps), ||e||, c / (||e|| + eps))."""
    norm_N1 = torch.linalg.vector_norm(e_ND, dim=-1, keepdim=True)
    coeff_N1 = c / (norm_N1 + eps)
    return torch.addcmul(base_ND, e_ND * coeff_N1, s_D), norm_N1, coeff_N1


class _AddScaledUnit(torch.autograd.Function):
    """``base + s * c * e / (||e||_2 + eps)`` per row, fused (Eq 13).

    Autograd's composition of norm, divide, scale and add makes about twice as many
    full-width passes over (N, d) in backward as this hand-written derivative:
        u = c e / (n + eps),  n = ||e||
        d/de: c/(n+eps) * g_u - c/((n+eps)^2 n) * (g_u . e) * e,   with g_u = g * s
        d/ds: sum_rows g * u;  d/dbase: g
    """

    @staticmethod
    def forward(ctx, base_ND: Tensor, e_ND: Tensor, s_D: Tensor, c: float, eps: float) -> Tensor:
        out, norm_N1, coeff_N1 = _add_scaled_unit(base_ND, e_ND, s_D, c, eps)
        ctx.save_for_backward(e_ND, s_D, norm_N1, coeff_N1)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        e_ND, s_D, norm_N1, coeff_N1 = ctx.saved_tensors
        grad_u_ND = grad_ND * s_D
        dot_N1 = torch.linalg.vecdot(grad_u_ND, e_ND).unsqueeze(-1)
        # n > 0 in practice; the clamp keeps e = 0 (whose term is 0) free of 0/0.
        radial_N1 = coeff_N1 * dot_N1 / ((norm_N1 + ctx.eps) * norm_N1.clamp_min(1e-30))
        grad_e = grad_u_ND.mul_(coeff_N1).sub_(e_ND * radial_N1)
        grad_s = torch.mm(coeff_N1.T, grad_ND * e_ND).squeeze(0)
        return grad_ND, grad_e, grad_s, None, None


def _unit(rows: Tensor, eps: float) -> Tensor:
    """L2 projection onto the unit sphere, ``x / (||x||_2 + eps)`` (Eq 7 / Eq 12)."""
    return rows / (torch.linalg.vector_norm(rows, dim=-1, keepdim=True) + eps)


class JTok(nn.Module):
    """One table per layer gating the FFN update: h' = h~ + m * (1 + s * u) (Eq 7-9)."""

    # Optimizer roles of this module's parameters (jtok.training.optim.parameter_roles).
    PARAM_ROLES = {"scale": "norm"}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.tokmod.eps
        self.l2_normalize = cfg.tokmod.l2_normalize
        self.scale = nn.Parameter(torch.empty(cfg.d_model))  # s_l

    def forward(
        self, h_in: Tensor, h_tilde: Tensor, m: Tensor, rows_U1D: Tensor, inverse_N: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        # The gate depends on the token only, so it is computed once per distinct id.
        u_UD = rows_U1D[:, 0].float()
        if self.l2_normalize:
            u_UD = _unit(u_UD, self.eps)  # Eq 7
        gate_UD = torch.addcmul(torch.ones_like(u_UD), self.scale.float(), u_UD)  # Eq 8
        # F.embedding rather than gate_UD[inverse_N]: same values, and on CPU its backward
        # (a row scatter-add) is several times faster than advanced indexing's.
        gate = F.embedding(inverse_N, gate_UD).view_as(m).to(m.dtype)
        return torch.addcmul(h_tilde, m, gate), None  # Eq 9: the skip path is untouched


class JTokM(nn.Module):
    """A pool of n_e tables per layer, top-K routed, added as a third residual update.

    g = RMSNorm(h) R (Eq 10); w = sigmoid weights renormalised over the top-K (Eq 11);
    e = sum_i w_i E_i[x] (Eq 12); r = s * e / (||e|| + eps) / sqrt(2 N_l) and
    h' = h~ + m + r (Eq 13). Returns the unweighted Switch-style balance loss.

    With K = 1, Eq 11 gives w = 1 whatever the logits, so the router learns from the
    balance loss alone and the choice of table stays a near-random function of the
    context. Measured on docs-en (n_e = 4, K = 1, 3M tokens): 4% worse than the baseline.
    Use K >= 2.
    """

    # Optimizer roles of this module's parameters (jtok.training.optim.parameter_roles).
    PARAM_ROLES = {"router": "router", "scale": "norm"}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        tok: TokModConfig = cfg.tokmod
        self.top_k = tok.top_k
        self.eps = tok.eps
        self.norm_eps = cfg.norm_eps
        self.l2_normalize = tok.l2_normalize
        # Without this factor the hidden-state std grows past 5 early in training and
        # JTok-M ends worse than the baseline (METHOD.md).
        self.residual_factor = 1.0 / math.sqrt(2 * cfg.n_layers) if tok.depth_scaling else 1.0
        self.router = nn.Parameter(torch.empty(tok.n_e, cfg.d_model))  # R_l, stored (n_e, d)
        self.scale = nn.Parameter(torch.empty(cfg.d_model))  # s_l

    def route(self, h_in: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Eq 10-11 on the layer input, in fp32: (weights_NK, index_NK, probs_NE)."""
        h_ND = h_in.reshape(-1, h_in.shape[-1]).float()
        # RMSNorm(h) R = (h R) * rstd(h): normalising after the n_e-wide projection gives
        # the same logits with fewer full-width passes (and backward passes) over h.
        rstd_N1 = torch.rsqrt(h_ND.square().mean(-1, keepdim=True) + self.norm_eps)
        logits_NE = F.linear(h_ND, self.router.float()) * rstd_N1  # Eq 10
        return route_topk(logits_NE, self.top_k, score_func="sigmoid", renormalize=True)

    def forward(
        self, h_in: Tensor, h_tilde: Tensor, m: Tensor, rows_UnD: Tensor, inverse_N: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        weights_NK, index_NK, probs_NE = self.route(h_in)
        # Eq 12 as one fused gather-and-weighted-sum: row inverse*n + i of the layer's
        # (U*n, d) block is E_{l,i}[x]. embedding_bag never materialises the (N, K, d)
        # gathered rows, and its backward is a single scatter-add.
        n_tables = rows_UnD.shape[1]
        e_ND = F.embedding_bag(
            inverse_N.unsqueeze(1) * n_tables + index_NK,
            rows_UnD.reshape(-1, rows_UnD.shape[-1]).float(),
            per_sample_weights=weights_NK,
            mode="sum",
        )
        base_ND = (h_tilde + m).reshape(e_ND.shape).float()
        grad = torch.is_grad_enabled()
        if self.l2_normalize:
            # Eq 13: h' = h~ + m + s * e / (||e|| + eps) / sqrt(2 N_l). Without autograd
            # (eval, decoding) the same forward runs without the Function's bookkeeping,
            # which is most of this layer's cost for one token.
            scale = self.scale.float()
            h_out = (_AddScaledUnit.apply(base_ND, e_ND, scale, self.residual_factor, self.eps)
                     if grad else _add_scaled_unit(base_ND, e_ND, scale, self.residual_factor,
                                                   self.eps)[0])  # fmt: skip
        else:  # ablation: the raw mixture, scaled
            h_out = base_ND + self.residual_factor * e_ND * self.scale.float()
        # The balance loss only trains the router: skipped where nothing is trained.
        aux = balance_loss(probs_NE, index_NK) if grad else None
        return h_out.view_as(m).to(h_tilde.dtype), aux
