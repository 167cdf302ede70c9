"""SGLang frontend-language programs against a server started with a KV policy.

    python -m sglang.launch_server --model-path MODEL --kv-policy ams --kv-budget 512 --kv-interval 128 --port 30000
    python examples/frontend_programs.py --url http://127.0.0.1:30000

Four programs: a long chain of thought (`gen`), parallel branches that share the question's prefix (`fork`),
a multi-turn conversation and a few-shot prompt. The frontend language has no per-request KV override, so these
run under the server's policy; afterwards the script reads the compaction counters from /get_server_info.
"""
from __future__ import annotations

import argparse
import json
import urllib.request

import sglang as sgl

FEW_SHOT = [("What is 12 + 30?", "42"), ("What is 7 * 6?", "42"), ("What is 100 - 58?", "42")]


@sgl.function
def reasoning(s, question, max_tokens):
    s += sgl.user(question + " Think step by step, then give the final answer.")
    s += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=0))


@sgl.function
def branches(s, question, num_branches, max_tokens):
    s += question + "\n"
    forks = s.fork(num_branches)
    for i, f in enumerate(forks):
        f += f"Approach {i + 1}:" + sgl.gen("step", max_tokens=max_tokens, temperature=0.8)
    forks.join()
    s += "Best approach: " + sgl.gen("best", max_tokens=32, temperature=0)


@sgl.function
def conversation(s, turns, max_tokens):
    for i, turn in enumerate(turns):
        s += sgl.user(turn)
        s += sgl.assistant(sgl.gen(f"turn{i}", max_tokens=max_tokens, temperature=0))


@sgl.function
def few_shot(s, question):
    for q, a in FEW_SHOT:
        s += f"Q: {q}\nA: {a}\n\n"
    s += f"Q: {question}\nA:" + sgl.gen("answer", max_tokens=16, stop="\n", temperature=0)


def ams_counters(server_info: dict) -> list[dict]:
    """The plugin's counters per scheduler (one per TP/DP rank) from a /get_server_info reply."""
    return [state["sglang_ams"] for state in server_info.get("internal_states", []) if "sglang_ams" in state]


def server_info(url: str) -> dict:
    with urllib.request.urlopen(url.rstrip("/") + "/get_server_info", timeout=30) as reply:
        return json.loads(reply.read())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    ap.add_argument("--max-tokens", type=int, default=1024, help="length of the long generations")
    args = ap.parse_args(argv)
    sgl.set_default_backend(sgl.RuntimeEndpoint(args.url))

    question = "A train travels 60 km in 45 minutes. How far does it travel in 3 hours at the same speed?"
    state = reasoning.run(question=question, max_tokens=args.max_tokens)
    print("== reasoning\n", state["answer"][-300:])
    state = branches.run(question=question, num_branches=3, max_tokens=args.max_tokens // 4)
    print("== fork: best approach:", state["best"].strip())
    state = conversation.run(turns=["Name three prime numbers.", "Multiply them.", "Is the result prime? Why?"],
                             max_tokens=args.max_tokens // 4)
    print("== multi-turn, last answer:", state["turn2"].strip()[:200])
    states = few_shot.run_batch([{"question": q} for q in ("What is 50 - 8?", "What is 21 * 2?")])
    print("== few-shot batch:", [s["answer"].strip() for s in states])
    for rank, counters in enumerate(ams_counters(server_info(args.url))):
        print(f"== sglang-ams counters (scheduler {rank}): {counters['compactions']} compactions, "
              f"{counters['tokens_freed']} tokens freed, kept ratio {counters['kept_ratio']:.3f}")


if __name__ == "__main__":
    main()
