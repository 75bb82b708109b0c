"""Cross-check (issue 14): one jtok run scored on the bundled benchmarks two ways.

1. jtok's own lm-eval model (`JTokLM`, what `jtok eval --tasks` uses) on the run;
2. lm-eval's own Hugging Face model (`hf`, what anyone scoring an HF checkpoint uses) on
   `jtok export`'s folder, loaded through the Auto classes that `import jtok.hf` registers.

The same tasks (jtok's offline copies), items, batch size and seeds: the accuracies must
be equal and every per-choice log-likelihood equal to fp32 rounding. Prints one JSON
object (and writes it with --out).

    python3 benchmarks/lm_eval_crosscheck.py --run results/downstream/runs/jtokm__D3e+06 \
        --tasks arc_easy,arc_challenge,hellaswag,piqa,sciq,mmlu --limit 20 \
        --out results/downstream/crosscheck.json
Needs `pip install -e ".[dev]"` (lm-eval, transformers and accelerate, which lm-eval's hf
model imports).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def score(model, model_args, names, manager, limit, batch_size):
    import lm_eval

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=names, limit=limit,
                                   task_manager=manager, log_samples=True,
                                   batch_size=batch_size, bootstrap_iters=0, random_seed=0,
                                   numpy_random_seed=1234, torch_random_seed=1234,
                                   fewshot_random_seed=1234)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--tasks", default="arc_easy,arc_challenge,hellaswag,piqa,sciq,mmlu")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from jtok.cli import main as jtok_main
    from jtok.evaluation import benchmarks
    from jtok.evaluation.harness import _offline, _task_manager
    from jtok.evaluation.lm_eval_model import JTokLM

    _offline()
    names = [t for t in args.tasks.split(",") if t]
    with tempfile.TemporaryDirectory(prefix="jtok-crosscheck-") as scratch:
        scratch = Path(scratch)
        export = scratch / "export"
        if jtok_main(["export", "--run", str(args.run), "--out", str(export)]) != 0:
            return 1
        tasks = scratch / "tasks"
        tasks.mkdir()
        benchmarks.write_task_configs(benchmarks.benchmark_data(), tasks,
                                      [n for n in names if n in benchmarks.BENCHMARKS])
        manager = _task_manager(argparse.Namespace(verbose=False), names, [tasks])
        ours = score(JTokLM(run=args.run, batch_size=args.batch_size), None, names, manager,
                     args.limit, args.batch_size)  # fmt: skip
        theirs = score("hf", f"pretrained={export},dtype=float32,device=cpu", names, manager,
                       args.limit, args.batch_size)  # fmt: skip

    report = {"run": str(args.run), "limit": args.limit, "tasks": {}}
    for task in sorted(ours["samples"]):
        pairs = list(zip(ours["samples"][task], theirs["samples"][task], strict=True))
        worst = max(abs(a[0] - b[0]) for x, y in pairs
                    for a, b in zip(x["filtered_resps"], y["filtered_resps"], strict=True))
        row = {"n": len(pairs), "max_abs_loglikelihood_diff": worst}
        for metric in ("acc", "acc_norm"):
            if metric in pairs[0][0]:
                row[metric] = {"jtok": sum(x[metric] for x, _ in pairs) / len(pairs),
                               "hf": sum(y[metric] for _, y in pairs) / len(pairs),
                               "items_that_differ": sum(x[metric] != y[metric] for x, y in pairs)}
        report["tasks"][task] = row
    rows = report["tasks"].values()
    report["all_equal"] = all(r[m]["items_that_differ"] == 0 for r in rows
                              for m in ("acc", "acc_norm") if m in r)  # fmt: skip
    report["max_abs_loglikelihood_diff"] = max(r["max_abs_loglikelihood_diff"] for r in rows)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0 if report["all_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
