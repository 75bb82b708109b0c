"""Autoregressive generation with the KV cache: many prompts of different lengths at once.

Prompts are left-padded into one batch (jtok.nn.model.KVCache keeps which slots are
padding and gives each row its own positions), prefilled in one forward, then decoded
one token per row and step. A row that stops (a stop id, its token budget, the model's
context) leaves the batch: the cache drops it, so finished rows cost nothing. Next
tokens come from jtok.inference.sampling, whose per-row draws do not depend on the batch.

With host tables (jtok.tables.host) the rows of the next tokens are requested as soon as
the tokens are chosen, and resolved only by the first table-carrying layer: the gather
runs while the cache is compacted and the embedding and attention compute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from jtok.errors import JTokError
from jtok.inference.compiled import compiled_forward
from jtok.inference.sampling import choose_next, filter_logits
from jtok.nn.model import JTokModel, KVCache
from jtok.tables.keys import inverse_to

__all__ = ["GenerationError", "filter_logits", "generate", "generate_batch"]


class GenerationError(JTokError, ValueError):
    """Generation was asked for something impossible (an empty prompt, top_p = 0, ...)."""


def _check_settings(model: JTokModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    temperature: float, top_k: int, top_p: float) -> None:  # fmt: skip
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0 or temperature == float("inf"):  # NaN fails >= too
        raise GenerationError(f"temperature must be finite and >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise GenerationError(f"top_k must be >= 0, got {top_k}")
    vocab = model.cfg.vocab_size
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerationError(f"prompt {i} is empty: a prompt needs at least one token")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise GenerationError(f"prompt {i} holds a token id outside [0, {vocab})")


def _stop_sets(stop_ids, n: int) -> list[frozenset[int]]:
    """One set of stop ids per prompt: the same ids for all, or one collection per prompt."""
    stop_ids = list(stop_ids)
    # An id is anything with __index__ (int, numpy or 0-d torch integers); a collection
    # that is not an id is one prompt's stop ids.
    if stop_ids and not any(hasattr(s, "__index__") for s in stop_ids):
        if len(stop_ids) != n:
            raise GenerationError(f"stop_ids: {len(stop_ids)} collections for {n} prompts")
        return [frozenset(int(i) for i in ids) for ids in stop_ids]
    return [frozenset(int(i) for i in stop_ids)] * n


@torch.no_grad()
def generate_batch(model: JTokModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                   stop_ids=(), batch_size: int | None = None, compile: bool = False,
                   ) -> list[list[int]]:  # fmt: skip
    """Continue every prompt; returns the new ids of each, in the prompts' order.

    temperature 0 is greedy. Prompt i samples with draws keyed by (seed, i), so its
    tokens do not depend on `batch_size` or on the other prompts. A row stops after
    `max_new_tokens`, when its context reaches max_seq_len, or at a stop id (which ends
    its list). `stop_ids`: ids for every prompt, or one collection of ids per prompt.
    `batch_size` caps how many rows run together (default: all); prompts are grouped by
    length, so a batch holds little padding. `compile`: run the model's forward under
    torch.compile (jtok.inference.compiled; compiled once per model and process).
    """
    _check_settings(model, prompts, max_new_tokens, temperature, top_k, top_p)
    stops = _stop_sets(stop_ids, len(prompts))
    if batch_size is not None and batch_size < 1:
        raise GenerationError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(model, JTokModel) and hasattr(model, "generate_batch"):
        # A retrofitted HF model (jtok.hf.retrofit_run.RetrofitLM) decodes with HF generate.
        if compile:
            raise GenerationError("compile is for jtok's own models; a retrofitted Hugging "
                                  "Face model decodes with its generate()")  # fmt: skip
        return model.generate_batch(prompts, max_new_tokens, temperature, top_k, top_p, seed,
                                    stops, batch_size)  # fmt: skip
    context = model.cfg.max_seq_len
    budgets = [min(max_new_tokens, context - len(p)) for p in prompts]
    # Longest first: similar lengths share a batch; the longest batch shows early whether
    # the cache fits in memory.
    order = sorted((i for i in range(len(prompts)) if budgets[i] > 0),
                   key=lambda i: -len(prompts[i]))  # fmt: skip
    size = batch_size or max(len(order), 1)
    results: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    forward = compiled_forward(model) if compile else model
    try:
        for begin in range(0, len(order), size):
            rows = order[begin : begin + size]
            news = _generate_rows(model, forward, [prompts[i] for i in rows], rows,
                                  [budgets[i] for i in rows], [stops[i] for i in rows],
                                  temperature, top_k, top_p, seed)  # fmt: skip
            for i, new in zip(rows, news, strict=True):
                results[i] = new
    finally:
        model.train(was_training)
    return results


def _generate_rows(model: JTokModel, forward, prompts: list[Sequence[int]], rows: list[int],
                   budgets: list[int], stops: list[frozenset[int]], temperature: float,
                   top_k: int, top_p: float, seed: int) -> list[list[int]]:  # fmt: skip
    """One batch: left-padded prefill, then one token per running row and step. `forward`
    is the model itself or its compiled forward."""
    param = next(model.parameters())
    device = param.device
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # id 0 in padding: never read
    for b, prompt in enumerate(prompts):
        ids[b, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
    pad = [width - n for n in lengths]
    # The last token chosen needs no slot.
    cache = KVCache.empty(model.cfg, len(prompts), max_len=width + max(budgets) - 1,
                          device=device, dtype=param.dtype, pad=pad)  # fmt: skip
    store = model.token_tables
    host_fetch = store is not None and hasattr(store, "fetch")

    logits_BV = forward(ids.to(device), cache=cache).logits[:, -1]
    out: list[list[int]] = [[] for _ in prompts]
    running = list(range(len(prompts)))  # batch rows of the cache, in order
    step = 0
    while True:
        chosen_B = choose_next(logits_BV, temperature, top_k, top_p, seed,
                               [rows[b] for b in running], step)  # fmt: skip
        # A row with a NaN or Inf logit reads -1, checked with the ids in the one sync per
        # step (stop checks need the ids): from a diverged checkpoint, at the prompt or any
        # later step, "completions" would be noise, not a result.
        chosen_B = torch.where(torch.isfinite(logits_BV).all(-1), chosen_B, -1)
        chosen = chosen_B.tolist()
        if -1 in chosen:
            raise GenerationError(f"the model's logits are not finite (NaN or Inf) at "
                                  f"generated token {step + 1}: the checkpoint has diverged")
        keep = []
        for j, b in enumerate(running):
            out[b].append(chosen[j])
            if chosen[j] not in stops[b] and len(out[b]) < budgets[b]:
                keep.append(j)
        if not keep:
            return out
        next_ids = torch.tensor([chosen[j] for j in keep], dtype=torch.long)[:, None]
        token_rows = None
        if host_fetch:  # start the gather now; the first table layer waits for it
            keys = store.key(next_ids)
            keys.inverse_N = inverse_to(keys.inverse_N, device)
            token_rows = store.consume(store.fetch(keys, device))
        if len(keep) < len(running):
            cache.select(torch.tensor(keep, device=device))
            running = [running[j] for j in keep]
        logits_BV = forward(next_ids.to(device), cache=cache,
                            token_rows=token_rows).logits[:, -1]  # fmt: skip
        step += 1


def generate(model: JTokModel, prompt_ids: Sequence[int], max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_id: int | None = None) -> list[int]:  # fmt: skip
    """Continue one prompt; returns only the new ids. temperature 0 means greedy.

    Stops after max_new_tokens, at `stop_id` (the last id returned), or when the context
    reaches max_seq_len. The batch of one of `generate_batch`."""
    stop_ids = () if stop_id is None else (stop_id,)
    return generate_batch(model, [prompt_ids], max_new_tokens, temperature, top_k, top_p,
                          seed, stop_ids)[0]  # fmt: skip
