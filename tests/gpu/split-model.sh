#!/usr/bin/env bash
# CPU side: cut a built model's GGUF into parts that fit one device run each, one folder per part (54 MiB by
# default, PART_MIB to change: a part plus the repo must stay under the 64 MiB a run carries):
#   bash tests/gpu/split-model.sh qwen2.5-coder-0.5b      ->  .gpu/p-qwen2.5-coder-0.5b-NN/part
# Carry one folder per run (back to back, with `bash tests/gpu/visit.sh stash`), then `visit.sh build:NAME`.
set -euo pipefail
cd "$(dirname "$0")/../.."
name=$1
gguf=${SGLANG_AMS_CACHE:-$HOME/.cache/sglang-ams}/$name/$name.gguf
[ -f "$gguf" ] || { echo "no $gguf: run 'sglang-ams model build $name' first"; exit 1; }
work=$(mktemp -d)
rm -rf .gpu/p-"$name"-*
split -b "${PART_MIB:-54}M" -d -a 2 "$gguf" "$work"/
for f in "$work"/*; do mkdir -p ".gpu/p-$name-$(basename "$f")" && mv "$f" ".gpu/p-$name-$(basename "$f")/part"; done
rm -rf "$work"; ls -d .gpu/p-"$name"-*
