#!/usr/bin/env bash
# build-0523-kit.sh [TARGET]  -- CPU side: SGLang 0.5.23 with torch 2.14.1 in chunks for the GPU machine
# (Python 3.12, torch 2.11 + CUDA 13.0 libraries in its image, no network; a call carries at most 64 MiB).
# SGLang 0.5.23's sglang-kernel 0.4.10 needs torch 2.14.1, so torch, triton 3.8 and the serving stack travel too;
# the CUDA libraries stay the image's (cuDNN 9.19, cuBLAS 13.1.0, NCCL 2.28.9), except an optional NCCL 2.30.7.
# TARGET (default .gpu/sglang-0523-kit, git-ignored) gets:
#   c01..cNN/   chunks of <= CHUNK_MIB; each: *.tar.xz (whole distributions), *.tar.xz.pKKofMM (pieces of a larger
#               one, extracted once all its pieces are there), CHUNK, unpack.sh. The torch pieces come first.
#   n01..      optional chunks with torch's own NCCL 2.30.7 (the image's 2.28.9 lacks some functions)
#   tools/      env.sh, mkmodel.py, bench.py, jit-cache.sh
#   MANIFEST.txt
# tests/gpu/visit-0523.sh runs the chain on the GPU machine. Knobs: CHUNK_MIB=40, XZ_LEVEL=6, WORK=$TMP/kit0523-work.
# LIGHT=1 builds the light variant instead (default TARGET .gpu/sglang-0523-light, a few chunks): SGLang 0.5.23's
# Python, FlashInfer 0.7.2 and the serving stack on the image's own torch 2.11, with sglang-kernel 0.4.5 (built for
# torch 2.11; 0.5.23's CUDA serve path imports nothing from sgl_kernel that 0.4.5 lacks, by a static check of its
# imports) and SGLang's Python radix-tree core. Not the stack a user installs, but it runs our hooks on 0.5.23 on a
# GPU in a few calls instead of sixteen.
set -euo pipefail
cd "$(dirname "$0")/../.."
LIGHT=${LIGHT:-0}
if [ "$LIGHT" = 1 ]; then TARGET=${1:-.gpu/sglang-0523-light}; else TARGET=${1:-.gpu/sglang-0523-kit}; fi
CHUNK_MIB=${CHUNK_MIB:-40}
XZ_LEVEL=${XZ_LEVEL:-6}
if [ "$LIGHT" = 1 ]; then WORK=${WORK:-${TMPDIR:-/tmp}/kit0523-work-light}; else WORK=${WORK:-${TMPDIR:-/tmp}/kit0523-work}; fi
WHEELS=${WHEELS:-${TMPDIR:-/tmp}/kit0523-work/wheels}       # one download cache for both variants
SHARED_TOOLS=${SHARED_TOOLS:-../shared/gpu/tools}
HERE=tests/gpu

# What SGLang 0.5.23's launch/serve path imports that the GPU image lacks or has at another version. Packages the
# image has at a version these accept (numpy, huggingface_hub 1.33, tokenizers 0.23.2, safetensors, aiohttp, httpx,
# uvloop, sympy, networkx, jinja2, ...) are not carried: ../shared/gpu/gpu-image-piplist.txt lists them.
PINS="
torch==2.14.1
triton==3.8.0
torchvision==0.29.1
sglang==0.5.23
sglang-kernel==0.4.10
flashinfer-python==0.7.2
apache-tvm-ffi==0.1.11
transformers==5.19.0
xgrammar==0.2.7
compressed-tensors==0.18.0
openai==2.8.0
fastapi==0.165.0
annotated-doc==0.0.7
starlette==1.10.0
uvicorn==0.54.0
python-multipart==0.0.34
opentelemetry-api==1.45.2
pydantic==2.14.3
pydantic_core==2.50.4
annotated-types==0.8.0
typing-inspection==0.4.5
typing_extensions==4.16.0
orjson==3.13.0
msgspec==0.22.0
pybase64==1.5.1
pyzmq==27.3.0
setproctitle==1.3.8
jiter==0.19.0
distro==1.9.0
sniffio==1.3.1
partial-json-parser==0.2.1.1.post7
loguru==0.7.3
gguf==0.19.0
ipython==9.18.1
traitlets==5.16.1
dill==0.4.1
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
referencing==0.37.0
rpds-py==2026.9.1
soundfile==0.13.1
cffi==2.1.1
pycparser==3.12
"
NCCL_PIN=nvidia-nccl-cu13==2.30.7
if [ "$LIGHT" = 1 ]; then       # the image's torch, triton and torchvision; the kernel build for torch 2.11
  PINS=$(echo "$PINS" | grep -vE '^(torch|triton|torchvision)==' | sed 's/^sglang-kernel==0.4.10$/sglang-kernel==0.4.5/')
  NCCL_PIN=""
fi
PLAT=""
for t in manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_18 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
  PLAT="$PLAT --platform ${t}_x86_64"; done
