#!/usr/bin/env bash
# The hardening proof on the GPU machine (tests/gpu/hardening.py), with the SGLang kit of ../shared/gpu:
#   run 1: bash .gpu/sglang-kit/c1/unpack.sh                                  (carry .gpu/sglang-kit/c1)
#   run 2: bash .gpu/sglang-kit/c2/unpack.sh && bash tests/gpu/hardening-visit.sh setup run CONFIGS
#          (carry .gpu/sglang-kit/c2, .gpu/sglang-kit/tools, .gpu/plugin; the JIT caches come from tests/gpu/jit-h200)
#   later: bash tests/gpu/hardening-visit.sh run CONFIGS | soak-start SECONDS | soak-wait SECONDS | savejit
# Model: dummy-weight Llama-3-8B shape with a 32768-token context (the prompts are 12k-16k tokens).
set -uo pipefail
cd "$(dirname "$0")/../.."
TMP=${TMPDIR:-/tmp}
OUT=${OUT:-$TMP/hardening-out}; mkdir -p "$OUT"
source .gpu/sglang-kit/tools/env.sh
MODEL=$TMP/llama8b-32k
pack_logs() { (cd "$1" && tar cJf "$OUT/logs-$2.tar.xz" server-*.log 2>/dev/null); }
while [ $# -gt 0 ]; do
  case $1 in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$KIT_SITE" .gpu/plugin/*.whl \
      > "$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
    python3 .gpu/sglang-kit/tools/mkmodel.py "$MODEL" 8b
    # JIT caches of the 8B shape on an H200 (saved 2026-12-01; head_dim 128 otherwise compiles ~210 s)
    bash .gpu/sglang-kit/tools/jit-cache.sh restore tests/gpu/jit-h200 > /dev/null
    python3 -c "import json,sys; p=sys.argv[1]+'/config.json'; c=json.load(open(p)); c['max_position_embeddings']=32768; json.dump(c,open(p,'w'))" "$MODEL"
    shift;;
  run)
    python3 tests/gpu/hardening.py --model "$MODEL" --configs "$2" --out "$TMP/h-run" 2>&1 | tee -a "$OUT/run.log" | grep -E "^###|^ -|Traceback" 
    cp "$TMP"/h-run/hardening-*.json "$OUT/" 2>/dev/null; pack_logs "$TMP/h-run" "${2//,/-}"; rm -f "$TMP"/h-run/server-*.log
    shift 2;;
  soak-start)
    rm -rf "$TMP/h-soak"; mkdir -p "$TMP/h-soak"
    setsid nohup python3 tests/gpu/hardening.py --model "$MODEL" --configs soak --soak-s "$2" --port 32000 \
      --out "$TMP/h-soak" > "$TMP/h-soak/driver.log" 2>&1 < /dev/null &
    echo "soak started for $2 s"; shift 2;;
  soak-wait)
    for _ in $(seq "$2"); do [ -f "$TMP/h-soak/hardening-soak.json" ] && break; sleep 1; done
    grep -E "^###|^ -" "$TMP/h-soak/driver.log"; cp "$TMP"/h-soak/hardening-soak.json "$OUT/" 2>/dev/null
    cp "$TMP/h-soak/driver.log" "$OUT/soak-driver.log"; pack_logs "$TMP/h-soak" soak; shift 2;;
  savejit)
    bash .gpu/sglang-kit/tools/jit-cache.sh save "$OUT/jit" > /dev/null 2>&1; ls -la "$OUT/jit"; shift;;
  *) echo "unknown phase $1"; exit 2;;
  esac
done
