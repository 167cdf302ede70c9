#!/bin/bash
# Issue 20, the missing rows: adaptive vs uniform layer budgets at equal total KV, CPU reference loop, snapkv only.
# Resumable: a rerun with the same --out skips finished rows. Phases in order of value, run one at a time:
#   cd benchmarks/results/layer-budget-20261202-cpu && nohup nice -n 10 ./sweep.sh a >> sweep.log 2>&1 &
# a: kv_retrieval 0.5B, 8 examples at 25 % then 50 % of the prompt; a0: full KV on the same 8 (reference only)
# b: GSM8K CoT 0.5B, 8 problems, budget 50 % of the 256-token generation (128 tokens); b0: full KV on them
# c: needle 1.5B at 10 % of the prompt, the 10 prompts of the 20261201 grid
cd "$(dirname "$0")/../../.."
OUT=benchmarks/results/layer-budget-20261202-cpu
BASE="env PYTHONPATH=$PWD /work/main/.venv/bin/python benchmarks/quality/run.py --backend reference \
  --threads 1 --no-progress --out $OUT"
RUN="$BASE --policies topk,ams --scorers snapkv --set delta=0.02 --set prefill_window=true \
  --layer-budgets uniform,adaptive"
KV="--tasks kv_retrieval --limit 8 --kv-keys 25 --max-new-tokens kv_retrieval=40"
GSM="--tasks gsm8k_cot --limit 8 --max-new-tokens gsm8k_cot=256"
NEEDLE="--tasks needle --limit 0 --max-new-tokens needle=12 --needle-lengths 1000,2000 \
  --needle-depths 0.1,0.3,0.5,0.7,0.9 --needle-seeds 1"
set -x
case "$1" in
  a) $RUN --model qwen2.5-coder-0.5b $KV --budgets 0.25
     $RUN --model qwen2.5-coder-0.5b $KV --budgets 0.5 ;;
  a0) $BASE --policies none --model qwen2.5-coder-0.5b $KV ;;
  b) $RUN --model qwen2.5-coder-0.5b $GSM --budgets 0.5 ;;
  b0) $BASE --policies none --model qwen2.5-coder-0.5b $GSM ;;
  c) $RUN --model qwen2.5-coder-1.5b $NEEDLE --budgets 0.1 ;;
esac
