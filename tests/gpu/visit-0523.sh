#!/usr/bin/env bash
# SGLang 0.5.23 (torch 2.14.1) on the GPU machine, from the chunked kit in .gpu/sglang-0523-kit (or, with
# KIT=.gpu/sglang-0523-light, the light variant on the image's torch 2.11: its few chunks the same way)
# (built on the CPU side by tests/gpu/build-0523-kit.sh into the git-ignored kit folder; see its MANIFEST.txt).
# One device call per chunk; the calls must follow each other at once (the machine keeps /tmp only ~30 s; on
# 2026-12-02 a call sent after reading the previous one's output found the machine cold twice, while calls sent
# together in one batch of tool calls all found it warm):
#   call k = 1..N-1: bash tests/gpu/visit-0523.sh unpack k           carry .gpu/sglang-0523-kit/cKK
#     (on the chunk that completes the torch group, MANIFEST's "torch cKK", add `check`: fails fast)
#   call N:          bash tests/gpu/visit-0523.sh unpack N check serve:none
#                    carry .gpu/sglang-0523-kit/cNN, .gpu/sglang-0523-kit/tools, .gpu/plugin (the plugin wheel)
#   call N+1:        bash tests/gpu/visit-0523.sh serve:ams,amsbig savejit  (carry tools, plugin) while still warm
#   (the first server JIT-compiles FlashInfer 0.7.2 cold: `serve`, both policies in one call, may pass 600 s)
# Phases:
#   unpack N   extract chunk cNN into $KIT_SITE ($TMP/site0523); the last chunk exits 3 if one is missing.
#              `unpack nK`: the optional NCCL 2.30.7 chunks n01.. (torch's own pin; the image has 2.28.9)
#              Small chunks may share a call: `unpack n6 unpack 18` (carry both folders)
#   check      torch (version, CUDA, a tensor on the GPU, NCCL/cuDNN versions and which files were loaded),
#              a 1-rank NCCL group + all_reduce (torch 2.14.1 on the image's older NCCL),
#              then sgl_kernel, flashinfer, sglang: version or the error, each on its own
#   serve      install the plugin wheel into the site, a dummy 1B Llama config, launch_server with
#              --attention-backend flashinfer: --kv-policy none, ams (budget 128: every request compacts), amsbig
#              (budget 8192, above every request: its greedy outputs must equal none's); each: 7 greedy
#              /generate one at a time (prompts 16-1500 tokens, 300 out), 96 concurrent mixed requests, the first
#              request again (serve:none,ams picks some)
#   savejit    the JIT caches into $OUT/jit (FlashInfer 0.7.2, tvm-ffi, Triton 3.8), for a later visit; `serve`
#              restores $KIT/jit/sglang-cache.tar.xz (carry $KIT/jit in the last unpack call: ~5 MiB)
# Each phase prints one line starting with "### "; a summary comes last. Exit status: the first failing phase's.
set -uo pipefail
cd "$(dirname "$0")/../.."
KIT=${KIT:-.gpu/sglang-0523-kit}     # KIT=.gpu/sglang-0523-light: the light variant (build-0523-kit.sh LIGHT=1)
TMP=${TMPDIR:-/tmp}
OUT=${OUT:-$TMP/visit0523-out}; mkdir -p "$OUT"
case $KIT in *light*) export KIT_SITE=${KIT_SITE:-$TMP/site0523l} SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python \
               SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1;;   # (0.5.23 asks for sglang-kernel >= 0.4.9; light has 0.4.5)
             *) export KIT_SITE=${KIT_SITE:-$TMP/site0523};; esac
