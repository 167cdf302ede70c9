"""Benchmark of the Triton kernels (scoring and compaction) on SGLang-shaped KV pools.

    python benchmarks/kernels.py            # full grid on the GPU, JSON under benchmarks/results/
    python benchmarks/kernels.py --quick    # a short grid
    python benchmarks/kernels.py --dry-run  # CPU: tiny grid under the Triton interpreter, checks, no timings

Model shapes: Llama-3-8B (32 layers x 8 KV heads x 128, GQA 4) and Qwen2.5-7B (28 x 4 x 128, GQA 7), bf16.
Grid: T (tokens per request) x B (kept per request) x N (requests); combinations whose KV (K and V of N*T tokens)
does not fit in --mem-gb are skipped. Each timing is the median over --reps CUDA-event timings after --warmup
runs, with L2 flushed before each run. Rates are compared with the device-to-device copy rate this script
measures (torch copy of a >= 1 GiB buffer, read + write counted):
  compaction  bytes = moved (n, l, h, j) * d * 2 B * 2 (K, V) * 2 (read + write)
              (every kept token moves here: keep[j] != j; = 2 x kept x layers x heads x dim x 2 B x 2)
  scoring     bytes = key bytes read: 2 passes x N*T x layers x heads x dim x 2 B; `min_frac` also gives the
              rate counting each key once (what a single-read kernel would need to beat)
  scoring_lse the engine's default: the window queries' LSE comes from the decode attention, one key pass;
              bytes = N*T x layers x heads x dim x 2 B (frac_copy = min_frac)
`same_frac` compares each kernel with a torch copy moving the same traffic (bytes / 2 read, bytes / 2 written,
L2 flushed the same way): at small sizes launch latency and the tail of the last wave bound any kernel, a copy
included, so this column separates what the kernel could still gain from what the size allows.
The first pool of each model shape is exercised for --settle-ms before its first timing (the first rows after a
new allocation were outliers on the H100).
The KV pool is scattered like a paged SGLang pool after churn: each request's positions map to a random
permutation of 16-token pages (--page 1 for fully random slots).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GB = 1e9


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    kv_heads: int
    head_dim: int
    group: int            # query heads per KV head

    def kv_bytes_per_token(self, elem_size: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * elem_size


MODELS = (ModelShape("llama3-8b", 32, 8, 128, 4), ModelShape("qwen2.5-7b", 28, 4, 128, 7))
TINY = ModelShape("tiny", 2, 2, 64, 4)

FULL_GRID = dict(tokens=(4096, 8192, 16384, 32768), kept=(1024, 2048, 4096), requests=(1, 2, 4, 8, 16, 32, 64))
QUICK_GRID = dict(tokens=(8192, 32768), kept=(1024, 4096), requests=(1, 8, 32))
DRY_GRID = dict(tokens=(96,), kept=(40,), requests=(1, 3))


# ---------------------------------------------------------------------------------------------- byte math

def kv_bytes(model: ModelShape, requests: int, tokens: int, elem_size: int = 2) -> int:
    return requests * tokens * model.kv_bytes_per_token(elem_size)


def fits(model: ModelShape, requests: int, tokens: int, mem_bytes: float) -> bool:
    return kv_bytes(model, requests, tokens) <= mem_bytes


def compaction_moved_bytes(moved_rows: int, model: ModelShape, elem_size: int = 2) -> int:
    """moved_rows = (n, l, h, j) with keep[j] != j; K and V, read and written."""
    return moved_rows * model.head_dim * elem_size * 2 * 2


def compaction_formula_bytes(model: ModelShape, requests: int, kept: int, elem_size: int = 2) -> int:
    """2 x kept tokens x layers x heads x dim x bytes x (read + write): the bound when every token moves."""
    return 2 * requests * kept * model.layers * model.kv_heads * model.head_dim * elem_size * 2


def scoring_bytes(model: ModelShape, requests: int, tokens: int, passes: int = 2, elem_size: int = 2) -> int:
    return passes * requests * tokens * model.layers * model.kv_heads * model.head_dim * elem_size


def grid_rows(models, grid, mem_bytes):
    """(kernel, model, T, B, N) combinations to run; B is None for scoring (it does not depend on B)."""
    rows = []
    for model in models:
        for tokens in grid["tokens"]:
            for requests in grid["requests"]:
                if not fits(model, requests, tokens, mem_bytes):
                    continue
                rows.append(("scoring", model, tokens, None, requests))
                rows.append(("scoring_lse", model, tokens, None, requests))
                rows.extend(("compaction", model, tokens, kept, requests) for kept in grid["kept"] if kept < tokens)
    return rows


# ---------------------------------------------------------------------------------------------- inputs

@dataclasses.dataclass
class Pool:
    k_buffers: list
    v_buffers: list
    k_ptrs: torch.Tensor
    v_ptrs: torch.Tensor
    slots: int


def make_pool(model: ModelShape, slots: int, device, dtype=torch.bfloat16) -> Pool:
    """Per-layer K and V buffers [slots, H, d] like MHATokenToKVPool (random values, slot 0 reserved)."""
    def buffers():
        out = []
        for _ in range(model.layers):
            buf = torch.empty(slots, model.kv_heads, model.head_dim, dtype=dtype, device=device)
            buf.normal_()
            out.append(buf)
        return out
    k, v = buffers(), buffers()
    ptrs = lambda bufs: torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64, device=device)  # noqa: E731
    return Pool(k, v, ptrs(k), ptrs(v), slots)


def scattered_rows(requests: int, tokens: int, slots: int, page: int, device, generator) -> torch.Tensor:
    """req_to_token [requests + 1, tokens] (row 0 is SGLang's padding row): each request's positions on a random
    permutation of pages (position p in slot page * page_size + p % page_size)."""
    pages_per_req = -(-tokens // page)
    total_pages = (slots - page) // page            # page 0 reserved
    if requests * pages_per_req > total_pages:
        raise ValueError("pool too small for the requested tokens")
    perm = torch.randperm(total_pages, generator=generator)[:requests * pages_per_req] + 1
    pages = perm.view(requests, pages_per_req).repeat_interleave(page, dim=1)[:, :tokens]
    slot = pages * page + torch.arange(tokens) % page
    table = torch.zeros(requests + 1, tokens, dtype=torch.int32)
    table[1:] = slot.to(torch.int32)
    return table.to(device)


def stratified_keep(requests: int, model: ModelShape, tokens: int, kept: int, device, generator) -> torch.Tensor:
    """keep [N, L, H, B]: one random position in each of B equal strata of [0, T): ascending, distinct, spread."""
    shape = (requests, model.layers, model.kv_heads, kept)
    stride = tokens / kept
    base = (torch.arange(kept) * stride).floor()
    width = ((torch.arange(1, kept + 1) * stride).floor() - base).clamp(min=1)
    offset = (torch.rand(shape, generator=generator) * width).floor()
    return (base + offset).to(torch.int32).to(device)


# ---------------------------------------------------------------------------------------------- timing

def time_cuda(fn, warmup: int, reps: int, flush: torch.Tensor | None) -> float:
    """Median seconds of fn over reps CUDA-event timings; L2 flushed (flush.zero_()) before each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(device, gib: float, warmup: int, reps: int) -> float:
    """Device-to-device copy rate in bytes/s, read + write counted."""
    n = int(gib * 2 ** 30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = time_cuda(lambda: dst.copy_(src), warmup, reps, None)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / seconds


class SameSizeCopy:
    """Times a device copy of a given traffic (read + write bytes), reusing one pair of buffers of max_bytes in
    all (capped at --copy-gib: the KV pool holds most of the memory)."""

    def __init__(self, device, max_bytes: int):
        n = max(1, max_bytes // 4)                          # bf16 elements of half the traffic
        self.src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
        self.dst = torch.empty_like(self.src)

    def seconds(self, traffic_bytes: int, warmup: int, reps: int, flush) -> float:
        """Copy time for this traffic; beyond the buffers' size, their copy time scaled (linear there)."""
        want = max(1, traffic_bytes // 4)
        n = min(self.src.numel(), want)
        src, dst = self.src[:n], self.dst[:n]
        return time_cuda(lambda: dst.copy_(src), warmup, reps, flush) * want / n


def settle(fn, seconds: float) -> None:
    """Run fn for about `seconds` (clocks up, new allocation touched) before the first timing of a pool."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        fn()
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- runs

def run_scoring(pool: Pool, table, model: ModelShape, requests: int, tokens: int, window: int, device, generator,
                given_lse: bool = False, num_splits: int | None = None):
    from sglang_ams.kernels.scoring import window_attention_pool
    queries = torch.randn(requests, model.layers, model.kv_heads * model.group, window, model.head_dim,
                          generator=generator).to(torch.bfloat16).to(device)
    # Any finite LSE times the same work.
    row_lse = torch.full(queries.shape[:4], 16.0, device=device) if given_lse else None
    lengths = torch.full((requests,), tokens, dtype=torch.int32, device=device)
    rows = torch.arange(1, requests + 1, dtype=torch.int32, device=device)

    def fn():
        return window_attention_pool(pool.k_ptrs, table, rows, lengths, queries, kv_dtype=torch.bfloat16,
                                     num_kv_heads=model.kv_heads, head_dim=model.head_dim,
                                     slot_stride=pool.k_buffers[0].stride(0), group_reduce="mean", max_len=tokens,
                                     row_lse=row_lse, num_splits=num_splits)
    return fn


def run_compaction(pool: Pool, table, model: ModelShape, requests: int, tokens: int, kept: int, device, generator):
    from sglang_ams.kernels.compaction import compact_kv
    keep = stratified_keep(requests, model, tokens, kept, device, generator)
    n_keep = torch.full((requests,), kept, dtype=torch.int32, device=device)
    rows = torch.arange(1, requests + 1, dtype=torch.int32, device=device)
    moved = int((keep != torch.arange(kept, device=device)).sum())

    def fn():
        compact_kv(pool.k_ptrs, pool.v_ptrs, table, rows, keep, n_keep, kv_dtype=torch.bfloat16,
                   num_kv_heads=model.kv_heads, head_dim=model.head_dim, slot_stride=pool.k_buffers[0].stride(0))
    return fn, moved


def verify_small(device) -> dict:
    """Kernels against the torch references on a tiny pool (scattered slots, GQA 4, two requests)."""
    from sglang_ams.compaction import gather_kept
    from sglang_ams.kernels.compaction import compact_kv
    from sglang_ams.kernels.scoring import window_attention_pool
    from sglang_ams.window_attention import window_attention
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))     # the tests' fake pool
    from fake_pool import fake_pool
    g = torch.Generator().manual_seed(0)
    m, lengths, window = TINY, torch.tensor([96, 61], dtype=torch.int32), 8
    keys = torch.randn(2, m.layers, m.kv_heads, 96, m.head_dim, generator=g).to(torch.bfloat16).to(device)
    queries = torch.randn(2, m.layers, m.kv_heads * m.group, window, m.head_dim, generator=g).bfloat16().to(device)
    pool = fake_pool(keys, lengths.to(device), generator=g)
    mean, _ = window_attention_pool(pool.k_ptrs, pool.req_to_token, pool.req_rows, pool.lengths, queries,
                                    kv_dtype=torch.bfloat16, num_kv_heads=m.kv_heads, head_dim=m.head_dim,
                                    slot_stride=pool.slot_stride, group_reduce="mean")
    ref = window_attention(pool.dense("k").float(), queries.float(), pool.lengths).mean_rows
    ref = ref.view(2, m.layers, m.kv_heads, m.group, -1).mean(3)
    scoring_err = float((mean - ref).abs().max())

    keep = torch.stack([torch.sort(torch.randperm(61, generator=g)[:40]).values for _ in range(2 * m.layers * m.kv_heads)])
    keep = keep.view(2, m.layers, m.kv_heads, 40).to(torch.int32).to(device)
    want = gather_kept(pool.dense("k"), keep.long())
    compact_kv(pool.k_ptrs, pool.v_ptrs, pool.req_to_token, pool.req_rows, keep, torch.tensor([40, 40], device=device),
               kv_dtype=torch.bfloat16, num_kv_heads=m.kv_heads, head_dim=m.head_dim, slot_stride=pool.slot_stride)
    compaction_ok = bool(torch.equal(pool.dense("k")[..., :40, :], want))
    if scoring_err > 1e-4 or not compaction_ok:
        raise AssertionError(f"kernel check failed: scoring max error {scoring_err}, compaction exact {compaction_ok}")
    return {"scoring_max_abs_err": scoring_err, "compaction_exact": compaction_ok}


def measure(args, device) -> tuple[list[dict], float | None]:
    timed = device.type == "cuda"
    grid = DRY_GRID if args.dry_run else (QUICK_GRID if args.quick else FULL_GRID)
    models = (TINY,) if args.dry_run else MODELS
    if args.models:
        models = tuple(m for m in models if m.name in args.models.split(","))
    mem_bytes = args.mem_gb * GB
    plan = grid_rows(models, grid, mem_bytes)
    copy_bps = copy_bandwidth(device, args.copy_gib, args.warmup, args.reps) if timed else None
    flush = torch.empty(args.flush_mb * 2 ** 20 // 4, dtype=torch.float32, device=device) if timed else None
    generator = torch.Generator().manual_seed(args.seed)
    # The largest traffic of the plan: 2 passes over the biggest KV read (scoring) bounds every row's bytes.
    same = SameSizeCopy(device, min(2 * max(kv_bytes(r[1], r[4], r[2]) for r in plan), int(args.copy_gib * GB))) \
        if timed and plan else None
    results = []
    for model in models:
        todo = [r for r in plan if r[1] is model]
        if not todo:
            continue
        most_tokens = max(r[2] * r[4] for r in todo)
        pool = make_pool(model, most_tokens + 2 * args.page * (max(r[4] for r in todo) + 1), device)
        tables = {}
        settled = False
        for kernel, _, tokens, kept, requests in todo:
            key = (requests, tokens)
            if key not in tables:
                tables = {key: scattered_rows(requests, tokens, pool.slots, args.page, device, generator)}
            table = tables[key]
            row = dict(kernel=kernel, model=model.name, layers=model.layers, kv_heads=model.kv_heads,
                       head_dim=model.head_dim, group=model.group, tokens=tokens, kept=kept, requests=requests,
                       kv_gb=kv_bytes(model, requests, tokens) / GB)
            if kernel.startswith("scoring"):
                one_pass = kernel == "scoring_lse"
                splits = args.num_splits
                if splits is None and args.programs_per_sm:
                    from sglang_ams.kernels.scoring import default_num_splits
                    splits = default_num_splits(requests * model.layers * model.kv_heads, tokens, device,
                                                programs_per_sm=args.programs_per_sm)
                fn = run_scoring(pool, table, model, requests, tokens, args.window, device, generator, one_pass,
                                 splits)
                row.update(num_splits=splits, window=args.window,
                           bytes=scoring_bytes(model, requests, tokens, 1 if one_pass else 2),
                           min_bytes=scoring_bytes(model, requests, tokens, passes=1))
            else:
                fn, moved = run_compaction(pool, table, model, requests, tokens, kept, device, generator)
                row.update(moved_rows=moved, bytes=compaction_moved_bytes(moved, model),
                           formula_bytes=compaction_formula_bytes(model, requests, kept))
            if timed:
                if not settled:
                    settle(fn, args.settle_ms / 1e3)
                    settled = True
                seconds = time_cuda(fn, args.warmup, args.reps, flush)
                copy_s = same.seconds(row["bytes"], args.warmup, args.reps, flush)
                row.update(ms=seconds * 1e3, gbps=row["bytes"] / seconds / GB,
                           frac_copy=row["bytes"] / seconds / copy_bps, same_copy_ms=copy_s * 1e3,
                           same_frac=copy_s / seconds)
                if kernel.startswith("scoring"):
                    row["min_frac"] = row["min_bytes"] / seconds / copy_bps
            else:
                fn()                                   # interpreter: it runs, no timing claims
            results.append(row)
            print(format_row(row), flush=True)
        del pool, tables
        if timed:
            torch.cuda.empty_cache()
    return results, copy_bps


# ---------------------------------------------------------------------------------------------- output

COLUMNS = ("kernel", "model", "tokens", "kept", "requests", "kv_gb", "ms", "gbps", "frac_copy", "min_frac",
           "same_frac")


def format_row(row: dict) -> str:
    cells = []
    for c in COLUMNS:
        v = row.get(c)
        cells.append("-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
    return "  ".join(f"{x:>10}" for x in cells)


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("AMS_GIT_COMMIT", "unknown")


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-interpreter"


def report(args, device, results, copy_bps) -> dict:
    return dict(
        device=device_name(device), date=datetime.date.today().isoformat(), git_commit=git_commit(),
        command=" ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), dry_run=args.dry_run,
        torch=torch.__version__, triton=__import__("triton").__version__,
        copy_gbps=None if copy_bps is None else copy_bps / GB,
        settings=dict(warmup=args.warmup, reps=args.reps, window=args.window, page=args.page, mem_gb=args.mem_gb,
                      flush_mb=args.flush_mb, quick=args.quick, num_splits=args.num_splits,
                      programs_per_sm=args.programs_per_sm,
                      settle_ms=args.settle_ms),
        rows=results)


def output_path(args, device) -> Path:
    if args.out:
        return Path(args.out)
    stamp = datetime.date.today().strftime("%Y%m%d")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-")
    return RESULTS_DIR / f"kernels-{stamp}-{slug}.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short grid")
    p.add_argument("--dry-run", action="store_true", help="tiny grid, no timings; runs on CPU (interpreter)")
    p.add_argument("--models", default="", help="comma-separated subset of: " + ",".join(m.name for m in MODELS))
    p.add_argument("--window", type=int, default=None, help="window queries W (default: PolicyConfig.window)")
    p.add_argument("--page", type=int, default=16, help="pool scatter granularity in tokens")
    p.add_argument("--mem-gb", type=float, default=60.0, help="skip combinations whose KV exceeds this")
    p.add_argument("--copy-gib", type=float, default=2.0, help="buffer size of the copy-bandwidth reference")
    p.add_argument("--flush-mb", type=int, default=256, help="L2 flush buffer written before each timed run")
    p.add_argument("--settle-ms", type=float, default=300.0,
                   help="run the first row of each pool this long before timing it")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-splits", type=int, default=None, help="scoring splits per row (default: the kernel's choice)")
    p.add_argument("--programs-per-sm", type=int, default=None,
                   help="scoring: the kernel's split rule with this many programs per SM (default: the kernel's)")
    p.add_argument("--out", default="", help="JSON path (default: benchmarks/results/kernels-<date>-<device>.json)")
    args = p.parse_args(argv)
    if args.window is None:
        from sglang_ams.config import PolicyConfig
        args.window = PolicyConfig().window
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        if not args.dry_run:
            raise SystemExit("no CUDA device: use --dry-run to check the script on CPU")
        os.environ.setdefault("TRITON_INTERPRET", "1")      # before the kernels import triton's JIT
        warnings.filterwarnings("ignore", message="Conversion of an array with ndim")   # interpreter noise
    if args.dry_run:
        args.page = min(args.page, 16)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checks = verify_small(device)
    print(f"device: {device_name(device)}; kernel check: {checks}")
    print("  ".join(f"{c:>10}" for c in COLUMNS))
    results, copy_bps = measure(args, device)
    out = report(args, device, results, copy_bps)
    out["check"] = checks
    if copy_bps is not None:
        print(f"copy bandwidth (read + write): {copy_bps / GB:.1f} GB/s")
    path = output_path(args, device)
    if not args.dry_run or args.out:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
        print(f"saved {path}")
    return out


if __name__ == "__main__":
    main()
