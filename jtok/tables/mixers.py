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
  (`TrainConfig.table_lr_mult`, 300 by default) and no weight decay. Measured in the demo
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
from jtok.tables.keys import is_identity
from jtok.tables.routed import RoutedRows
from jtok.tables.store import OwnerMixedRows

# Speed notes (issue 12). Decoding one token runs these layers on a handful of rows, where
# each op costs its dispatch (a few microseconds on a CPU), not its arithmetic; training
# runs them on thousands of rows, where each full-width pass over (N, d) costs its memory
# traffic. So: Python scalars in ops are replaced by cached 0-dim tensors (a scalar is
# wrapped and copied into a tensor on every call), index tensors that depend only on the
# batch's shape are cached, no-op dtype casts are skipped, and the backward passes of Eq 10
# and Eq 13 are hand-written with fewer full-width passes. The forward values are
# bit-identical to the plain formulas (tests/test_tokmod.py checks both paths).
# Under torch.compile without autograd a JTok-M layer runs `_compiled_inference` instead,
# which inductor fuses into a few loops: eager, no op count reaches the 3% decode
# budget (about six calls per layer), compiled the same model decodes at about 1.02x the
# baseline (benchmarks/README.md).

_CACHE_LIMIT = 256  # entries per cache below; a cache that outgrows it starts afresh
_constants: dict[tuple, Tensor] = {}
_offsets: dict[tuple, Tensor] = {}


def _const(value: float, like: Tensor) -> Tensor:
    """`value` as a cached 0-dim tensor of `like`'s dtype and device (same arithmetic as the
    Python scalar, without a scalar-to-tensor copy on every call). Under torch.compile a
    fresh one, which the compiler folds (a cache would be a side effect to trace)."""
    if torch.compiler.is_compiling():
        return torch.tensor(value, dtype=like.dtype, device=like.device)
    key = (value, like.dtype, like.device)
    found = _constants.get(key)
    if found is None:
        if len(_constants) >= _CACHE_LIMIT:
            _constants.clear()
        with torch.inference_mode(False):  # usable later in training, if made in inference
            found = torch.tensor(value, dtype=like.dtype, device=like.device)
        _constants[key] = found
    return found


def _fp32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _bag_offsets(n_bags: int, bag_size: int, device: torch.device) -> Tensor:
    """embedding_bag offsets of `n_bags` bags of `bag_size` (what F.embedding_bag builds for
    a 2-D input on every call), cached."""
    if torch.compiler.is_compiling():
        return torch.arange(0, n_bags * bag_size, bag_size, device=device)
    key = (n_bags, bag_size, device)
    found = _offsets.get(key)
    if found is None:
        if len(_offsets) >= _CACHE_LIMIT:
            _offsets.clear()
        with torch.inference_mode(False):  # embedding_bag's backward saves the offsets
            found = torch.arange(0, n_bags * bag_size, bag_size, device=device)
        _offsets[key] = found
    return found


