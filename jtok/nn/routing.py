"""Top-k routing and the Switch-style load-balancing loss.

Shared by the MoE FFN (routing tokens to experts) and by JTok-M (routing tokens to
modulators, METHOD.md Eq 10-11), so both use the same, tested arithmetic.
"""

from __future__ import annotations

import torch
from torch import Tensor


def route_topk(
    logits_TE: Tensor,
    k: int,
    score_func: str,
    renormalize: bool,
    selection_bias_E: Tensor | None = None,
    need_probs: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Pick the top-k of E choices per row; all arithmetic in fp32.

    Returns ``(weights_TK, index_TK, probs_TE)``: the mixing weights of the chosen
    entries, their indices, and a distribution over all E choices per row (used by
    `balance_loss`; None when not `need_probs`, e.g. in inference). With
    ``score_func="sigmoid"`` the distribution is the sigmoid scores normalised to sum to 1,
    the same normalisation the weights get over the top-k.
    ``selection_bias_E`` shifts which entries are chosen, never their weights
    (auxiliary-loss-free balancing, DeepSeek-V3).
    """
    if logits_TE.dtype != torch.float32:
        logits_TE = logits_TE.float()
    probs_TE = None
    if score_func == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
        if need_probs:
            probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
    elif score_func == "softmax":
        scores_TE = probs_TE = torch.softmax(logits_TE, dim=-1)
    else:
        raise ValueError(f"unknown score function {score_func!r}")
    if selection_bias_E is None:
        # topk's values are the chosen scores themselves: no gather needed.
        weights_TK, index_TK = scores_TE.topk(k, dim=-1, sorted=False)
    else:
        index_TK = (scores_TE + selection_bias_E).topk(k, dim=-1, sorted=False).indices
        weights_TK = scores_TE.gather(-1, index_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    return weights_TK, index_TK, probs_TE


def selection_counts(index_TK: Tensor, n_choices: int) -> Tensor:
    """How many (row, slot) selections each of the n choices received (int64).

    A scatter-add into n zeros, not `bincount`: the same counts, but bincount's output
    length depends on the largest index (a data-dependent shape), which breaks a
    torch.compile graph at every layer that routes."""
    flat = index_TK.flatten()
    return torch.zeros(n_choices, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.long))


def balance_loss(probs_TE: Tensor, index_TK: Tensor) -> Tensor:
    """Switch-style load-balancing loss ``n * sum_i P_i * f_i`` (without its lambda).

    P_i is the mean probability of choice i over the rows, f_i the fraction of all
    (row, slot) selections that went to i. Both sum to 1, so the loss is 1 under a
    perfectly uniform load and grows as load concentrates. f is a count and carries no
    gradient; the gradient flows through P.
    """
    n_choices = probs_TE.shape[-1]
    fraction_E = selection_counts(index_TK, n_choices).to(probs_TE.dtype) / index_TK.numel()
    return n_choices * torch.dot(probs_TE.mean(0), fraction_E)
