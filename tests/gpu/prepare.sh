#!/usr/bin/env bash
# prepare.sh [what...]  -- CPU side, in a fresh checkout: everything a GPU visit carries, into the git-ignored .gpu/.
#   venv     .venv with SGLang 0.5.17 and the test extras (as .ci/run does; ~5 min)
#   kit      .gpu/sglang-kit: SGLang 0.5.17 + FlashInfer for the GPU image (../shared/gpu/build-kit.sh, ~5 min)
#   plugin   .gpu/plugin: this checkout as a wheel (rebuild after every change the GPU should run)
#   light    .gpu/sglang-0523-light (tests/gpu/build-0523-kit.sh LIGHT=1, ~2 min)
#   full     .gpu/sglang-0523-kit (tests/gpu/build-0523-kit.sh, ~9 min on 2 cores)
#   data     .gpu/data: GSM8K and the essays that tests/gpu/engine_e2e.py reads (--data), from ../shared/data
#   smollm2  .gpu/p-smollm2-135m-NN: SmolLM2-135M's GGUF (sglang-ams model build) in PART_MIB parts (default 20: two parts and the repo fit one call)
#            for visit.sh's stash and build:smollm2-135m
# Default: venv kit plugin light full. Each step logs to $TMP/prepare-<step>.log and prints one line.
set -uo pipefail
cd "$(dirname "$0")/../.."
TMP=${TMPDIR:-/tmp}
steps=${*:-venv kit plugin light full}
for s in $steps; do
  t0=$(date +%s); log=$TMP/prepare-$s.log
  case $s in
  venv)   { [ -x .venv/bin/python ] || python3 -m venv .venv; .venv/bin/pip install -q --upgrade pip &&
            .venv/bin/pip install -q -e ".[test]" "sglang==0.5.17"; } > "$log" 2>&1;;
  kit)    { bash ../shared/gpu/build-kit.sh .gpu/sglang-kit && mkdir -p .gpu/sglang-kit/jit &&
            cp ../shared/gpu/jit-seed/*.tar.xz .gpu/sglang-kit/jit/; } > "$log" 2>&1;;
  plugin) { rm -rf .gpu/plugin && .venv/bin/pip wheel -q --no-deps -w .gpu/plugin .; } > "$log" 2>&1;;
  light)  LIGHT=1 bash tests/gpu/build-0523-kit.sh > "$log" 2>&1;;
  full)   bash tests/gpu/build-0523-kit.sh > "$log" 2>&1;;
  data)   { rm -rf .gpu/data && mkdir -p .gpu/data && cp ../shared/data/gsm8k/test.jsonl .gpu/data/gsm8k_test.jsonl &&
            cp ../shared/data/gsm8k/train.jsonl .gpu/data/gsm8k_train.jsonl &&
            cp -r ../shared/data/niah_paulgraham_essays/essays .gpu/data/essays; } > "$log" 2>&1;;
  smollm2) { .venv/bin/sglang-ams model build smollm2-135m &&
             PART_MIB=${PART_MIB:-20} bash tests/gpu/split-model.sh smollm2-135m; } > "$log" 2>&1;;
  *) echo "unknown step $s"; exit 2;;
  esac
  rc=$?
  echo "prepare $s: rc $rc in $(( $(date +%s) - t0 )) s (log $log)"
  [ $rc = 0 ] || exit $rc
done
du -sh .gpu/* 2>/dev/null
