#!/usr/bin/env bash
# The serving benchmark (benchmarks/serving.py: SGLang's own bench_serving client) on the GPU machine with the kit of
# ../shared/gpu, in calls of < 10 minutes:
#   run 1:  bash .gpu/sglang-kit/c1/unpack.sh                                                 (carry c1)
#   run 2:  bash .gpu/sglang-kit/c2/unpack.sh && bash benchmarks/serving-visit.sh setup run   (carry c2, tools, jit,
#           .gpu/plugin)
#   run 3+: WORKLOADS=... CONFIGS=... bash benchmarks/serving-visit.sh run                    (results accumulate in $SV)
# Phases: setup (plugin wheel into the kit's site, Llama-3-8B-shaped dummy model + WordLevel tokenizer of 32000
# words, context 32768), checks (the GPU tests of the decode hooks), run, start + wait (the driver in the
# background across several device calls, for runs past one call's 10 minutes; WAIT_S per call), savejit; any
# phase exits 3 at once on a cold machine.
# Settings (environment):
#   WORKLOADS  long_reasoning,heavy_pressure,short_chat,long_prompts,shared_prefix (default: short_chat)
#   CONFIGS    production,ams,topk,full (default production,ams)    REPEATS (2)   FIRST_REPEAT (1)   SCALE (1)
#   COUNT_SCALE  factor on request counts only (1; shared_prefix's 192 requests may need 3+ for the 60 s asked)
#   SERVER_ARGS  flags for every server (default: dummy weights, flashinfer on both sides as in the issue,
#                --stream-interval 8: at 1 the output path capped both servers at ~4.4k tok/s on the H200 machine,
#                and decode graphs to batch 512 on both, as README's serving section advises with a policy on;
#                runs whose NOTES.md name no --cuda-graph-max-bs-decode ran at SGLang's 256)
#   POLICY_ARGS  flags for ams/topk servers     LIMIT_S  seconds for the driver (570; it stops its server then)
#   PORT (30000; tests/gpu/on-gpus.sh gives each job its own)   SV  the results folder ($TMP/serving-$PORT)
#   CHECK_FILES  the test files `checks` runs (default: test_ring_store.py test_flashinfer_lse.py test_select_kernel.py)
# Several GPUs: `setup` once, then tests/gpu/on-gpus.sh 590 "0=CONFIGS=production bash benchmarks/serving-visit.sh run"
# "1=CONFIGS=ams bash benchmarks/serving-visit.sh run" ... (each job gets its PORT, so its own $SV, and its $OUT);
# combine the summaries on the CPU side: python benchmarks/serving.py --merge DIR... --out benchmarks/results/serving-...
# The server needs its tokenizer (no --skip-tokenizer-init): bench_serving counts streamed text.
# $OUT gets summary.json, summary.md, summary.png and runs.tgz (server and client logs); the table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
TMP=${TMPDIR:-/tmp}            # scratch on the GPU machine
OUT=${OUT:-$TMP/serving-out}; mkdir -p "$OUT"
# A cold machine (the lease went back between calls) has neither the kit nor $SV: stop at once, not after WAIT_S.
source .gpu/sglang-kit/tools/env.sh 2>/dev/null && [ -f "$KIT_SITE/sglang/__init__.py" ] ||
  { echo "serving-visit: no kit on this machine (it went cold): start again from c1"; exit 3; }
MODEL=$TMP/llama8b-tok
PORT=${PORT:-30000}
SV=${SV:-$TMP/serving-$PORT}
SUMMARY=()
TABLE=""
DEFAULT_SERVER_ARGS="--load-format dummy --attention-backend flashinfer --stream-interval 8 --cuda-graph-max-bs-decode 512"
say() { SUMMARY+=("$*"); echo "### $*"; }

