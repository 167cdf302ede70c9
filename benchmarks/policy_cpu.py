"""Time to score and select on the CPU: B = 1024 kept of T = 4096 tokens, 28 layers × 4 KV heads
(Qwen2.5-7B shape: 28 query heads, head_dim 128), one request, for every scorer under topk and ams.

    python benchmarks/policy_cpu.py [--tokens 4096] [--budget 1024] [--reps 3] [--scorers tova,snapkv]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import save, table  # noqa: E402

from sglang_ams.config import SCORERS, PolicyConfig  # noqa: E402
from sglang_ams.rope import RopeSpec  # noqa: E402
from sglang_ams.scorers.base import ScoreInputs  # noqa: E402
from sglang_ams.scorers.builtin import make_scorer  # noqa: E402
from sglang_ams.window_attention import window_attention  # noqa: E402


def make_inputs(tokens, layers, kv_heads, q_heads, dim, window, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, layers, kv_heads, tokens, dim, generator=g)
    values = torch.randn(1, layers, kv_heads, tokens, dim, generator=g)
    queries = torch.randn(1, layers, q_heads, window, dim, generator=g)
    rope = RopeSpec(inv_freq=1.0 / (1e6 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)))
    qpos = torch.arange(tokens - window, tokens)[None]
    return ScoreInputs(keys=keys, values=values, lengths=torch.tensor([tokens]), queries=queries,
                       query_pos=qpos, rope=rope)


def timed(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--q-heads", type=int, default=28)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--scorers", default=",".join(SCORERS))
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    base = make_inputs(a.tokens, a.layers, a.kv_heads, a.q_heads, a.head_dim, PolicyConfig().window)
    t_attn, attn = timed(lambda: window_attention(base.keys, base.queries, base.lengths), a.reps)
    n_pinned, n_keep = torch.tensor([4]), torch.tensor([a.budget])
    rows = []
    for name in a.scorers.split(","):
        for policy in ("topk", "ams"):
            cfg = PolicyConfig(policy=policy, scorer=name, budget=a.budget)
            scorer = make_scorer(cfg)
            inputs = ScoreInputs(**{**base.__dict__, "attn": attn})
            t_score, scores = timed(lambda: scorer.score(inputs), a.reps)
            t_sel, sel = timed(lambda: cfg.selector.select(scores, inputs, n_pinned, n_keep, None, k_max=a.budget),
                               a.reps)
            assert int((sel.indices >= 0).sum(-1).min()) == a.budget
            rows.append({"scorer": name, "policy": policy, "score_ms": 1e3 * t_score, "select_ms": 1e3 * t_sel,
                         "total_ms": 1e3 * (t_score + t_sel)})
            print(f"{name:>18} {policy:>4}: score {1e3 * t_score:8.1f} ms  select {1e3 * t_sel:7.1f} ms", flush=True)
    print(f"\nwindow attention (shared by attention scorers and AMS evidence): {1e3 * t_attn:.1f} ms")
    print(f"T={a.tokens}, B={a.budget}, {a.layers} layers x {a.kv_heads} KV heads ({a.q_heads} query heads), "
          f"head_dim {a.head_dim}, {torch.get_num_threads()} threads\n")
    print(table(rows, ["scorer", "policy", "score_ms", "select_ms", "total_ms"]))
    if not a.no_save:
        extra = {"window_attention_ms": 1e3 * t_attn, "threads": torch.get_num_threads(),
                 "shape": dict(tokens=a.tokens, budget=a.budget, layers=a.layers, kv_heads=a.kv_heads,
                               q_heads=a.q_heads, head_dim=a.head_dim)}
        print("saved", save("policy_cpu", rows, extra))
    return rows


if __name__ == "__main__":
    main()
