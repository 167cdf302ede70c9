#!/usr/bin/env bash
# The quality harness's server backend on the GPU machine (after tests/gpu/visit.sh setup, and build:NAME for a
# model other than SmolLM2): starts one policy server with the harness's flags (per-request overrides then run
# every policy, scorer and budget through it) and runs the harness into OUT/quality.
#   bash benchmarks/quality/gpu-visit.sh DATA_DIR [MODEL_DIR]
# Environment:
#   MODEL_NAME    sglang_ams.models name of MODEL_DIR (default smollm2-135m; MODEL_DIR default $TMP/smollm2 for it,
#                 $TMP/models/NAME otherwise; TMP = $TMPDIR or /tmp, as in tests/gpu/visit.sh)
#   QUALITY_ARGS  run.py arguments (default: GSM8K CoT, 8 questions, 256 tokens, budget 25 %, none/topk/ams)
#   QUALITY_LIMIT seconds the harness may run (it is stopped then, SIGKILL included: its threads may sit in HTTP
#                 calls; the rows written so far are kept); set it below the device command's own limit
#   RESUME        set: keep this machine's earlier results of the same PORT (a run cut off at its time limit goes on)
#   PORT          the server's port (default 30500; tests/gpu/on-gpus.sh gives each job its own)
#   BASE          a results folder copied first, so the report gives the agreement with those (CPU) rows
#                 (default: the SmolLM2 CPU results for SmolLM2, nothing otherwise)
set -uo pipefail
cd "$(dirname "$0")/../.."
TMP=${TMPDIR:-/tmp}
OUT=${OUT:-$TMP/q-out}; mkdir -p "$OUT"
source .gpu/sglang-kit/tools/env.sh
data=$1
port=${PORT:-30500}
name=${MODEL_NAME:-smollm2-135m}
if [ "$name" = smollm2-135m ]; then model=${2:-$TMP/smollm2}; base=${BASE-benchmarks/results/quality-smollm2-135m-cpu}
else model=${2:-$TMP/models/$name}; base=${BASE-}; fi
args=${QUALITY_ARGS:---tasks gsm8k_cot --limit 8 --max-new-tokens gsm8k_cot=256 --budgets 0.25 --policies none,topk,ams}
# The harness finds models by name in the sglang-ams cache: point the name at the folder built on this machine.
export SGLANG_AMS_CACHE=$TMP/amscache
mkdir -p "$SGLANG_AMS_CACHE/$name" && ln -sfn "$model" "$SGLANG_AMS_CACHE/$name/hf"
python3 -c "import json, sys; from sglang_ams.models import MODELS, MARKER; s = MODELS[sys.argv[2]]; \
open(sys.argv[1] + '/' + MARKER, 'w').write(json.dumps({'name': s.name, 'gguf_sha256': s.gguf_sha256}))" "$model" "$name"
# The server's own settings follow QUALITY_ARGS (--set delta=... is server-level; budget and scorer are per request).
# shellcheck disable=SC2086
flags=$(python3 benchmarks/quality/run.py --print-server-flags --model "$name" $args | tail -1 \
        | sed 's/^python -m sglang.launch_server --model-path MODEL//')
(cd "$TMP" && setsid python3 -m sglang.launch_server --model-path "$model" --port "$port" --mem-fraction-static 0.3 $flags \
   > "$OUT/server.log" 2>&1 &)
python3 .gpu/sglang-kit/tools/bench.py wait --port "$port" --timeout 400 || { tail -30 "$OUT/server.log"; exit 1; }
q=$TMP/q-$port
if [ -z "${RESUME:-}" ]; then rm -rf "$q" && mkdir -p "$q" && { [ -z "$base" ] || cp -r "$base"/. "$q"; }; fi
# Whatever ends the run (its end, an error, QUALITY_LIMIT): the results and the server's counters go to OUT.
trap 'cp -r "$q" "$OUT/quality"; grep "AMS compactions" "$OUT/server.log" | tail -1; pkill -f "port $port"' EXIT
# shellcheck disable=SC2086
timeout -k 5 "${QUALITY_LIMIT:-86400}" python3 benchmarks/quality/run.py --backend server \
  --url "http://127.0.0.1:$port" --model "$name" --data "$data" $args --no-progress --out "$q" > "$OUT/run.log" 2>&1
echo "run.py rc $?"; tail -15 "$OUT/run.log"