def _router_logits(h_ND: Tensor, router_ED: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Eq 10 as (h R) * rstd(h): (logits_NE, (h R)_NE, rstd_N1).

    RMSNorm(h) R = (h R) * rstd(h): normalising after the n_e-wide projection gives the
    same logits with fewer full-width passes over h. The values are those of
    rsqrt(h.square().mean(-1) + eps) exactly: vecdot(h, h) is square-then-sum, mean is
    sum-then-divide, and addcdiv(eps, s, d) is s / d + eps, in fewer dispatches."""
    rstd_N1 = _rstd(h_ND, eps)
    z_NE = F.linear(h_ND, router_ED)
    return z_NE * rstd_N1, z_NE, rstd_N1


def _rstd(h_ND: Tensor, eps: float) -> Tensor:
    """RMSNorm's 1 / sqrt(mean(h^2) + eps) per row, as (N, 1) (see `_router_logits`)."""
    # Out-of-place ops throughout: this also runs inside an autograd.Function's forward,
    # which torch.compile traces only without in-place aliasing.
    sumsq_N1 = torch.linalg.vecdot(h_ND, h_ND).unsqueeze(-1)
    return torch.rsqrt(torch.addcdiv(_const(eps, h_ND), sumsq_N1,
                                     _const(float(h_ND.shape[-1]), h_ND)))  # fmt: skip


class _RouterLogits(torch.autograd.Function):
    """Eq 10's logits with a hand-written backward.

    Autograd's composition of square, mean, rsqrt, linear and mul makes about six
    full-width passes over (N, d) in backward (the mean's expanded gradient, pow's, the
    sum of two gradients of h); this makes three:
        logits = z * rstd,  z = h R^T,  rstd = (|h|^2 / d + eps)^-1/2,  d rstd/dh = -rstd^3 h / d
        dh = (g * rstd) R - (sum_e g z) rstd^3 / d * h;   dR = (g * rstd)^T h
    """

    @staticmethod
    def forward(ctx, h_ND: Tensor, router_ED: Tensor, eps: float) -> Tensor:
        logits_NE, z_NE, rstd_N1 = _router_logits(h_ND, router_ED, eps)
        ctx.save_for_backward(h_ND, router_ED, z_NE, rstd_N1)
        return logits_NE

    @staticmethod
    def backward(ctx, grad_NE: Tensor):
        h_ND, router_ED, z_NE, rstd_N1 = ctx.saved_tensors
        grad_z_NE = grad_NE * rstd_N1
        grad_h = grad_router = None
        if ctx.needs_input_grad[0]:
            radial_N1 = torch.linalg.vecdot(grad_NE, z_NE).unsqueeze(-1)
            radial_N1 = radial_N1.mul_(rstd_N1.pow(3)).div_(-h_ND.shape[-1])
            grad_h = torch.mm(grad_z_NE, router_ED).addcmul_(h_ND, radial_N1)
        if ctx.needs_input_grad[1]:
            grad_router = torch.mm(grad_z_NE.t(), h_ND)
        return grad_h, grad_router, None


def _add_scaled_unit(base_ND: Tensor, e_ND: Tensor, s_D: Tensor, c: float, eps: float):
    """Eq 13's update: (base + s * c * e / (||e|| + eps), ||e||, c / (||e|| + eps))."""
    norm_N1 = torch.linalg.vector_norm(e_ND, dim=-1, keepdim=True)
    # c / x is reciprocal(x) * c: the same values, spelled with cached constants.
    coeff_N1 = torch.mul(torch.add(norm_N1, _const(eps, norm_N1)).reciprocal(), _const(c, norm_N1))
    return torch.addcmul(base_ND, e_ND * coeff_N1, s_D), norm_N1, coeff_N1


class _AddScaledUnit(torch.autograd.Function):
    """``base + s * c * e / (||e||_2 + eps)`` per row, fused (Eq 13).

    Autograd's composition of norm, divide, scale and add makes about twice as many
    full-width passes over (N, d) in backward as this hand-written derivative:
        u = c e / (n + eps),  n = ||e||
        d/de: c/(n+eps) * g_u - c/((n+eps)^2 n) * (g_u . e) * e,   with g_u = g * s
        d/ds: sum_rows g * u;  d/dbase: g
    g * e serves both g_u . e (= (g * e) s) and d/ds, so e meets g once.
    """

    @staticmethod
    def forward(ctx, base_ND: Tensor, e_ND: Tensor, s_D: Tensor, c: float, eps: float) -> Tensor:
        out, norm_N1, coeff_N1 = _add_scaled_unit(base_ND, e_ND, s_D, c, eps)
        ctx.save_for_backward(e_ND, s_D, norm_N1, coeff_N1)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        # Rows are the last dimension; any leading shape (N or B, T) is kept.
        e_ND, s_D, norm_N1, coeff_N1 = ctx.saved_tensors
        ge = grad_ND * e_ND  # the one full-width buffer this allocates
        ge_MD = ge.view(-1, e_ND.shape[-1])
        dot_N1 = torch.mv(ge_MD, s_D).view(coeff_N1.shape)  # (g * s) . e
        grad_s = torch.mv(ge_MD.t(), coeff_N1.reshape(-1))
        # n > 0 in practice; the clamp keeps e = 0 (whose term is 0) free of 0/0.
        radial_N1 = coeff_N1 * dot_N1 / ((norm_N1 + ctx.eps) * norm_N1.clamp_min(1e-30))
        # g * s * c/(n+eps) - radial * e, written over g * e (no longer needed): on a CPU a
        # fresh (N, d) buffer can cost more (page faults) than the pass that fills it.
        grad_e = torch.mul(grad_ND, coeff_N1, out=ge).mul_(s_D).addcmul_(e_ND, radial_N1,
                                                                          value=-1)  # fmt: skip
        return grad_ND, grad_e, grad_s, None, None


def _unit(rows: Tensor, eps: float) -> Tensor:
    """L2 projection onto the unit sphere, ``x / (||x||_2 + eps)`` (Eq 7 / Eq 12)."""
    norm = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
    return rows / torch.add(norm, _const(eps, norm))


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
        u_UD = _fp32(rows_U1D[:, 0])
        if self.l2_normalize:
            u_UD = _unit(u_UD, self.eps)  # Eq 7
        gate_UD = torch.addcmul(_const(1.0, u_UD), _fp32(self.scale), u_UD)  # Eq 8
        if is_identity(inverse_N):  # one row per position, in order (decoding): no gather
            gate = gate_UD.view_as(m)
        else:
            # F.embedding rather than gate_UD[inverse_N]: same values, and on CPU its
            # backward (a row scatter-add) is several times faster than advanced indexing's.
            gate = F.embedding(inverse_N, gate_UD).view_as(m)
        if gate.dtype != m.dtype:
            gate = gate.to(m.dtype)
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

    def route(self, h_in: Tensor, need_probs: bool = True,
              ) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
        """Eq 10-11 on the layer input, in fp32: (weights_NK, index_NK, probs_NE).

        probs (for the balance loss) is None when not `need_probs`."""
        h_ND = _fp32(h_in.reshape(-1, h_in.shape[-1]))
        router = _fp32(self.router)
        if torch.is_grad_enabled() and (h_ND.requires_grad or router.requires_grad):
            logits_NE = _RouterLogits.apply(h_ND, router, self.norm_eps)  # Eq 10
        else:
            logits_NE = _router_logits(h_ND, router, self.norm_eps)[0]
        return route_topk(logits_NE, self.top_k, score_func="sigmoid", renormalize=True,
                          need_probs=need_probs)  # fmt: skip

    def forward(
        self, h_in: Tensor, h_tilde: Tensor, m: Tensor, rows_UnD: Tensor, inverse_N: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        # The balance loss only trains the router: skipped where nothing is trained.
        grad = torch.is_grad_enabled()
        if (not grad and self.l2_normalize and torch.compiler.is_compiling()
                and not isinstance(rows_UnD, OwnerMixedRows)):  # fmt: skip
            return _compiled_inference(self, h_in, h_tilde, m, rows_UnD, inverse_N), None
        weights_NK, index_NK, probs_NE = self.route(h_in, need_probs=grad)
        if isinstance(rows_UnD, OwnerMixedRows):  # sharded store: Eq 12 done at the owners
            e_ND = rows_UnD.mix(weights_NK, index_NK)
        else:
            if isinstance(rows_UnD, RoutedRows):  # device store, training: the routed rows
                rows_MD, bag_NK = rows_UnD.gather(index_NK)
            else:  # row inverse*n + i of the layer's (U*n, d) block is E_{l,i}[x]
                rows_MD = rows_UnD.reshape(-1, rows_UnD.shape[-1])
                bag_NK = inverse_N.unsqueeze(1) * rows_UnD.shape[1] + index_NK
            # Eq 12 as one fused gather-and-weighted-sum: embedding_bag never materialises
            # the (N, K, d) gathered rows, and its backward is a single scatter-add.
            # torch.embedding_bag is what F.embedding_bag calls, minus its argument checks
            # and per-call offsets.
            e_ND = torch.embedding_bag(
                _fp32(rows_MD), bag_NK.reshape(-1),
                _bag_offsets(bag_NK.shape[0], bag_NK.shape[1], bag_NK.device),
                False, 0, False, weights_NK.reshape(-1), False, None,
            )[0]  # fmt: skip
        # Eq 13 row by row, in the (B, T, d) layout of h~ and m (one view, of e, not two).
        base = _fp32(h_tilde + m)
        e = e_ND.view(base.shape)
        if self.l2_normalize:
            # Eq 13: h' = h~ + m + s * e / (||e|| + eps) / sqrt(2 N_l). Without autograd
            # (eval, decoding) the same forward runs without the Function's bookkeeping,
            # which is most of this layer's cost for one token.
            scale = _fp32(self.scale)
            h_out = (_AddScaledUnit.apply(base, e, scale, self.residual_factor, self.eps)
                     if grad else _add_scaled_unit(base, e, scale, self.residual_factor,
                                                   self.eps)[0])  # fmt: skip
        else:  # ablation: the raw mixture, scaled
            h_out = base + self.residual_factor * e * self.scale.float()
        aux = balance_loss(probs_NE, index_NK) if grad else None
        return (h_out if h_out.dtype == h_tilde.dtype else h_out.to(h_tilde.dtype)), aux


def _compiled_inference(layer: JTokM, h_in: Tensor, h_tilde: Tensor, m: Tensor,
                        rows_UnD: Tensor, inverse_N: Tensor) -> Tensor:  # fmt: skip
    """Eq 10-13 without autograd, spelled for inductor (torch.compile of inference).

    Decoding a token runs this layer on a handful of rows, where every library call the
    compiled graph keeps (a matmul, ``topk``, ``embedding_bag``) costs more in dispatch than
    its arithmetic. Here each step is a reduction, an elementwise op or an indexed load,
    which inductor fuses into a few generated loops with the surrounding residual adds:
    - Eq 10: the n_e logits as sum_d h_d R_ed (a reduction, like |h|^2 in `_rstd`);
    - Eq 11: the top-K by K rounds of argmax over the scores with the chosen entries
      masked out (K is 2-8; ties go to the lower table index, where ``topk`` leaves the
      order unspecified), then the sigmoid weights renormalised over the K;
    - Eq 12: the K rows read by index from the layer's (U, n, d) block and summed;
    - Eq 13 as in `_add_scaled_unit`.
    The values equal the eager path's up to the order of floating-point sums (tested)."""
    d = h_in.shape[-1]
    h_ND = _fp32(h_in.reshape(-1, d))
    router_ED = _fp32(layer.router)
    rstd_N1 = _rstd(h_ND, layer.norm_eps)
    logits_NE = (h_ND[:, None, :] * router_ED[None, :, :]).sum(-1) * rstd_N1  # Eq 10
    scores_NE = torch.sigmoid(logits_NE)
    masked_NE = scores_NE
    table_ids = torch.arange(scores_NE.shape[-1], device=scores_NE.device)
    rows_ND = _fp32(rows_UnD)[inverse_N]  # (N, n, d): the position's n candidate rows
    e_ND = None
    total_N1 = None
    for _ in range(layer.top_k):  # Eq 11: the k-th largest score, then mask it out
        pick_N1 = masked_NE.argmax(-1, keepdim=True)
        weight_N1 = scores_NE.gather(-1, pick_N1)
        row_ND = rows_ND.gather(1, pick_N1[:, :, None].expand(-1, 1, d)).squeeze(1)
        e_ND = weight_N1 * row_ND if e_ND is None else e_ND + weight_N1 * row_ND  # Eq 12
        total_N1 = weight_N1 if total_N1 is None else total_N1 + weight_N1
        masked_NE = torch.where(table_ids == pick_N1, float("-inf"), masked_NE)
    e_ND = e_ND / total_N1
    base = _fp32(h_tilde + m)
    e = e_ND.view(base.shape)
    h_out = _add_scaled_unit(base, e, _fp32(layer.scale), layer.residual_factor,
                             layer.eps)[0]  # Eq 13  # fmt: skip
    return h_out if h_out.dtype == h_tilde.dtype else h_out.to(h_tilde.dtype)