if [ -f "$KIT/tools/env.sh" ]; then source "$KIT/tools/env.sh"
else  # the chunk-only calls carry no tools/: the same settings inline
  export PYTHONPATH=$KIT_SITE${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 \
    PYTORCH_SKIP_CUDNN_COMPATIBILITY_CHECK=1
fi
IDS=$TMP/visit0523-ids; mkdir -p "$IDS"   # greedy outputs, kept across the calls of one warm visit
SUMMARY=(); RC=0
say() { SUMMARY+=("$*"); echo "### $*"; }
fail() { say "$*"; [ $RC = 0 ] && RC=1; }

check_torch() {
  python3 - <<'EOF'
import os, sys, time
t0 = time.time()
try:
    import torch
    v = torch.__version__
    ok = torch.cuda.is_available()
    x = torch.zeros(1).cuda(); x += 1; torch.cuda.synchronize()
    y = (torch.ones(64, 64, device="cuda", dtype=torch.bfloat16) @ torch.ones(64, 64, device="cuda", dtype=torch.bfloat16)).float().sum().item()
    cudnn = torch.backends.cudnn.version()
    libs = sorted({l.split()[-1] for l in open("/proc/self/maps") if any(k in l for k in ("libnccl", "libcudnn.so", "libcublas", "libcusparseLt"))})
    nccl = "built " + ".".join(map(str, torch.cuda.nccl.version()))
    try:  # the library actually loaded (the image's), not the version torch was built with
        import ctypes
        v_ = ctypes.c_int(); ctypes.CDLL(next(l for l in libs if "libnccl" in l)).ncclGetVersion(ctypes.byref(v_))
        nccl += f", loaded {v_.value // 10000}.{v_.value // 100 % 100}.{v_.value % 100}"
    except Exception as e:
        nccl += f", loaded ? ({e!r})"
    print("torch libs: " + " ".join(libs))
    print(f"torch_line torch {v} from {os.path.dirname(torch.__file__)}; cuda {ok} {torch.cuda.get_device_name(0)}; "
          f"zeros ok; bf16 matmul {y:.0f} (want 262144); nccl {nccl}; cudnn {cudnn}; dlopen flags {sys.getdlopenflags()}; {time.time()-t0:.1f} s")
    ok = y == 262144.0
except Exception as e:
    import traceback; traceback.print_exc(limit=-4)
    print(f"torch_line torch FAILED: {e!r}"[:600]); ok = False
sys.exit(0 if ok else 1)
EOF
}

check_nccl() {  # a 1-rank NCCL group + all_reduce, as SGLang's TP=1 start does: torch 2.14.1 on the image's NCCL
  timeout 120 python3 - <<'EOF' 2>&1
import os, torch, torch.distributed as dist
os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29523")
dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
t = torch.ones(1024, device="cuda"); dist.all_reduce(t); dist.barrier(); torch.cuda.synchronize()
g = dist.new_group([0]); dist.all_reduce(t, group=g); torch.cuda.synchronize()
print(f"nccl_line all_reduce ok ({t[0].item():.0f}), new_group ok"); dist.destroy_process_group()
EOF
}

check_rest() {
  python3 - <<'EOF'
import importlib, importlib.metadata as md, sys, time, traceback
out, bad = [], 0
for mod, dist in (("sgl_kernel", "sglang-kernel"), ("flashinfer", "flashinfer-python"), ("sglang", "sglang"),
                  ("sglang.srt.entrypoints.http_server", None), ("sglang.srt.layers.attention.flashinfer_backend", None)):
    t0 = time.time()
    try:
        importlib.import_module(mod)
        v = md.version(dist) if dist else "ok"
        out.append(f"{mod} {v} ({time.time()-t0:.1f} s)")
    except BaseException as e:
        bad += 1; traceback.print_exc(limit=-3)
        out.append(f"{mod} FAILED {e!r}"[:300])
print("rest_line " + " | ".join(out)); sys.exit(1 if bad else 0)
EOF
}

serve_one() {  # config: launch, wait, one greedy /generate + a concurrent mixed load, stop; prints a pass/fail line
  # none: --kv-policy none; ams: budget 128 (every request compacts); amsbig: a budget above every request, whose
  # greedy output must equal none's (saved by the none run of this visit)
  local cfg=$1 port=$2 M=$TMP/m0523-1b pol=$1 extra=""
  python3 "$KIT/tools/mkmodel.py" "$M" 1b > /dev/null
  case $cfg in ams) extra="--kv-budget 128 --kv-interval 32";; amsbig) pol=ams; extra="--kv-budget 8192 --kv-interval 512";; esac
  local log=$OUT/server-$cfg.log ts; ts=$(date +%s)
  setsid python3 -m sglang.launch_server --model-path "$M" --load-format dummy --skip-tokenizer-init \
    --attention-backend flashinfer --port "$port" --mem-fraction-static 0.5 --kv-policy "$pol" $extra > "$log" 2>&1 &
  local pid=$!
  if python3 "$KIT/tools/bench.py" wait --port "$port" --timeout "${SERVE_WAIT:-420}" --pid "$pid" > /dev/null; then
    local up=$(( $(date +%s) - ts ))
    python3 - "$port" "$cfg" "$up" "$log" "$OUT" "$IDS" <<'EOF2' > "$OUT/generate-$cfg.txt" 2>&1
