#!/usr/bin/env python3
"""Bytes the sharded table store exchanges per step: raw rows vs rows pre-mixed at their
owner (one d-vector per position and layer), at Zipfian batches, and the path its rule
picks.

    python3 benchmarks/sharded_exchange.py [--json] [--preset small] [--tokens 2048]

Counted, not timed, with the store's own byte counts (jtok.tables.sharded_premix, which the
multi-process tests check against the bytes its all-to-alls really send): for a batch of
B x T Zipf-distributed ids (the token statistics of text) a process asks for U distinct
ids. Raw rows: L x U x n row addresses out (int64), as many fp32 rows of d back, and in
backward as many row gradients out. Pre-mixed: per (position, layer) a request of the
group's int32 address, K int32 table indices and K fp32 weights, one mixed d-vector back,
and in backward its gradient out and the K weight gradients back. Counted as if every
owner were another process; with W processes (W - 1) / W of both travel, so the ratio and
the choice stay. fp32 rows.
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
    from jtok.tables.sharded import choose_path
    from jtok.tables.sharded_premix import premix_entry_bytes, raw_row_bytes

    L, d = len(cfg.tokmod_layers), cfg.d_model
    n, K = cfg.tokmod.tables_per_layer, cfg.tokmod.top_k if cfg.tokmod.kind == "jtokm" else 1
    raw = L * distinct * n * raw_row_bytes(d, backward=True)
    premixed = L * tokens * premix_entry_bytes(d, K, backward=True)
    return {"tokens": tokens, "distinct_ids": distinct, "layers": L, "tables_per_layer": n,
            "top_k": K, "d": d, "raw_rows_bytes": raw, "premixed_bytes": premixed,
            "raw_over_premixed": raw / premixed,
            "rule_picks": choose_path("auto", raw, premixed, can_premix=n > 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--tokens", type=int, nargs="+",
                        default=[512, 2048, 8192, 16384, 32768, 131072])
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
          f"{'raw/premixed':>14}{'picks':>10}")
    for r in rows:
        print(f"{r['variant']:<18}{r['tokens']:>8}{r['distinct_ids']:>10}"
              f"{r['raw_rows_bytes'] / 1e6:>10.2f}{r['premixed_bytes'] / 1e6:>13.2f}"
              f"{r['raw_over_premixed']:>14.2f}{r['rule_picks']:>10}")


if __name__ == "__main__":
    main()
