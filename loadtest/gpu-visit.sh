#!/usr/bin/env bash
# The throughput comparison on the GPU machine with the SGLang kit of ../shared/gpu, in pieces of < 10 minutes:
#   run 1:  bash .gpu/sglang-kit/c1/unpack.sh                                     (carry c1)
#   run 2:  bash .gpu/sglang-kit/c2/unpack.sh && bash loadtest/gpu-visit.sh setup (carry c2, tools, jit, .gpu/locust)
#   run 3+: bash loadtest/gpu-visit.sh run CONFIGS MAX_TOTAL_TOKENS [BUDGETS]     (results accumulate in $TMP/lt)
# Model: a dummy-weight (random) Llama-3-8B-shaped model: throughput only, no accuracy.
set -uo pipefail
cd "$(dirname "$0")/.."
TMP=${TMPDIR:-/tmp}            # scratch on the GPU machine
OUT=${OUT:-$TMP/lt-out}; mkdir -p "$OUT"
source .gpu/sglang-kit/tools/env.sh
export PYTHONPATH=$PYTHONPATH:$TMP/locust-site
case $1 in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --target $TMP/locust-site .gpu/locust/*.whl > "$OUT/pip.log" 2>&1 || tail "$OUT/pip.log"
  python3 .gpu/sglang-kit/tools/mkmodel.py $TMP/llama8b 8b
  python3 -c "import locust, gevent; print('locust', locust.__version__)";;
run)
  # POLICY_ARGS: extra flags for policy servers; LT: results folder (runs of one folder share its table);
  # PORT: the server's port (tests/gpu/on-gpus.sh gives each job its own)
  configs=$2; mtt=$3; budgets=${4:-512,1024}; port=${PORT:-30000}; lt=${LT:-$TMP/lt-$port}
  python3 loadtest/compare.py --model-path $TMP/llama8b --load-format dummy --skip-tokenizer-init --python python3 \
    --configs "$configs" --max-total-tokens "$mtt" --budgets "$budgets" --kv-interval 128 \
    --output-len 2048 --users 24 --requests 24 --run-timeout 300 --port "$port" --policy-args="${POLICY_ARGS:-}" \
    --server-args="--attention-backend flashinfer" --out "$lt" 2>&1 | tail -25
  cp -r "$lt" "$OUT/";;
savejit)
  bash .gpu/sglang-kit/tools/jit-cache.sh save "$OUT/jit" > /dev/null 2>&1; ls "$OUT/jit";;
esac
