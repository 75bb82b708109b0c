"""Autoregressive sampling with the KV cache: temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import torch

from jtok.nn.model import JTokModel, KVCache


def filter_logits(logits_V: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top_k and outside the top_p probability mass."""
    logits_V = logits_V.clone()
    if 0 < top_k < logits_V.shape[-1]:
        kth = torch.topk(logits_V, top_k).values[-1]
        logits_V[logits_V < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits_V, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the first one stays).
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        logits_V[order[drop_sorted]] = float("-inf")
    return logits_V


@torch.no_grad()
def generate(model: JTokModel, prompt_ids: list[int], max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_id: int | None = None) -> list[int]:  # fmt: skip
    """Continue `prompt_ids`; returns only the new ids. temperature 0 means greedy.

    Stops after max_new_tokens, at `stop_id`, or when the context reaches max_seq_len.
    """
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    model.eval()
    device = next(model.parameters()).device
    budget = min(max_new_tokens, model.cfg.max_seq_len - len(prompt_ids))
    if budget <= 0:
        return []
    gen = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache.empty(model.cfg, batch=1, max_len=len(prompt_ids) + budget, device=device,
                          dtype=next(model.parameters()).dtype)  # fmt: skip
    logits = model(torch.tensor([prompt_ids], device=device), cache=cache).logits[0, -1]
    new_ids: list[int] = []
    for _ in range(budget):
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            filtered = filter_logits(logits.float() / temperature, top_k, top_p)
            probs = torch.softmax(filtered, dim=-1)
            next_id = int(torch.multinomial(probs, 1, generator=gen))
        new_ids.append(next_id)
        if next_id == stop_id or len(new_ids) == budget:
            break
        logits = model(torch.tensor([[next_id]], device=device), cache=cache).logits[0, -1]
    return new_ids