PIPX="--only-binary=:all: --python-version 3.12 --implementation cp $PLAT"

mkdir -p "$WORK" "$WHEELS" "$TARGET"
echo "$PINS" | grep -v '^$' > "$WORK/pins.txt"; echo "$NCCL_PIN" | grep -v '^$' > "$WORK/pins-nccl.txt" || true
echo "== 1/5 download (cp312, cached in $WHEELS)"
python3 -m pip download -q --no-deps $PIPX -d "$WHEELS" -r "$WORK/pins.txt" -r "$WORK/pins-nccl.txt" 2>&1 | grep -v '^WARNING' || true

select_wheels() {  # pins-file -> one wheel path per pin (a reused cache may hold other versions)
  python3 - "$WHEELS" "$1" <<'EOF'
import os, re, sys
wdir, pins = sys.argv[1], sys.argv[2]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
want = dict((norm(n), v) for n, v in (l.strip().split("==") for l in open(pins) if l.strip()))
out = []
for f in sorted(os.listdir(wdir)):
    n, v = f.split("-")[:2]
    if f.endswith(".whl") and want.get(norm(n)) == v and ("cp312" in f or "abi3" in f or "py3-none" in f):
        out.append(os.path.join(wdir, f)); want.pop(norm(n))
if want: sys.exit(f"missing wheels: {want}")
print("\n".join(out))
EOF
}

echo "== 2/5 install into Python 3.12 site folders (no deps, no compile)"
SITE=$WORK/site; NSITE=$WORK/site-nccl
rm -rf "$SITE" "$NSITE"; mkdir -p "$SITE" "$NSITE"
# shellcheck disable=SC2046
python3 -m pip install -q --no-deps --no-compile --target "$SITE" $PIPX $(select_wheels "$WORK/pins.txt") 2>&1 | grep -v '^WARNING' || true
if [ -s "$WORK/pins-nccl.txt" ]; then
  # shellcheck disable=SC2046
  python3 -m pip install -q --no-deps --no-compile --target "$NSITE" $PIPX $(select_wheels "$WORK/pins-nccl.txt") 2>&1 | grep -v '^WARNING' || true
fi
[ -f "$SITE/sglang/__init__.py" ] && { [ "$LIGHT" = 1 ] || [ -f "$SITE/torch/__init__.py" ]; } || { echo "install failed"; exit 1; }

