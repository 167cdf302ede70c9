#!/usr/bin/env bash
# Run several jobs at once on a machine of several GPUs, one GPU each, within one device command:
#   bash tests/gpu/on-gpus.sh LIMIT_S "GPU=command" ["GPU=command" ...]
# Job N sees only its GPU (CUDA_VISIBLE_DEVICES) and gets PORT=30000+2000*N (SGLang picks its side ports at random
# offsets below 1000 from --port; the visit scripts also name their scratch folders after PORT) and its own
# OUT=$OUT/jobN; its output goes to $OUT/jobN.log. A job still running after LIMIT_S seconds is stopped (SIGTERM, then SIGKILL), and every server
# left behind is stopped. The device returns at most 8 files, so everything under $OUT ends up in $OUT/jobs.tgz;
# each job's last lines are printed as the summary.
set -uo pipefail
cd "$(dirname "$0")/../.."
TMP=${TMPDIR:-/tmp}
OUT=${OUT:-$TMP/gpus-out}; mkdir -p "$OUT"
limit=$1; shift
pids=()
n=0
for job in "$@"; do
  gpu=${job%%=*}; cmd=${job#*=}
  mkdir -p "$OUT/job$n"
  ( export CUDA_VISIBLE_DEVICES=$gpu PORT=$((30000 + 2000 * n)) OUT=$OUT/job$n
    exec timeout -k 20 "$limit" bash -c "$cmd" ) > "$OUT/job$n.log" 2>&1 &
  pids+=($!); echo "job$n on GPU $gpu (pid $!): $cmd"
  n=$((n + 1))
done
rcs=()
for pid in "${pids[@]}"; do wait "$pid"; rcs+=($?); done
pkill -f sglang.launch_server 2>/dev/null; pkill -f "locust" 2>/dev/null; sleep 2
(cd "$OUT" && tar czf "$TMP/jobs.tgz" -- * && rm -rf -- ./* && mv "$TMP/jobs.tgz" .)
for i in "${!pids[@]}"; do
  echo "=== job$i rc ${rcs[$i]} (124: stopped at the ${limit} s limit)"
  tar xzf "$OUT/jobs.tgz" -O "job$i.log" 2>/dev/null | tail -n "${TAIL_LINES:-12}"
done