import json, random, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
port, cfg, up, log, out, ids_dir = sys.argv[1:7]
def generate(ids, n):
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=300).read())
n = 300  # > budget + interval of `ams`: such a request compacts at least once
notes, ok = [], True
t0 = time.time()
try:
    ids = generate(list(range(100, 164)), n).get("output_ids") or []
    notes.append(f"/generate {len(ids)}/{n} tokens in {time.time() - t0:.2f} s"); ok &= len(ids) == n
    # greedy outputs of 6 prompts (16-1500 tokens), one at a time so that both servers batch them alike
    lengths = (16, 64, 200, 500, 1000, 1500)
    prompts = [list(range(200 + 31 * k, 200 + 31 * k + length)) for k, length in enumerate(lengths)]
    outs = [ids] + [generate(p, n).get("output_ids") or [] for p in prompts]
    json.dump(outs, open(f"{ids_dir}/ids-{cfg}.json", "w"))
    if cfg == "amsbig":
        try:
            ref = json.load(open(f"{ids_dir}/ids-none.json"))
            same = sum(a == b for a, b in zip(ref, outs))
            first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(ref, outs)]
            notes.append(f"identical to none: {same}/{len(outs)}" + ("" if same == len(outs) else
                         f" (first differing token per request: {first})")); ok &= same == len(outs)
        except OSError:
            notes.append("no ids-none.json to compare (run serve:none first, on this warm machine)"); ok = False
    rng = random.Random(7)  # mixed load: 96 requests at once, prompts 8-2048 tokens, outputs 16-700
    jobs = [([rng.randrange(5, 30000) for _ in range(rng.randint(8, 2048))], rng.randint(16, 700)) for _ in range(96)]
    t1 = time.time()
    with ThreadPoolExecutor(96) as pool:
        got = list(pool.map(lambda j: len(generate(*j).get("output_ids") or []), jobs))
    full = sum(g == j[1] for g, j in zip(got, jobs))
    notes.append(f"mixed load {full}/{len(jobs)} complete, {sum(got)} tokens in {time.time() - t1:.1f} s"); ok &= full == len(jobs)
    ids2 = generate(list(range(100, 164)), n).get("output_ids") or []  # the server still answers, and the same
    notes.append("same output after the load" if ids2 == ids else "output CHANGED after the load"); ok &= ids2 == ids
    if cfg != "none":
        seen = any("sglang-ams: policy" in l for l in open(log, errors="replace"))
        notes.append(f"plugin policy log line {'seen' if seen else 'MISSING'}"); ok &= seen
except Exception as e:
    notes.append(f"error {e!r}"[:300]); ok = False
print(f"serve_line {cfg}: {'PASS' if ok else 'FAIL'}: ready {up} s, " + "; ".join(notes))
sys.exit(0 if ok else 1)
EOF2
    local rc=$?
    say "$(grep -a '^serve_line' "$OUT/generate-$cfg.txt" | sed 's/^serve_line //')"
    grep -aE "Traceback|Error" "$log" | tail -5
  else
    local rc=1
    say "serve $cfg: FAIL: server not ready after $(( $(date +%s) - ts )) s"; grep -aE "Error|error|Traceback" "$log" | tail -15
  fi
  kill -TERM "$pid" 2>/dev/null; for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- -"$pid" 2>/dev/null; sleep 2
  return $rc
}

