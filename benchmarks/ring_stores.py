"""GPU time of the query-ring stores of one decode step (every layer's queries and LSE), for both store paths
(--ams-ring-store torch: QueryRing.write + write_lse; triton: QueryRing.store) and both ways SGLang runs a decode
step: eager (batches past its largest decode graph) and replayed from a CUDA graph (the stores are captured into
every decode graph, rows lent or not). Llama-3-8B shape by default. GPU only.

    python benchmarks/ring_stores.py [--batches 128,512] [--lent 0,100] [--layers 32] [--reps 50]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import save, table

from sglang_ams.engine.ring import QueryRing


def step_fn(ring: QueryRing, path: str, layers: int, q, lse, pool_idx, positions):
    def step():
        for layer in range(layers):
            if path == "torch":
                ring.write(layer, q, pool_idx, positions)
                ring.write_lse(layer, lse, pool_idx, positions)
            else:
                ring.store(layer, q, lse, pool_idx, positions)
    return step


def time_ms(run, reps: int) -> tuple[float, float]:
    """(host ms, host + GPU ms) per call."""
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return 1e3 * (t1 - t0) / reps, 1e3 * (time.perf_counter() - t0) / reps


def measure(a, batch: int, lent: int, path: str, mode: str) -> dict:
    dev = "cuda"
    ring = QueryRing(a.layers, a.rows, a.window, a.q_heads, a.head_dim, 4 * batch, torch.bfloat16, dev)
    if path == "triton":
        ring.compile_store()
    pool_idx = torch.arange(1, batch + 1, device=dev, dtype=torch.int32)     # SGLang's graph buffers are int32
    positions = torch.randint(0, 4096, (batch,), device=dev)
    for i in range(min(lent, a.rows, batch)):
        ring.acquire(i + 1)
    q = torch.randn(batch, a.q_heads * a.head_dim, device=dev, dtype=torch.bfloat16)
    lse = torch.randn(batch, a.q_heads, device=dev)
    step = step_fn(ring, path, a.layers, q, lse, pool_idx, positions)
    run = step
    if mode == "graph":
        step()                                          # warm-up outside the capture (as SGLang does)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    host, total = time_ms(run, a.reps)
    return {"path": path, "mode": mode, "batch": batch, "lent": lent, "layers": a.layers,
            "host_ms_per_step": round(host, 4), "with_gpu_ms_per_step": round(total, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="128,512")
    p.add_argument("--lent", default="0,100", help="rows lent to requests of the batch (comma list)")
    p.add_argument("--paths", default="torch,triton")
    p.add_argument("--modes", default="eager,graph")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--rows", type=int, default=696, help="ring rows (the 8B server's at budget 1024)")
    p.add_argument("--reps", type=int, default=50)
    a = p.parse_args()
    rows = [measure(a, int(b), int(n), path, mode) for b in a.batches.split(",") for n in a.lent.split(",")
            for mode in a.modes.split(",") for path in a.paths.split(",")]
    print(table(rows, list(rows[0])))
    print(save("ring_stores", rows, {"args": vars(a)}))


if __name__ == "__main__":
    main()
