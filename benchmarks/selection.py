"""GPU time of the selection arithmetic of one compaction chunk (selection.select_ams and select_topk), the part of a
compaction step that runs as separate torch operations rather than as Triton kernels (177 top-level aten calls
per chunk for AMS, 32 for top-k, counted by --dry-run on the CPU; the same for any number of requests; 256 and 46
before the selection arithmetic was tightened, which the H200 run of 2026-12-02 measured at 265-285 kernel launches).
`ams-triton` is the same AMS selection as one kernel (--ams-selection triton; rows up to 4096 tokens): each of
its rows is also checked to equal the torch path's result.

    python benchmarks/selection.py              # GPU: the grid below, JSON under benchmarks/results/
    python benchmarks/selection.py --dry-run    # CPU: tiny shapes, checks only, no timings, nothing saved
    python benchmarks/selection.py --warps 2,4,8,16   # GPU: the kernel also at each warp count (tuning _warps)

Rows = (requests N, layers L, KV heads H) of T tokens each, B kept (AMS defaults of PolicyConfig: sink 4 pinned,
keep_lastn 32 recent, credit on). Inputs are random (scores, evidence and credit of the right shapes): the
arithmetic does the same work whatever the values. Each row: median of --reps CUDA-event timings after --warmup
runs, the kernels one call launches (torch.profiler) and the host time of one call without waiting for the GPU
(what the Python side costs; when it exceeds the GPU time the GPU idles between launches).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import save, table  # noqa: E402

from sglang_ams.config import PolicyConfig  # noqa: E402
from sglang_ams.engine.step_profile import top_level_aten  # noqa: E402
from sglang_ams.kernels import select_ams as ams_kernel  # noqa: E402
from sglang_ams.kernels.select_ams import MAX_TOKENS  # noqa: E402
from sglang_ams.selection import select_ams, select_topk  # noqa: E402

LAYERS, KV_HEADS = 32, 8                       # Llama-3-8B
GRID = dict(tokens=(1536, 4096, 16384), requests=(1, 6, 17, 64))
DRY = dict(tokens=(96,), requests=(1, 3))


def make_inputs(n, layers, heads, t, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (n, layers, heads, t)
    scores = torch.randn(shape, generator=g, device=device)
    evidence = torch.rand(shape, generator=g, device=device).pow(4)      # peaked, as attention mass is
    credit = torch.rand(shape, generator=g, device=device) / t
    lengths = torch.full((n,), t, device=device)
    return scores, evidence, credit, lengths


def calls(policy, cfg, inputs, budget):
    scores, evidence, credit, lengths = inputs
    n = lengths.shape[0]
    pinned = torch.full((n,), cfg.sink, device=lengths.device)
    keep = torch.full((n,), budget, device=lengths.device)
    if policy.startswith("ams"):
        kernel = policy.startswith("ams-triton")
        return lambda: select_ams(scores, evidence, lengths, pinned, keep, cfg, credit, k_max=budget, kernel=kernel)
    return lambda: select_topk(scores, lengths, pinned, keep, cfg.keep_lastn, k_max=budget)


def with_warps(fn, warps):
    """fn with the selection kernel launched at `warps` warps per program, whatever the block."""
    def call():
        shipped = ams_kernel._warps
        ams_kernel._warps = lambda block: warps
        try:
            return fn()
        finally:
            ams_kernel._warps = shipped
    return call


def gpu_ms(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def host_ms(fn, reps):
    """Wall time of the call itself, the GPU left to run behind it (synchronized before, not after)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
        torch.cuda.synchronize()
    return statistics.median(times)


def launches(fn, cuda):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = [e for e in prof.events() if e.device_type == kind]
    if cuda:
        return len(events)
    return sum(1 for e in events if top_level_aten(e))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--mem-gb", type=float, default=40.0, help="skip rows whose selection temporaries pass this")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warps", type=lambda v: [int(w) for w in v.split(",")], default=[],
                    help="also time the selection kernel at these warps per program (e.g. 2,4,8,16; rows "
                         "ams-triton-wN), each checked against the torch path too: tunes kernels/select_ams._warps")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.dry_run
    if not cuda and not a.dry_run:
        sys.exit("no GPU: use --dry-run for the CPU checks")
    device = torch.device("cuda" if cuda else "cpu")
    grid, layers, heads = (GRID, LAYERS, KV_HEADS) if cuda else (DRY, 2, 2)
    budget = a.budget if cuda else 40
    cfg = PolicyConfig(policy="ams", budget=budget)
    rows = []
    for t in grid["tokens"]:
        for n in grid["requests"]:
            row_tokens = n * layers * heads * t
            if row_tokens * cfg.selector.transient_bytes(4) > a.mem_gb * 1e9:
                continue
            inputs = make_inputs(n, layers, heads, t, device)
            reference = None
            policies = [("ams", None), ("ams-triton", None), *((f"ams-triton-w{w}", w) for w in a.warps),
                        ("topk", None)]
            for policy, warps in policies:
                if policy.startswith("ams-triton") and t > MAX_TOKENS:
                    continue
                fn = calls(policy, cfg, inputs, budget)
                if warps is not None:
                    fn = with_warps(fn, warps)
                sel = fn()
                if policy == "ams":
                    reference = sel
                elif policy.startswith("ams-triton"):
                    assert torch.equal(sel.indices, reference.indices) and torch.equal(sel.credit, reference.credit), \
                        "the selection kernel differs from the torch selection"
                kept = (sel.indices >= 0).sum(-1)
                assert int(kept.min()) == int(kept.max()) == min(budget, t), "every (layer, head) keeps B"
                row = {"policy": policy, "tokens": t, "requests": n, "kept": budget,
                       "launches": launches(fn, cuda)}
                if cuda:
                    g = gpu_ms(fn, a.warmup, a.reps)
                    row.update(gpu_ms=g, gpu_ms_per_request=g / n, host_ms=host_ms(fn, a.reps),
                               gb_per_s=row_tokens * 4 / (g / 1e3) / 1e9)
                rows.append(row)
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            del inputs
            if cuda:
                torch.cuda.empty_cache()
    cols = ["policy", "tokens", "requests", "launches"] + (["gpu_ms", "gpu_ms_per_request", "host_ms", "gb_per_s"]
                                                           if cuda else [])
    print(table(rows, cols))
    if cuda:
        path = save("selection", rows, {"shape": f"{layers} layers x {heads} KV heads", "budget": budget})
        print(f"saved {path}")
    return rows


if __name__ == "__main__":
    main()