for phase in "$@"; do
  t0=$(date +%s)
  case $phase in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$KIT_SITE" .gpu/plugin/*.whl \
      > "$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
    python3 .gpu/sglang-kit/tools/mkmodel.py "$MODEL" 8b > /dev/null
    # JIT caches of the 8B shape on an H200 (saved 2026-12-01; head_dim 128 otherwise compiles ~210 s)
    bash .gpu/sglang-kit/tools/jit-cache.sh restore tests/gpu/jit-h200 > /dev/null
    python3 benchmarks/serving_model.py tokenizer "$MODEL" --vocab-size 32000 --max-positions 32768 || exit 1
    ds=$(python3 -c "import datasets" 2>/dev/null && echo real || echo "stand-in (benchmarks/serving_shim)")
    say "setup: plugin $(python3 -c 'import importlib.metadata as m; print(m.version("sglang-ams"))'), model $MODEL, datasets: $ds";;
  run)
    mkdir -p "$SV"
    timeout -k 20 "${LIMIT_S:-570}" python3 benchmarks/serving.py --model-path "$MODEL" --python python3 \
      --client-python python3 --workloads "${WORKLOADS:-short_chat}" --configs "${CONFIGS:-production,ams}" \
      --repeats "${REPEATS:-2}" --first-repeat "${FIRST_REPEAT:-1}" --scale "${SCALE:-1}" \
      --count-scale "${COUNT_SCALE:-1}" --port "$PORT" \
      --server-args="${SERVER_ARGS:-$DEFAULT_SERVER_ARGS}" \
      --policy-args="${POLICY_ARGS:-}" --run-timeout "${RUN_TIMEOUT:-480}" --startup-timeout 400 --out "$SV" \
      --deadline $(( ${LIMIT_S:-570} - 15 )) > "$OUT/serving.log" 2>&1
    rc=$?
    cp "$SV"/summary.json "$SV"/summary.md "$SV"/summary.png "$OUT/" 2>/dev/null
    (cd "$SV" && tar czf "$OUT/runs.tgz" runs 2>/dev/null)
    grep -E '^\[[0-9]+/[0-9]+\] [a-z_]+_r[0-9]+: ' "$OUT/serving.log" | grep -v -E ': (starting|stopping) server|: running ' | tail -20
    n=$(python3 -c "import json, sys; print(len(json.load(open(sys.argv[1]))['entries']))" "$SV/summary.json" 2>/dev/null)
    say "run: driver rc $rc (124: stopped at LIMIT_S; 3: a run not started, it would have passed LIMIT_S), ${n:-0} entries in $SV"
    TABLE=$(sed -n '/^wrote /,$p' "$OUT/serving.log" | tail -n +2);;
  start)     # the same driver in the background, for runs longer than one device call (heavy_pressure)
    mkdir -p "$SV"; rm -f "$SV/driver.done"
    (setsid nohup bash -c "timeout -k 20 ${LIMIT_S:-3000} python3 benchmarks/serving.py --model-path $MODEL \
      --python python3 --client-python python3 --workloads ${WORKLOADS:-short_chat} --configs ${CONFIGS:-production,ams} \
      --repeats ${REPEATS:-2} --first-repeat ${FIRST_REPEAT:-1} --scale ${SCALE:-1} --count-scale ${COUNT_SCALE:-1} \
      --port $PORT --server-args='${SERVER_ARGS:-$DEFAULT_SERVER_ARGS}' \
      --policy-args='${POLICY_ARGS:-}' --run-timeout ${RUN_TIMEOUT:-2400} --startup-timeout 400 --out $SV \
      --deadline $(( ${LIMIT_S:-3000} - 15 )); \
      echo \$? > $SV/driver.done" > "$SV/driver.log" 2>&1 < /dev/null &)
    say "start: driver in the background, log $SV/driver.log";;
  wait)      # WAIT_S seconds at most (keep it under the call's limit); then what has finished so far
    [ -f "$SV/driver.log" ] || { echo "serving-visit: no driver in $SV (the machine went cold?)"; exit 3; }
    for _ in $(seq "${WAIT_S:-540}"); do [ -f "$SV/driver.done" ] && break; sleep 1; done
    grep -E '^\[[0-9]+/[0-9]+\] [a-z_]+_r[0-9]+: ' "$SV/driver.log" | tail -6
    cp "$SV"/summary.json "$SV"/summary.md "$SV"/summary.png "$SV/driver.log" "$OUT/" 2>/dev/null
    (cd "$SV" && tar czf "$OUT/runs.tgz" runs 2>/dev/null)
    say "wait: $( [ -f "$SV/driver.done" ] && echo "driver exited $(cat "$SV/driver.done")" || echo "still running")";;
  checks)    # GPU tests: the decode-path hooks (fused ring store under graph capture, FlashInfer's LSE) and the
             # selection kernel against the torch selection at 8B chunk shapes
    # CHECK_FILES narrows them (all three took 135 s on the 2026-12-08 H100, the kernels compiling included)
    (cd tests && python3 -m pytest -q -m gpu -p no:cacheprovider --rootdir=. \
      ${CHECK_FILES:-test_ring_store.py test_flashinfer_lse.py test_select_kernel.py}) \
      > "$OUT/checks.log" 2>&1
    say "checks: $(tail -1 "$OUT/checks.log")";;
  savejit)
    bash .gpu/sglang-kit/tools/jit-cache.sh save "$OUT/jit" > /dev/null 2>&1; say "savejit: $(ls "$OUT/jit" | tr '\n' ' ')";;
  *) echo "unknown phase $phase (setup, checks, run, start, wait, savejit)"; exit 2;;
  esac
  echo "($phase: $(( $(date +%s) - t0 )) s)"
done
printf '%s\n' "${SUMMARY[@]}"
if [ -n "$TABLE" ]; then printf '%s\n' "--- means over repeats ($SV/summary.md)" "$TABLE"; fi
