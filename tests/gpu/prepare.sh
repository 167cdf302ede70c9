#!/usr/bin/env bash
# prepare.sh [what...]  -- CPU side, in a fresh checkout: everything a GPU visit carries, into the git-ignored .gpu/.
#   venv     .venv with SGLang 0.5.17 and the test extras (as .ci/run does; ~5 min)
#   kit      .gpu/sglang-kit: SGLang 0.5.17 + FlashInfer for the GPU image (../shared/gpu/build-kit.sh, ~5 min)
#   plugin   .gpu/plugin: this checkout as a wheel (rebuild after every change the GPU should run)
#   light    .gpu/sglang-0523-light (tests/gpu/build-0523-kit.sh LIGHT=1, ~2 min)
#   full     .gpu/sglang-0523-kit (tests/gpu/build-0523-kit.sh, ~9 min on 2 cores)
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
  *) echo "unknown step $s"; exit 2;;
  esac
  rc=$?
  echo "prepare $s: rc $rc in $(( $(date +%s) - t0 )) s (log $log)"
  [ $rc = 0 ] || exit $rc
done
du -sh .gpu/* 2>/dev/null