echo "== 3/5 trim and add the NCCL shim"
rm -f "$SITE"/sgl_kernel/flash_ops*.so "$SITE"/sgl_kernel/*/flash_ops*.so   # FA3: only --attention-backend fa3
rm -rf "$SITE/sgl_kernel/sm100"                                            # Blackwell; an H100/H200 is sm90
rm -rf "$SITE/triton/backends/amd"                                         # ROCm backend, and its entry point:
for f in "$SITE"/triton-*.dist-info/entry_points.txt; do   # triton imports every backend listed
  [ -f "$f" ] && sed -i '/^amd *=/d' "$f"; done
rm -rf "$SITE"/triton/backends/nvidia/lib/cupti-blackwell "$SITE"/triton/backends/nvidia/bin/ptxas-blackwell  # sm100+
rm -f "$SITE/xgrammar/lib/libxgrammar.a"
rm -rf "$SITE/bin"                                                         # scripts with this machine's shebang
find "$SITE" -name __pycache__ -prune -exec rm -rf {} +
[ "$LIGHT" = 1 ] || cp "$HERE/kit0523_sitecustomize.py" "$SITE/sitecustomize.py"   # (the image's torch needs none)
du -sh "$SITE" "$NSITE"

echo "== 4/5 one .tar.xz per distribution (xz -$XZ_LEVEL), split where larger than a chunk"
PARTS=$WORK/parts; rm -rf "$PARTS"; mkdir -p "$PARTS/c" "$PARTS/n"
groups() {  # site -> "group<TAB>top-level entries" per distribution, from RECORD
  python3 - "$1" <<'EOF'
import csv, os, sys
site = sys.argv[1]; entries = set(os.listdir(site)); claimed = set()
for di in sorted(e for e in entries if e.endswith(".dist-info")):
    tops = {di}
    rec = os.path.join(site, di, "RECORD")
    for row in (csv.reader(open(rec)) if os.path.exists(rec) else []):
        if row and row[0].split("/")[0] in entries: tops.add(row[0].split("/")[0])
    tops -= claimed; claimed |= tops
    print(di[:-len(".dist-info")] + "\t" + " ".join(sorted(tops)))
rest = sorted(entries - claimed)
if rest: print("misc\t" + " ".join(rest))
EOF
}
pack_site() {  # site parts-dir
  local site=$1 dst=$2 lim=$(( CHUNK_MIB * 1024 * 1024 * 97 / 100 ))
  groups "$site" > "$dst.groups.tsv"
  while IFS=$'\t' read -r g tops; do
    # shellcheck disable=SC2086
    tar -C "$site" --owner=0 --group=0 -cf - $tops | xz -T2 -"$XZ_LEVEL" > "$dst/$g.tar.xz"
    local sz; sz=$(stat -c %s "$dst/$g.tar.xz")
    if [ "$sz" -gt "$lim" ]; then
      local n=$(( (sz + lim - 1) / lim ))
      split -n "$n" -d -a 2 "$dst/$g.tar.xz" "$dst/$g.tar.xz.p" && rm "$dst/$g.tar.xz"
      for p in "$dst/$g.tar.xz.p"??; do mv "$p" "${p}of$(printf %02d "$n")"; done
    fi
  done < "$dst.groups.tsv"
}
pack_site "$SITE" "$PARTS/c"; [ -s "$WORK/pins-nccl.txt" ] && pack_site "$NSITE" "$PARTS/n"

echo "== 5/5 chunks of <= $CHUNK_MIB MiB into $TARGET"
rm -rf "$TARGET"/c[0-9]* "$TARGET"/n[0-9]* "$TARGET/tools"
python3 - "$PARTS" "$TARGET" "$CHUNK_MIB" <<'EOF'
import math, os, shutil, sys
parts, target, lim = sys.argv[1], sys.argv[2], float(sys.argv[3]) * 2**20
for prefix in ("c", "n"):
    d = os.path.join(parts, prefix)
    files = [(os.path.getsize(os.path.join(d, f)), f) for f in os.listdir(d)]
    # torch's pieces first, in order (the chain checks torch as soon as it is complete), then first-fit decreasing
    first = sorted(f for f in files if f[1].startswith("torch-"))
    rest = sorted((f for f in files if not f[1].startswith("torch-")), reverse=True)
    bins = []
    for s, f in first:
        bins.append([s, [f]])
    for s, f in rest:
        b = next((b for b in bins if b[0] + s <= lim), None)
        if b is None: bins.append([0, []]); b = bins[-1]
        b[0] += s; b[1].append(f)
    # the smallest bin last: the last call also carries tools/ and the plugin wheel
    bins = bins[:len(first)] + sorted(bins[len(first):], key=lambda b: -b[0])
    for i, (s, fs) in enumerate(bins, 1):
        cd = os.path.join(target, f"{prefix}{i:02d}"); os.makedirs(cd)
        for f in fs: shutil.copy2(os.path.join(d, f), cd)
        open(os.path.join(cd, "CHUNK"), "w").write(f"{prefix}{i:02d} of {len(bins)}\n")
        print(f"{prefix}{i:02d}: {s / 2**20:.1f} MiB: {' '.join(sorted(fs))[:150]}")
EOF
for d in "$TARGET"/[cn][0-9]*; do cp "$HERE/kit0523-unpack.sh" "$d/unpack.sh"; done
mkdir -p "$TARGET/tools"
cp "$SHARED_TOOLS/mkmodel.py" "$SHARED_TOOLS/bench.py" "$SHARED_TOOLS/jit-cache.sh" "$TARGET/tools/"
SITE_NAME=site0523; [ "$LIGHT" = 1 ] && SITE_NAME=site0523l   # visit-0523.sh picks the same name from the kit's folder name
cat > "$TARGET/tools/env.sh" <<EOF
# source tools/env.sh: the kit's site first on PYTHONPATH, offline, cuDNN 9.19 accepted by torch 2.14.1
export KIT_SITE=\${KIT_SITE:-\${TMPDIR:-/tmp}/$SITE_NAME}
case ":\${PYTHONPATH:-}:" in *":\$KIT_SITE:"*) ;; *) export PYTHONPATH=\$KIT_SITE\${PYTHONPATH:+:\$PYTHONPATH};; esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false PYTORCH_SKIP_CUDNN_COMPATIBILITY_CHECK=1
EOF
# light: 0.5.23's Rust radix-tree core is built for torch 2.14 and cannot read torch 2.11 tensors (as in .ci/run)
[ "$LIGHT" = 1 ] && echo "export SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python" >> "$TARGET/tools/env.sh"
{
  echo "# SGLang 0.5.23 GPU kit$([ "$LIGHT" = 1 ] && echo ", light variant"), built $(date -u +%FT%TZ) by tests/gpu/build-0523-kit.sh"
  echo "# wheels (bytes, file)"
  for w in $(select_wheels "$WORK/pins.txt") $(select_wheels "$WORK/pins-nccl.txt"); do
    printf '%s  %s\n' "$(stat -c %s "$w")" "$(basename "$w")"; done
  echo; echo "# chunks (bytes: parts)"
  for d in "$TARGET"/[cn][0-9]*; do echo "$(basename "$d"): $(du -sb "$d" | cut -f1): $(cd "$d" && ls *.tar.xz* | tr '\n' ' ')"; done
  echo "# torch complete in: $(ls -d "$TARGET"/c[0-9]* | while read -r d; do ls "$d" | grep -q '^torch-' && basename "$d"; done | tail -1)"
} > "$TARGET/MANIFEST.txt"
du -sh "$TARGET"; tail -3 "$TARGET/MANIFEST.txt"
