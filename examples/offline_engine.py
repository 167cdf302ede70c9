"""Offline batches through `sglang.Engine` with a KV policy, a per-request budget override, and the counters.

    python examples/offline_engine.py --model-path MODEL [--budget 256]

The engine runs AMS at --budget for every request; the second half of the batch asks for half that budget
through `custom_params["kv_policy"]` and one request turns compression off. The compaction counters come from
`engine.get_server_info()`.
"""
from __future__ import annotations

import argparse


def kv_override(**fields) -> dict:
    """sampling_params entry that overrides the KV policy of one request (policy, budget, interval, scorer)."""
    return {"custom_params": {"kv_policy": fields or "none"}}


def build_batch(questions: list[str], budget: int, max_new_tokens: int) -> tuple[list[str], list[dict]]:
    prompts, params = [], []
    for i, q in enumerate(questions):
        sp = {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}
        if i == 0:
            sp.update(kv_override())                                   # full KV for this one
        elif i >= len(questions) // 2:
            sp.update(kv_override(budget=max(budget // 2, 64)))         # a tighter budget
        prompts.append(f"Question: {q}\nLet's think step by step.\n")
        params.append(sp)
    return prompts, params


def ams_counters(server_info: dict) -> list[dict]:
    return [state["sglang_ams"] for state in server_info.get("internal_states", []) if "sglang_ams" in state]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--interval", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=768)
    ap.add_argument("--mem-fraction-static", type=float, default=0.3)
    args = ap.parse_args(argv)

    import sglang as sgl
    engine = sgl.Engine(model_path=args.model_path, kv_policy="ams", kv_budget=args.budget,
                        kv_interval=args.interval, mem_fraction_static=args.mem_fraction_static)
    try:
        questions = ["What is 17 * 23?", "Why is the sky blue?", "Sort 5, 3, 9, 1.", "What is a prime number?",
                     "How many days are in 3 weeks?", "Explain recursion.", "What is 2 ** 10?", "Name a noble gas."]
        prompts, params = build_batch(questions, args.budget, args.max_new_tokens)
        outputs = engine.generate(prompts, params)
        for q, sp, out in zip(questions, params, outputs):
            policy = sp.get("custom_params", {}).get("kv_policy", f"server default (ams, {args.budget})")
            print(f"[{policy}] {q} -> {out['meta_info']['completion_tokens']} tokens: "
                  f"{out['text'].strip()[:80]!r}")
        for rank, c in enumerate(ams_counters(engine.get_server_info())):
            print(f"scheduler {rank}: {c['compactions']} compactions, {c['tokens_freed']} tokens freed, "
                  f"kept ratio {c['kept_ratio']:.3f}, scoring {c['score_gpu_ms']:.1f} ms, "
                  f"compacting {c['compact_gpu_ms']:.1f} ms")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
