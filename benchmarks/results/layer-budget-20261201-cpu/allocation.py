"""Per-layer budgets the allocator gives on one needle prompt (Qwen2.5-Coder-0.5B, 10 %, snapkv, prefill window)."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks" / "quality"))
import qb_harness as H  # noqa: E402
import qb_tasks as T  # noqa: E402
from sglang_ams import demo, layer_budget  # noqa: E402
from sglang_ams.reference import generate_reference  # noqa: E402

torch.set_num_threads(2)
model, tok = demo.load_model("qwen2.5-coder-0.5b", progress=False)
opts = T.TaskOptions(max_new_tokens=12, needle_lengths=(1000,), needle_depths=(float(sys.argv[1]) if len(sys.argv) > 1 else 0.5,), needle_seeds=1)
ex = next(iter(T.load_examples("needle", tok, Path("/work/shared/data"), 1, opts)))
seen = []
orig = layer_budget.missed_mass


def spy(evidence, comp, keep_c):
    w = orig(evidence, comp, keep_c)
    seen.append(w[0].clone())
    return w


layer_budget.missed_mass = spy
for policy in ("topk", "ams"):
    spec = H.PolicySpec(policy, "snapkv", 0.1, (("delta", 0.02), ("prefill_window", True), ("layer_budget", "adaptive")))
    cfg = spec.config(ex.basis)
    seen.clear()
    r = generate_reference(model, ex.prompt_ids, cfg, 12, tokenizer=tok, eos_token_ids=demo.stop_token_ids(model, tok),
                           forced_tokens=ex.forced_ids)
    counts = (r.compactions[0].kept >= 0).sum(-1)[:, 0]
    print(policy, "budget", cfg.budget, "text", repr(r.text), "gold", ex.gold)
    print("  missed mass per layer:", [round(float(x), 3) for x in seen[0]])
    print("  kept per layer       :", counts.tolist())
