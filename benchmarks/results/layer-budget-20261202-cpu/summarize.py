"""Paired table: uniform vs adaptive layer budgets on the examples both finished (python summarize.py).

The 20261201 summarize.py with the model in the key (this folder holds 0.5B and 1.5B rows), mean peak KV per
cell (both arms must match: equal total), and a pooled exact sign test over the discordant pairs.
"""
import collections
import json
import math
from pathlib import Path

rows = [json.loads(line) for line in open(Path(__file__).parent / "results.jsonl")]
by = collections.defaultdict(dict)
for r in rows:
    lb = r["overrides"].get("layer_budget", "uniform")
    by[(r["model"], r["task"], r["policy"], r["scorer"], r["budget_frac"], lb)][r["example_id"]] = r


def prefix(r):
    """kv_retrieval: how many leading characters of the 36-character value the answer gets right (all arms fail
    the exact match at 25 %, so this is the finer paired measure)."""
    text, gold = r["text"].strip().lstrip('"'), r["gold"]
    return next((i for i, (x, y) in enumerate(zip(text, gold)) if x != y), min(len(text), len(gold)))


def sign_p(wins, losses):
    """Two-sided exact sign test on the discordant pairs."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


print("| model | task | policy | budget (tokens) | n (paired) | uniform | adaptive | adaptive wins / losses "
      "| wipe-out 32-tok uniform / adaptive |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|")
total = collections.Counter()
for k in sorted({k[:5] for k in by}):
    u, a = by.get(k + ("uniform",), {}), by.get(k + ("adaptive",), {})
    both = sorted(set(u) & set(a))
    if not both:
        continue

    def wipe(d):
        w = sum(d[e].get("wipeout_fixed32", [0, 0])[0] for e in both)
        t = sum(d[e].get("wipeout_fixed32", [0, 0])[1] for e in both)
        return f"{100 * w / t:.1f} %" if t else "-"
    cu, ca = sum(u[e]["correct"] for e in both), sum(a[e]["correct"] for e in both)
    wins = sum(a[e]["correct"] and not u[e]["correct"] for e in both)
    losses = sum(u[e]["correct"] and not a[e]["correct"] for e in both)
    total["wins"] += wins
    total["losses"] += losses
    total["pairs"] += len(both)
    tokens = sorted({u[e]["budget"] for e in both})
    span = f"{tokens[0]}" if len(tokens) == 1 else f"{tokens[0]}-{tokens[-1]}"
    print(f"| {k[0]} | {k[1]} | {k[2]}/{k[3]} | {k[4]:g} ({span}) | {len(both)} | {cu}/{len(both)} | {ca}/{len(both)} "
          f"| {wins} / {losses} | {wipe(u)} / {wipe(a)} |")
print()
kv = [k for k in sorted({k[:5] for k in by}) if k[1] == "kv_retrieval"]
if kv:
    print("kv_retrieval, correct leading characters of the value (of 36), paired:")
    print()
    print("| model | policy | budget | n | mean uniform | mean adaptive | adaptive longer / shorter / equal | sign p |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for k in kv:
        u, a = by.get(k + ("uniform",), {}), by.get(k + ("adaptive",), {})
        both = sorted(set(u) & set(a))
        if not both:
            continue
        pu, pa = [prefix(u[e]) for e in both], [prefix(a[e]) for e in both]
        longer = sum(y > x for x, y in zip(pu, pa))
        shorter = sum(y < x for x, y in zip(pu, pa))
        print(f"| {k[0]} | {k[2]}/{k[3]} | {k[4]:g} | {len(both)} | {sum(pu) / len(both):.1f} | {sum(pa) / len(both):.1f} "
              f"| {longer} / {shorter} / {len(both) - longer - shorter} | {sign_p(longer, shorter):.3g} |")
    print()
full = collections.defaultdict(list)
for r in rows:
    if r["policy"] == "none":
        full[(r["model"], r["task"])].append(r)
for (model, task), rs in sorted(full.items()):
    extra = f", mean leading characters {sum(map(prefix, rs)) / len(rs):.1f}" if task == "kv_retrieval" else ""
    print(f"Full KV reference, {model} {task}: {sum(r['correct'] for r in rs)}/{len(rs)}{extra}")
print()
print(f"All cells: {total['pairs']} pairs, adaptive wins {total['wins']}, losses {total['losses']}, "
      f"two-sided sign test p = {sign_p(total['wins'], total['losses']):.3g}")
print(f"{len(rows)} rows; examples: {', '.join(sorted({r['model'] + ':' + r['task'] + ':' + r['example_id'] for r in rows}))}")
