"""Choosing the next token of many rows at once: greedy, or sampled with temperature,
top-k and top-p (nucleus).

Sampling draws one uniform number per row from a counter-based hash of (seed, row,
step), not from a shared generator, so a row's tokens depend on its own index and never
on which rows share its batch, how many there are, or the device: a prompt generated
alone, in a batch of 64 or after others have finished samples the same tokens (given the
same probabilities). The draw is then inverse-CDF sampling over the filtered
distribution, vectorised over rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
# Below this, logits / temperature can overflow float32 (|logit| ~ 30 / 1e-37 > 3.4e38).
_TINY_TEMPERATURE = 1e-30


def _splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele et al. 2014): a bijective, well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_uniform(seed: int, row: int, step: int) -> float:
    """A uniform number in [0, 1) for (seed, row, step): 53 random bits, a pure function."""
    h = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (row & _MASK64)) ^ (step & _MASK64))
    return (h >> 11) * 2.0**-53


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set to -inf every logit outside the top_k and outside the top_p probability mass.

    Works on (..., V), one distribution per row. Ties with the k-th logit are kept. For
    top_p a token is dropped when the mass of the tokens before it already reaches top_p
    (the most likely token always stays)."""
    logits = logits.clone()
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits.masked_fill_(drop, float("-inf"))
    return logits


def choose_next(logits_BV: Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                seed: int = 0, rows: Sequence[int] | None = None, step: int = 0,
                ) -> Tensor:  # fmt: skip
    """The next token id (B,) of each row. temperature 0: the argmax (greedy).

    Otherwise row b samples with the uniform of (seed, rows[b], step) (rows default to
    0..B-1) from
    softmax(filter(logits / temperature)): the first token whose cumulative probability
    exceeds u * total (in float64, so a token of probability 0 is never chosen)."""
    if temperature <= 0:
        return logits_BV.argmax(-1)
    logits = logits_BV.float()
    if temperature < _TINY_TEMPERATURE:
        # logits / 1e-40 overflows to inf in float32 (and / 1e-300, a float32 zero, gives
        # 0 / 0): the softmax's inf - inf gave NaN probabilities, which the search turned
        # into the last id. Shifted so that the largest logit is 0, with the temperature at
        # least float32's smallest normal number, the quotients are <= 0 (-inf at worst)
        # and a tiny temperature samples the argmax. Ordinary temperatures keep the plain
        # quotient: the shift rounds differently and would change about one draw in 40,000.
        logits = logits - logits.max(dim=-1, keepdim=True).values
        temperature = max(temperature, torch.finfo(torch.float32).tiny)
    filtered = filter_logits(logits / temperature, top_k, top_p)
    cdf_BV = torch.softmax(filtered.double(), dim=-1).cumsum(-1)
    total_B1 = cdf_BV[:, -1:]
    rows = range(logits_BV.shape[0]) if rows is None else rows
    if len(rows) != logits_BV.shape[0]:
        raise ValueError(f"{len(rows)} row indices for {logits_BV.shape[0]} rows of logits")
    uniforms = [row_uniform(seed, row, step) for row in rows]
    u_B1 = torch.tensor(uniforms, dtype=torch.float64).to(cdf_BV.device, non_blocking=True)
    # Strictly below the total, so the search always lands on a token of positive mass.
    value_B1 = torch.minimum(u_B1[:, None] * total_B1, torch.nextafter(total_B1, total_B1 * 0))
    choice = torch.searchsorted(cdf_BV, value_B1, right=True).squeeze(1)
    return choice.clamp_max(logits_BV.shape[-1] - 1)
