"""Host and GPU time of the query-ring stores of one eager decode step: per layer the queries and their LSE go
into the ring (QueryRing.write, write_lse), as the decode hooks do past SGLang's largest decode graph while some
request holds a row. Llama-3-8B shape by default. GPU only.

    python benchmarks/ring_stores.py [--batch 512] [--layers 32] [--lent 100] [--reps 50]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--rows", type=int, default=696, help="ring rows (the 8B server's at budget 1024)")
    p.add_argument("--lent", type=int, default=100, help="rows lent to requests of the batch")
    p.add_argument("--reps", type=int, default=50)
    a = p.parse_args()
    dev = "cuda"
    ring = QueryRing(a.layers, a.rows, a.window, a.q_heads, a.head_dim, 4 * a.batch, torch.bfloat16, dev)
    pool_idx = torch.arange(1, a.batch + 1, device=dev)
    positions = torch.randint(0, 4096, (a.batch,), device=dev)
    for i in range(min(a.lent, a.rows, a.batch)):
        ring.acquire(i + 1)
    q = torch.randn(a.batch, a.q_heads * a.head_dim, device=dev, dtype=torch.bfloat16)
    lse = torch.randn(a.batch, a.q_heads, device=dev)

    def step():
        for layer in range(a.layers):
            ring.write(layer, q, pool_idx, positions)
            ring.write_lse(layer, lse, pool_idx, positions)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.reps):
        step()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    row = {"batch": a.batch, "layers": a.layers, "lent": a.lent, "launch_ms_per_step": 1e3 * (t1 - t0) / a.reps,
           "with_gpu_ms_per_step": 1e3 * (t2 - t0) / a.reps}
    print(table([row], list(row)))
    print(save("ring_stores", [row], {"args": vars(a)}))


if __name__ == "__main__":
    main()
