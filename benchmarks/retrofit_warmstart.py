#!/usr/bin/env python3
"""How fast retrofitted tables start to learn from s = 0 (outputs unchanged at step 0)
against a small nonzero s, on a frozen tiny random Llama.

    python3 benchmarks/retrofit_warmstart.py [--steps 300] [--json OUT.json]

With s = 0 the tables (and JTok-M's routers) get exactly zero gradient until s moves:
Eq 9's gate is 1 + s u and Eq 13's update is s e / ||e|| / sqrt(2 N_l), so dL/dE carries a
factor s. s's own gradient is not zero, so Adam moves s by about its lr at step 1, and
from step 2 the tables get a gradient whose size Adam divides out. This script measures
what that costs against s = 1e-3 and 1e-2 (outputs changed at step 0), and shows the
kinds' native inits (s = 1 for JTok, sqrt(d) for JTok-M: not output-preserving) and s = 0
with a larger step for s (`--scale-lr-mults`, 10x by default) for reference.

Setting: a tiny `LlamaForCausalLM` (d = 64, 4 layers, V = 512) built from a config,
first trained briefly as a plain HF model (`--pretrain-steps`, all weights, AdamW) on a
Zipfian bigram chain A (next id = perm_x[z], z ~ Zipf(1.1), one random permutation per
current id x), then retrofitted, frozen, and trained on chain B: chain A with the next-token
law of half the current ids re-drawn (continued pretraining on shifted data). The frozen
model is right about half the tokens and confidently wrong about the rest, which tables
indexed by the current token are the tool to fix. (A backbone left at its random init is a
poor test bed: its head's logits have std ~0.2, so no change of the hidden state can lower
the loss much below log V.) Only tables, routers and scales train, with jtok's optimizers
(`Optimizers`: AdamW for s and routers, RowAdam for the tables at table_lr_mult = 30 x lr),
lr 3e-3 constant, gradient clipping at 1.0, as `jtok train` defaults. Every variant sees the
same batches; validation loss on 8 fixed batches of chain B. Counted, not timed: no lock
or pause of other jobs is needed.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from jtok.config import TrainConfig
from jtok.hf.retrofit import balance_loss, freeze_backbone, retrofit, retrofit_tables
from jtok.training.loop import clip_grad_norm_
from jtok.training.optim import Optimizers

VOCAB, D, LAYERS, SEQ, BATCH = 512, 64, 4, 64, 16
EVAL_AT = (0, 1, 2, 3, 5, 10, 20, 50, 100, 200, 300, 500, 1000)


class BigramChain:
    """Zipfian next-token law per current token: next = perm[x][z], z ~ Zipf(exponent)."""

    def __init__(self, vocab: int, exponent: float = 1.1, seed: int = 0):
        rng = np.random.default_rng(seed)
        probs = np.arange(1, vocab + 1, dtype=np.float64) ** -exponent
        self.probs = probs / probs.sum()
        self.perm = np.stack([rng.permutation(vocab) for _ in range(vocab)])
        self.vocab = vocab
        self.entropy = float(-(self.probs * np.log(self.probs)).sum())  # the loss floor

    def shifted(self, fraction: float, seed: int) -> BigramChain:
        """This chain with the next-token law of `fraction` of the current ids re-drawn."""
        rng = np.random.default_rng(seed)
        other = BigramChain.__new__(BigramChain)
        other.__dict__.update(self.__dict__)
        other.perm = self.perm.copy()
        for x in rng.choice(self.vocab, size=int(fraction * self.vocab), replace=False):
            other.perm[x] = rng.permutation(self.vocab)
        return other

    def batch(self, rng: np.random.Generator, batch: int, seq: int) -> torch.Tensor:
        ids = np.empty((batch, seq), dtype=np.int64)
        ids[:, 0] = rng.choice(self.vocab, size=batch, p=self.probs)
        ranks = rng.choice(self.vocab, size=(batch, seq), p=self.probs)
        for t in range(1, seq):
            ids[:, t] = self.perm[ids[:, t - 1], ranks[:, t]]
        return torch.from_numpy(ids)


def pretrained_backbone(chain: BigramChain, steps: int, seed: int) -> dict:
    """The state_dict of a tiny Llama trained (every weight, AdamW) on `chain` for `steps`."""
    config = LlamaConfig(hidden_size=D, intermediate_size=4 * D, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         max_position_embeddings=SEQ, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(seed + 2)
    for _ in range(steps):
        ids = chain.batch(rng, BATCH, SEQ)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return {"config": config, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def backbone(pretrained: dict) -> LlamaForCausalLM:
    model = LlamaForCausalLM(pretrained["config"])
    model.load_state_dict(pretrained["state"])
    return model


def table_grad_norm(model) -> float:
    grad = retrofit_tables(model).tables.weight.grad
    if grad is None:
        return 0.0
    values = grad.coalesce().values() if grad.is_sparse else grad
    return float(values.norm())


@torch.no_grad()
def eval_loss(model, batches) -> float:
    model.eval()
    losses = [float(model(input_ids=ids, labels=ids).loss) for ids in batches]
    model.train()
    return sum(losses) / len(losses)


def run_variant(kind: str, scale_init: float, scale_lr_mult: float, steps: int,
                chain: BigramChain, eval_batches, seed: int, pretrained: dict) -> dict:  # fmt: skip
    model = backbone(pretrained)
    retrofit(model, kind, n_e=5, top_k=2, scale_init=scale_init, seed=seed)
    freeze_backbone(model)
    model.train()
    train_cfg = TrainConfig(
        lr=3e-3, schedule="constant", warmup_steps=0, scale_lr_mult=scale_lr_mult,
        table_lr_mult=30.0,  # the multiplier the committed figures were measured with
    )  # the retrofit scales' own role ("scale")
    optimizers = Optimizers(model, train_cfg)
    params = [p for _, p, _ in optimizers.roles]
    mixers = retrofit_tables(model).mixers
    rng = np.random.default_rng(seed + 1)  # the same batches for every variant
    curve, grad_norms, scale_rms = {}, {}, {}
    for step in range(steps + 1):
        if step in EVAL_AT or step == steps:
            curve[step] = eval_loss(model, eval_batches)
            scale_rms[step] = float(torch.stack([m.scale.detach().pow(2).mean() for m in mixers])
                                    .mean().sqrt())  # fmt: skip
        if step == steps:
            break
        ids = chain.batch(rng, BATCH, SEQ)
        loss = model(input_ids=ids, labels=ids).loss
        aux = balance_loss(model)
        (loss + aux if aux is not None else loss).backward()
        if step < 10:
            grad_norms[step] = table_grad_norm(model)
        clip_grad_norm_(params, train_cfg.grad_clip)
        optimizers.step()
        optimizers.zero_grad()
    return {"kind": kind, "scale_init": scale_init, "scale_lr_mult": scale_lr_mult,
            "eval_loss": curve, "table_grad_norm": grad_norms, "scale_rms": scale_rms}  # fmt: skip


def steps_to(curve: dict[int, float], target: float) -> int | None:
    """The first evaluated step whose loss is at or below `target`."""
    return next((step for step, loss in sorted(curve.items()) if loss <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument(
        "--shift",
        type=float,
        default=0.5,
        help="fraction of current ids whose next-token law changes",
    )
    parser.add_argument(
        "--scale-lr-mults",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[10.0],
        help="lr multipliers of s tried with s0 = 0 (comma list)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the raw figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    source = BigramChain(VOCAB, seed=args.seed)
    pretrained = pretrained_backbone(source, args.pretrain_steps, args.seed)
    chain = source.shifted(args.shift, seed=args.seed + 3)
    eval_rng = np.random.default_rng(10_000 + args.seed)
    eval_batches = [chain.batch(eval_rng, BATCH, SEQ) for _ in range(8)]
    variants = []
    for kind, native in (("jtok", 1.0), ("jtokm", math.sqrt(D))):
        settings = [(0.0, 1.0), (1e-3, 1.0), (1e-2, 1.0)]
        settings += [(0.0, mult) for mult in args.scale_lr_mults] + [(native, 1.0)]
        for scale_init, mult in settings:
            result = run_variant(kind, scale_init, mult, args.steps, chain, eval_batches,
                                 args.seed, pretrained)  # fmt: skip
            variants.append(result)
            print(f"done {kind} s0={scale_init:g} x{mult:g}", flush=True)

    base = variants[0]["eval_loss"][0]  # s = 0: the frozen HF model itself
    source_batches = [source.batch(eval_rng, BATCH, SEQ) for _ in range(8)]
    source_loss = eval_loss(backbone(pretrained), source_batches)
    print(
        f"\nbackbone loss on chain A (pretraining) {source_loss:.4f}, on chain B (frozen, "
        f"step 0) {base:.4f}; loss floor (bigram entropy) {chain.entropy:.4f}"
    )
    shown = [s for s in EVAL_AT if s <= args.steps] + ([args.steps] if args.steps not in
                                                       EVAL_AT else [])  # fmt: skip
    header = ["kind", "s0", "s lr", *[f"L@{s}" for s in shown], "|g_E|@1", "|g_E|@2",
              "s_rms@end", "to -1%", "to -5%"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for v in variants:
        curve = v["eval_loss"]
        row = [v["kind"], f"{v['scale_init']:g}", f"x{v['scale_lr_mult']:g}",
               *[f"{curve[s]:.3f}" for s in shown],
               f"{v['table_grad_norm'].get(1, 0):.1e}", f"{v['table_grad_norm'].get(2, 0):.1e}",
               f"{v['scale_rms'][args.steps]:.3f}",
               str(steps_to(curve, 0.99 * base)), str(steps_to(curve, 0.95 * base))]  # fmt: skip
        print("| " + " | ".join(row) + " |")
    print(
        "\n|g_E|@k: norm of the table gradient at step k (0-based; exactly 0 at step 0 "
        "when s0 = 0). to -x%: first evaluated step with loss <= (1 - x) * frozen loss."
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"setting": {"vocab": VOCAB, "d": D, "layers": LAYERS, "seq": SEQ,
                                   "batch": BATCH, "steps": args.steps, "seed": args.seed,
                                   "pretrain_steps": args.pretrain_steps,
                                   "shift": args.shift, "source_loss": source_loss,
                                   "frozen_loss": base, "floor": chain.entropy},
                       "variants": variants}, out, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
