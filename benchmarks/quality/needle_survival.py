"""Which needle tokens survive the first compaction, per policy: a continuous view of what the 0/1 needle score
hides. CPU reference loop, one scorer, the harness's settings.

    python benchmarks/quality/needle_survival.py --model qwen2.5-coder-0.5b --budget 0.25 \
        --lengths 1000,2000 --depths 0.1,0.5,0.9 --out benchmarks/results/.../needle_survival.json

For each grid point and policy: the answer, whether it is right, and for every token of the needle sentence the
fraction of (layer, KV head) pairs that kept it after the first compaction (plus the share of heads that kept
none of the needle).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qb_harness as H  # noqa: E402

from sglang_ams import demo, reference  # noqa: E402
from sglang_ams.config import PolicyConfig  # noqa: E402


def first_kept_positions(model, tokenizer, task, cfg: PolicyConfig):
    """Run the reference loop; return (result, positions [L, H, K] kept by the first compaction)."""
    kept = []
    real_run = reference._Compactor.run

    def recording_run(self, kv, ring, logical):
        out = real_run(self, kv, ring, logical)
        kept.append(kv.positions.clone().cpu())
        return out
    reference._Compactor.run = recording_run
    try:
        result = reference.generate_reference(model, task.prompt_ids, cfg, task.max_new_tokens, tokenizer=tokenizer,
                                              forced_tokens=task.forced_ids)
    finally:
        reference._Compactor.run = real_run
    return result, (kept[0] if kept else None)


def region_kept(kept: torch.Tensor, regions: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Per region [a, b): the fraction of its (token, layer, head) entries that were kept."""
    out = {}
    for name, (a, b) in regions.items():
        if b > a:
            out[name] = float(((kept >= a) & (kept < b)).sum(-1).float().mean()) / (b - a)
    return out


def survival(kept: torch.Tensor, start: int, end: int) -> tuple[list[float], float]:
    """Per needle token, the fraction of (layer, head) keeping it; and the share of heads keeping none of it."""
    per_token = [float((kept == p).any(-1).float().mean()) for p in range(start, end)]
    in_span = ((kept >= start) & (kept < end)).any(-1)
    return per_token, float((~in_span).float().mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--scorer", default="snapkv")
    ap.add_argument("--policies", default="topk,ams")
    ap.add_argument("--budget", type=float, default=0.25, help="fraction of the prompt")
    ap.add_argument("--lengths", default="1000,2000")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tokenizer = demo.load_model(a.model, dtype=torch.float32, progress=False)
    data = demo.find_data_dir()
    rows = []
    for seed in range(a.seeds):
        for length in (int(x) for x in a.lengths.split(",")):
            for depth in (float(x) for x in a.depths.split(",")):
                task = demo.needle_task(tokenizer, data, context_tokens=length, depth=depth, seed=seed,
                                        max_new_tokens=12)
                budget = max(1, int(a.budget * len(task.prompt_ids)))
                start, end = task.spans["needle"]
                tokens = tokenizer.convert_ids_to_tokens(task.prompt_ids[start:end])
                for policy in a.policies.split(","):
                    cfg = PolicyConfig(policy=policy, scorer=a.scorer, budget=budget,
                                       interval=max(8, budget // 4), **H.HARNESS_DEFAULTS)
                    t0 = time.perf_counter()
                    result, kept = first_kept_positions(model, tokenizer, task, cfg)
                    per_token, blind = survival(kept, start, end)
                    n = len(task.prompt_ids)
                    regions = {"haystack before": (cfg.sink, start), "needle": (start, end),
                               "haystack after": (end, n - 64), "last 64 prompt tokens": (n - 64, n)}
                    row = dict(length=length, depth=depth, seed=seed, policy=policy, scorer=a.scorer, budget=budget,
                               answer=result.text, correct=bool(task.check(result.text or "")),
                               needle_tokens=tokens, kept_per_token=per_token,
                               kept_mean=sum(per_token) / len(per_token), heads_without_needle=blind,
                               region_kept=region_kept(kept, regions),
                               seconds=time.perf_counter() - t0)
                    rows.append(row)
                    print(f"{length} {depth:.1f} seed {seed} {policy:5s} correct {row['correct']!s:5s} "
                          f"{result.text!r:12s} needle kept {row['kept_mean']:.3f}, heads without any {blind:.3f}; "
                          + ", ".join(f"{k} {v:.3f}" for k, v in row["region_kept"].items()), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(command=" ".join(sys.argv), settings=H.HARNESS_DEFAULTS, rows=rows),
                                      indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