while [ $# -gt 0 ]; do
  phase=$1; shift; t0=$(date +%s)
  case $phase in
  unpack)
    a=${1:?unpack N}; shift
    case $a in [a-z]*) pre=${a%%[0-9]*}; num=${a#"$pre"};; *) pre=c; num=$a;; esac   # 7 -> c07, n2 -> n02
    n=$(printf '%s%02d' "$pre" "$((10#$num))")
    [ -f "$KIT/$n/unpack.sh" ] || { fail "unpack $n: not carried ($KIT/$n missing)"; break; }
    line=$(bash "$KIT/$n/unpack.sh" "$KIT_SITE" 2>&1); r=$?; echo "$line"
    say "unpack $n: rc $r: $(echo "$line" | grep '^unpack:' | tr '\n' ' ')"
    [ $r != 0 ] && { RC=$r; break; };;
  check)
    check_torch > "$OUT/check-torch.log" 2>&1; r=$?; grep -v '^torch_line' "$OUT/check-torch.log" | tail -12
    if [ $r = 0 ]; then say "check torch: $(grep '^torch_line' "$OUT/check-torch.log" | sed 's/^torch_line //')"
    else fail "check torch: $(grep '^torch_line' "$OUT/check-torch.log" | sed 's/^torch_line //')"; fi
    if [ $r = 0 ]; then
      check_nccl > "$OUT/check-nccl.log"; r3=$?
      if [ $r3 = 0 ] && grep -q '^nccl_line' "$OUT/check-nccl.log"; then say "check nccl: $(grep '^nccl_line' "$OUT/check-nccl.log" | sed 's/^nccl_line //')"
      else tail -8 "$OUT/check-nccl.log"; fail "check nccl: FAILED rc $r3: $(grep -aE 'symbol lookup error|Error' "$OUT/check-nccl.log" | tail -1 | cut -c1-300) (NCCL fallback: unpack n1..n6)"; fi
    fi
    if [ -f "$KIT_SITE/sglang/__init__.py" ] && [ -f "$KIT_SITE/flashinfer/__init__.py" ]; then
      check_rest > "$OUT/check-rest.log" 2>&1; r2=$?; grep -v '^rest_line' "$OUT/check-rest.log" | tail -15
      if [ $r2 = 0 ]; then say "check imports: $(grep '^rest_line' "$OUT/check-rest.log" | sed 's/^rest_line //')"
      else fail "check imports: $(grep '^rest_line' "$OUT/check-rest.log" | sed 's/^rest_line //')"; fi
    else say "check imports: skipped (sglang/flashinfer not unpacked yet)"; fi;;
  serve|serve:*)
    [ -f "$KIT/tools/mkmodel.py" ] || { fail "serve: carry $KIT/tools"; break; }
    if ls .gpu/plugin/*.whl > /dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$KIT_SITE" .gpu/plugin/*.whl \
        > "$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; fail "serve: plugin install failed"; break; }
    else fail "serve: no plugin wheel in .gpu/plugin"; break; fi
    if ! python3 -c "import cutlass" > /dev/null 2>&1; then    # (see the stand-in's docstring)
      cp tests/gpu/kit0523_dual_gemm_standin.py "$KIT_SITE/sglang/kernels/ops/gemm/cutedsl_dual_gemm.py" &&
        say "serve: no nvidia-cutlass-dsl: SGLang's SM100-only dual GEMM module replaced by tests/gpu/kit0523_dual_gemm_standin.py"
    fi
    if [ -f "$KIT/jit/sglang-cache.tar.xz" ] && [ ! -d "$HOME/.cache/sglang" ]; then   # (saved by savejit)
      mkdir -p "$HOME/.cache" && xz -dc "$KIT/jit/sglang-cache.tar.xz" | tar -C "$HOME/.cache" -xf - &&
        say "serve: restored $KIT/jit/sglang-cache.tar.xz into ~/.cache/sglang"
    fi
    case $phase in serve) pols="none ams amsbig";; *) pols=${phase#serve:}; pols=${pols//,/ };; esac
    for p in $pols; do serve_one "$p" 30523 || { [ $RC = 0 ] && RC=1; }; done;;
  savejit)
    bash "$KIT/tools/jit-cache.sh" save "$OUT/jit" > "$OUT/jit.log" 2>&1
    # 0.5.23 keeps FlashInfer's and sgl-kernel's JIT builds under ~/.cache/sglang, where jit-cache.sh does not look
    [ -d "$HOME/.cache/sglang" ] && tar -C "$HOME/.cache" -cf - sglang | xz -T0 -6 > "$OUT/jit/sglang-cache.tar.xz"
    say "savejit: $(ls "$OUT/jit" 2>/dev/null | tr '\n' ' ')";;
  *) echo "unknown phase $phase"; exit 2;;
  esac
  echo "    ($phase took $(( $(date +%s) - t0 )) s)"
done
echo "================ visit-0523 summary"
printf ' - %s\n' "${SUMMARY[@]}"
exit $RC
