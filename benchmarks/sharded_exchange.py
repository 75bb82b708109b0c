#!/usr/bin/env python3
"""Bytes the sharded table store exchanges per step: raw rows (what jtok sends today) vs
rows pre-mixed at their owner (one d-vector per position and layer), at Zipfian batches.

    python3 benchmarks/sharded_exchange.py [--json] [--preset small] [--tokens 2048]

Counted, not timed: for a batch of B x T Zipf-distributed ids (the token statistics of
text), U distinct ids are asked for. Raw rows: every process receives L x U x n rows of d
(its distinct ids' rows in every table of every table-carrying layer), and sends back as
many row gradients. Pre-mixed: the owner mixes JTok-M's K routed rows with the router's
weights, so one d-vector per (position, layer) travels, plus the K weights and indices
with the keys, and the same on the way back (the gradient of the vector, then dL/dw_i).
Ids in the forward (8 bytes each) travel either way. fp32 (4 bytes per element).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from jtok.presets import preset


def zipf_distinct(vocab: int, tokens: int, exponent: float, rng) -> int:
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    probs = ranks ** -exponent
    probs /= probs.sum()
    return int(np.unique(rng.choice(vocab, size=tokens, p=probs)).size)


def exchange(cfg, tokens: int, distinct: int) -> dict:
    L, d = len(cfg.tokmod_layers), cfg.d_model
    n, K = cfg.tokmod.tables_per_layer, cfg.tokmod.top_k if cfg.tokmod.kind == "jtokm" else 1
    ids = 8 * L * distinct * n  # row addresses, forward only
    raw = 2 * 4 * L * distinct * n * d  # rows forward + row gradients backward
    # Pre-mixed: per (position, layer) one d-vector each way, K weights + K table indices
    # with the request, and K weight gradients back.
    premixed = 2 * 4 * L * tokens * d + L * tokens * K * (4 + 8 + 4)
    return {"tokens": tokens, "distinct_ids": distinct, "layers": L, "tables_per_layer": n,
            "top_k": K, "d": d, "id_bytes": ids, "raw_rows_bytes": raw + ids,
            "premixed_bytes": premixed + 8 * L * distinct,
            "raw_over_premixed": (raw + ids) / (premixed + 8 * L * distinct)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    parser.add_argument("--exponent", type=float, default=1.1, help="Zipf exponent of the ids")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for kind, n_e, k in (("jtok", 1, 1), ("jtokm", 5, 2), ("jtokm", 16, 4)):
        cfg = preset(args.preset).with_overrides({"tokmod.kind": kind, "tokmod.n_e": str(n_e),
                                                  "tokmod.top_k": str(k)})  # fmt: skip
        for tokens in args.tokens:
            distinct = zipf_distinct(cfg.vocab_size, tokens, args.exponent, rng)
            rows.append({"variant": f"{kind} n_e={cfg.tokmod.tables_per_layer} K={k}",
                         **exchange(cfg, tokens, distinct)})
    if args.json:
        print(json.dumps({"preset": args.preset, "zipf_exponent": args.exponent, "rows": rows}))
        return
    print(f"{'variant':<18}{'tokens':>8}{'distinct':>10}{'raw MB':>10}{'premixed MB':>13}"
          f"{'raw/premixed':>14}")
    for r in rows:
        print(f"{r['variant']:<18}{r['tokens']:>8}{r['distinct_ids']:>10}"
              f"{r['raw_rows_bytes'] / 1e6:>10.2f}{r['premixed_bytes'] / 1e6:>13.2f}"
              f"{r['raw_over_premixed']:>14.2f}")


if __name__ == "__main__":
    main()
