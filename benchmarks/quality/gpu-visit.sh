#!/usr/bin/env bash
# The quality harness's server backend on the GPU machine (after tests/gpu/visit.sh setup built the model folder):
# starts a policy server with the harness's flags and runs GSM8K CoT through it into a copy of the CPU results,
# so the report also gives the agreement between the reference loop and SGLang.
#   bash benchmarks/quality/gpu-visit.sh DATA_DIR [MODEL_DIR]      (MODEL_DIR: the converted SmolLM2 folder)
set -uo pipefail
cd "$(dirname "$0")/../.."
TMP=${TMPDIR:-/tmp}
OUT=${OUT:-$TMP/q-out}; mkdir -p "$OUT"
source .gpu/sglang-kit/tools/env.sh
data=$1
model=${2:-$TMP/smollm2}
# The harness finds models by name in the sglang-ams cache: point the name at the folder built on this machine.
export SGLANG_AMS_CACHE=$TMP/amscache
mkdir -p "$SGLANG_AMS_CACHE/smollm2-135m" && ln -sfn "$model" "$SGLANG_AMS_CACHE/smollm2-135m/hf"
python3 -c "import json, sys; from sglang_ams.models import MODELS, MARKER; s = MODELS['smollm2-135m']; \
open(sys.argv[1] + '/' + MARKER, 'w').write(json.dumps({'name': s.name, 'gguf_sha256': s.gguf_sha256}))" "$model"
flags=$(python3 benchmarks/quality/run.py --print-server-flags --model smollm2-135m --budgets 0.25 --policies none,topk,ams \
        --tasks gsm8k_cot | tail -1 | sed 's/^python -m sglang.launch_server --model-path MODEL//')
(cd "$TMP" && setsid python3 -m sglang.launch_server --model-path "$model" --port 30500 --mem-fraction-static 0.2 $flags \
   > "$OUT/server.log" 2>&1 &)
python3 .gpu/sglang-kit/tools/bench.py wait --port 30500 --timeout 300 || { tail -30 "$OUT/server.log"; exit 1; }
rm -rf "$TMP/q" && cp -r benchmarks/results/quality-smollm2-135m-cpu "$TMP/q"
python3 benchmarks/quality/run.py --backend server --url http://127.0.0.1:30500 --model smollm2-135m --data "$data" \
  --tasks gsm8k_cot --limit 8 --max-new-tokens gsm8k_cot=256 --budgets 0.25 --policies none,topk,ams \
  --no-progress --out "$TMP/q" > "$OUT/run.log" 2>&1
echo "run.py rc $?"; tail -15 "$OUT/run.log"
cp -r "$TMP/q" "$OUT/quality"; grep "AMS compactions" "$OUT/server.log" | tail -1
pkill -f "port 30500"; sleep 2
