#!/bin/bash
# Adaptive vs uniform layer budgets on the CPU reference loop (resumable: rerun skips finished rows).
cd "$(dirname "$0")/../../.."
OUT=benchmarks/results/layer-budget-20261201-cpu
RUN="env PYTHONPATH=$PWD /work/main/.venv/bin/python benchmarks/quality/run.py --backend reference \
  --model qwen2.5-coder-0.5b --policies topk,ams --set delta=0.02 --set prefill_window=true \
  --layer-budgets uniform,adaptive --threads 2 --no-progress --out $OUT"
NEEDLE="--tasks needle --limit 0 --max-new-tokens needle=12 --needle-lengths 1000,2000 --needle-depths 0.1,0.3,0.5,0.7,0.9"
set -x
$RUN $NEEDLE --needle-seeds 1 --budgets 0.1 --scorers snapkv,keydiff
$RUN --tasks kv_retrieval --limit 4 --kv-keys 25 --max-new-tokens kv_retrieval=40 --budgets 0.1 --scorers snapkv,keydiff
$RUN $NEEDLE --needle-seeds 1 --budgets 0.25,0.5 --scorers snapkv,keydiff
$RUN --tasks kv_retrieval --limit 4 --kv-keys 25 --max-new-tokens kv_retrieval=40 --budgets 0.25,0.5 --scorers snapkv,keydiff
$RUN $NEEDLE --needle-seeds 3 --budgets 0.1 --scorers snapkv,keydiff
