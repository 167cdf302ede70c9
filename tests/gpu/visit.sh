#!/usr/bin/env bash
# One GPU visit, in phases (each device command runs at most 10 minutes, so a visit is several calls):
#   run 1:  bash .gpu/sglang-kit/c1/unpack.sh && bash tests/gpu/visit.sh stash          (carry c1, m0)
#   run 2:  bash .gpu/sglang-kit/c2/unpack.sh && bash tests/gpu/visit.sh stash          (carry c2, m1, tools, jit)
#   run 3+: bash tests/gpu/visit.sh setup kernels bench e2e savejit ...                   (carry m2, plugin, data)
# Phases:
#   stash    keep the GGUF parts carried in .gpu/m*/ (SmolLM2) and .gpu/p-NAME-NN/ (tests/gpu/split-model.sh)
#            under $TMP/gguf (lost when the machine goes cold)
#   build:NAME  join NAME's parts, check the GGUF's sha256 and convert it into $TMP/models/NAME
#   setup    install the plugin wheel into the kit's site, join and convert the GGUF into $TMP/smollm2
#   plugin   only install the plugin wheel (for a visit that uses another model)
#   kernels  the `gpu` kernel tests;  bench: benchmarks/kernels.py $BENCH_ARGS (default --quick; JSON to $OUT)
#   e2e      tests/gpu/engine_e2e.py on the real model ($E2E_ARGS adds arguments, e.g. --only a)
#   examples examples/offline_engine.py and examples/frontend_programs.py against a policy server
#   savejit  the JIT caches into $OUT/jit for the next visit
# Prints a summary last; details go under $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
TMP=${TMPDIR:-/tmp}            # scratch on the GPU machine (models, GGUF parts); the kit's site is $KIT_SITE
OUT=${OUT:-$TMP/visit-out}; mkdir -p "$OUT"
source .gpu/sglang-kit/tools/env.sh
SUMMARY=()
say() { SUMMARY+=("$*"); echo "### $*"; }

# build_gguf NAME OUT_DIR PART...: join the parts, check the sha256 sglang_ams.models has for NAME, convert to OUT_DIR.
build_gguf() {
  local name=$1 out=$2; shift 2
  cat "$@" > "$TMP/$name.gguf"
  python3 -c "import sys; from sglang_ams.models import MODELS; print(MODELS[sys.argv[1]].gguf_sha256 + '  ' + sys.argv[2])" \
    "$name" "$TMP/$name.gguf" | sha256sum -c - > /dev/null || { say "$name: GGUF checksum FAILED"; return 1; }
  mkdir -p "$(dirname "$out")"
  python3 -c "import sys; from pathlib import Path; from sglang_ams.models import _convert; _convert(Path(sys.argv[1]), Path(sys.argv[2]))" \
    "$TMP/$name.gguf" "$out" > "$OUT/convert-$name.log" 2>&1 || { tail -20 "$OUT/convert-$name.log"; return 1; }
}

for phase in "$@"; do
  t0=$(date +%s)
  case $phase in
  stash)
    mkdir -p "$TMP/gguf" && cp .gpu/m*/part* "$TMP/gguf/" 2>/dev/null
    for d in .gpu/p-*; do [ -f "$d/part" ] && cp "$d/part" "$TMP/gguf/${d#.gpu/p-}"; done
    say "stash: $(ls "$TMP/gguf" | tr '\n' ' ')";;
  build:*)
    name=${phase#build:}
    build_gguf "$name" "$TMP/models/$name" "$TMP/gguf/$name"-?? || exit 1
    say "build: $name in $TMP/models/$name";;
  plugin|setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$KIT_SITE" .gpu/plugin/*.whl \
      > "$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
    if [ "$phase" = plugin ]; then say "plugin: $(python3 -c 'import importlib.metadata as m; print(m.version("sglang-ams"))')"; continue; fi
    mkdir -p "$TMP/gguf" && cp .gpu/m*/part* "$TMP/gguf/" 2>/dev/null
    if [ ! -f "$TMP/smollm2/config.json" ]; then
      build_gguf smollm2-135m "$TMP/smollm2" "$TMP"/gguf/part0 "$TMP"/gguf/part1 "$TMP"/gguf/part2 || exit 1
    fi
    say "setup: plugin $(python3 -c 'import importlib.metadata as m; print(m.version("sglang-ams"))'), model $(ls "$TMP/smollm2" | tr '\n' ' ')";;
  kernels)
    (cd tests && python3 -m pytest -q -m gpu -p no:cacheprovider --rootdir=. test_kernels.py test_ring_store.py) > "$OUT/kernel-tests.log" 2>&1
    say "kernels: $(tail -1 "$OUT/kernel-tests.log")";;
  bench)
    python3 benchmarks/kernels.py ${BENCH_ARGS---quick} --out "$OUT/kernels.json" > "$OUT/kernels-bench.log" 2>&1
    say "bench: rc $? ($(wc -l < "$OUT/kernels-bench.log") lines)"; tail -40 "$OUT/kernels-bench.log";;
  e2e)
    python3 tests/gpu/engine_e2e.py --model "$TMP/smollm2" --data .gpu/data --out "$OUT/e2e" ${E2E_ARGS:-} \
      > "$OUT/e2e.log" 2>&1
    rc=$?; grep "^###" "$OUT/e2e.log" | tail -20; [ $rc -ne 0 ] && tail -60 "$OUT/e2e.log"
    say "e2e: rc $rc";;
  examples)
    python3 examples/offline_engine.py --model-path "$TMP/smollm2" --budget 128 --interval 32 --max-new-tokens 400 \
      --mem-fraction-static 0.2 > "$OUT/example-offline.log" 2>&1
    say "examples: offline_engine rc $?"; grep -E "^\[|^scheduler" "$OUT/example-offline.log" | tail -10
    (cd "$TMP" && setsid python3 -m sglang.launch_server --model-path $TMP/smollm2 --kv-policy ams --kv-budget 128 \
      --kv-interval 32 --port 30400 --mem-fraction-static 0.2 > "$OUT/example-server.log" 2>&1 &)
    python3 .gpu/sglang-kit/tools/bench.py wait --port 30400 --timeout 300 > /dev/null 2>&1
    python3 examples/frontend_programs.py --url http://127.0.0.1:30400 --max-tokens 400 > "$OUT/example-frontend.log" 2>&1
    say "examples: frontend_programs rc $?"; tail -8 "$OUT/example-frontend.log"
    pkill -f "port 30400" ; sleep 3;;
  savejit)
    bash .gpu/sglang-kit/tools/jit-cache.sh save "$OUT/jit" > "$OUT/jit.log" 2>&1; say "savejit: $(ls "$OUT/jit" | tr '\n' ' ')";;
  *) echo "unknown phase $phase"; exit 2;;
  esac
  say "  ($phase took $(( $(date +%s) - t0 )) s)"
done
echo "================ visit summary"
printf ' - %s\n' "${SUMMARY[@]}"
