"""Paired table: uniform vs adaptive layer budgets on the examples both finished (python summarize.py)."""
import collections
import json
from pathlib import Path

rows = [json.loads(line) for line in open(Path(__file__).parent / "results.jsonl")]
by = collections.defaultdict(dict)
for r in rows:
    lb = r["overrides"].get("layer_budget", "uniform")
    by[(r["task"], r["policy"], r["scorer"], r["budget_frac"], lb)][r["example_id"]] = r
print("| task | policy | budget | n (paired) | uniform | adaptive | adaptive wins / losses | wipe-out 32-tok uniform / adaptive |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for k in sorted({k[:4] for k in by}):
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
    print(f"| {k[0]} | {k[1]}/{k[2]} | {k[3]:g} | {len(both)} | {cu}/{len(both)} | {ca}/{len(both)} | {wins} / {losses} "
          f"| {wipe(u)} / {wipe(a)} |")
print()
print(f"{len(rows)} rows; examples: {', '.join(sorted({r['example_id'] for r in rows}))}")
