"""Loss of a model on token batches: autocast, the LM loss, evaluation and its report."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from jtok import data
from jtok.config import RunConfig


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CUDA under "auto"/"bf16"; full fp32 otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def lm_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
            token_rows=None):  # fmt: skip
    """(mean next-token cross-entropy, model output); `token_rows`: rows fetched ahead."""
    out = model(inputs) if token_rows is None else model(inputs, token_rows=token_rows)
    loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
    return loss, out


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, device: torch.device, precision: str) -> dict:
    """Summed loss and token count over an iterable of (inputs, targets)."""
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast_context(device, precision):
            logits = model(inputs).logits
        loss_sum += float(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                          reduction="sum"))  # fmt: skip
        tokens += targets.numel()
    model.train(was_training)
    return {"loss_sum": loss_sum, "tokens": tokens}


def loss_report(loss_sum: float, tokens: int, text_bytes: float, text_tokens: int) -> dict:
    """Mean loss (nats/token), perplexity and bits per byte over `tokens` evaluated targets.

    The text has `text_tokens` ids and `text_bytes` bytes. Windows never predict its first
    id, and a prefix (max tokens) covers only part of it: the bytes are scaled by the share
    of targets evaluated, assuming bytes per token are even across the text.
    """
    share = min(1.0, tokens / max(1, text_tokens - 1))
    text_bytes = text_bytes * share
    loss = loss_sum / max(tokens, 1)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": loss_sum / math.log(2) / text_bytes if text_bytes > 0 else float("nan"),
        "tokens": tokens,
    }


def open_validation(data_dir, split: str = "val"):
    """(the split's ids, memory-mapped, and its manifest entry), read once: a mapping holds
    the file it opened even after `jtok data prepare --overwrite` replaces the directory."""
    split_info = data.load_manifest(data_dir)["splits"][split]
    return data.open_split(data_dir, split), split_info


def validation(model, run_cfg: RunConfig, device, split: str = "val",
               max_tokens: int | None = None, data_dir=None, opened=None) -> dict:  # fmt: skip
    """Validation loss / ppl / bpb over (the first max_tokens of) a prepared split.

    Bits per byte need the bytes of the evaluated text: the manifest records them per
    split (see `loss_report` for a prefix). `data_dir` defaults to ``train.data``.
    `opened` = (tokens, split's manifest entry), from `open_validation`: what the trainer
    evaluates on at every eval, so that a data directory prepared again in its place during
    the run cannot swap the validation text under it.
    """
    train = run_cfg.train
    if opened is None:
        opened = open_validation(data_dir if data_dir is not None else train.data, split)
    tokens, split_info = opened
    result = evaluate(
        model,
        data.eval_batches(tokens, split, train.seq_len, train.batch_size, max_tokens),
        device, train.precision,
    )  # fmt: skip
    return loss_report(result["loss_sum"], result["tokens"], split_info["bytes"],
                       split_info["tokens"])  # fmt: skip
