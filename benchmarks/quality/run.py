"""Quality benchmark: full KV vs global top-k vs AMS (and streaming) on real models, resumable.

    python benchmarks/quality/run.py --backend reference --model smollm2-135m --tasks gsm8k_cot,needle \
        --limit 8 --budgets 0.25 --scorers snapkv --policies topk,ams,none --out benchmarks/results/quality-cpu

    # the whole sweep of DESIGN.md §6 (9 scorers x {topk, ams} x {10, 25, 50%} + full KV + streaming) and the
    # §2 ablations, against a GPU server started with the flags printed by --print-server-flags:
    python benchmarks/quality/run.py --backend server --url http://127.0.0.1:30000 --model qwen2.5-coder-1.5b \
        --tasks gsm8k_cot,gsm8k_8shot,math500,kv_retrieval,needle,nq_open,triviaqa --limit 200 --sweep full \
        --out benchmarks/results/quality-gpu

Every finished (task, example, policy) appends one line to OUT/results.jsonl; a rerun with the same OUT skips
what is there (the key: backend, model, task, example id, max_new_tokens, policy hash). At the end (or with
--report-only) report.py writes OUT/report.md, OUT/summary.json and PNG plots. Greedy decoding everywhere; one
prompt per example shared by every policy (qb_tasks). See qb_backends for the server path's rules.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import qb_harness as H  # noqa: E402
import qb_tasks as T  # noqa: E402
from sglang_ams.config import SCORERS, ConfigError  # noqa: E402


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _settings(items: list[str]) -> tuple[tuple[str, object], ...]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--set wants key=value, got {item!r}")
        out.append((key.strip(), _value(value.strip())))
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("reference", "server"), default="reference")
    ap.add_argument("--model", default="smollm2-135m", help="a sglang_ams.models name (tokenizer for the server)")
    ap.add_argument("--url", default="http://127.0.0.1:30000", help="server backend: SGLang server address")
    ap.add_argument("--server-policy", default="ams", help="server backend: the --kv-policy it was started with")
    ap.add_argument("--server-scorer", default="snapkv", help="server backend: the --kv-scorer it was started with")
    ap.add_argument("--print-server-flags", action="store_true", help="print the server launch flags and exit")
    ap.add_argument("--tasks", type=_csv, default=["gsm8k_cot", "needle"])
    ap.add_argument("--limit", type=int, default=8, help="examples per task (needle: grid points); 0 = all")
    ap.add_argument("--max-new-tokens", default="", help="N for every task, or task=N,task=N")
    ap.add_argument("--policies", type=_csv, default=["none", "topk", "ams"])
    ap.add_argument("--scorers", default="snapkv", help="comma list or 'all'")
    ap.add_argument("--budgets", type=lambda s: [float(x) for x in _csv(s)], default=[0.25],
                    help="fractions of each example's basis (qb_tasks.BASIS)")
    ap.add_argument("--sweep", choices=("select", "full"), default="select",
                    help="full: every scorer x {topk, ams} x budgets + full KV + streaming (ignores --policies)")
    ap.add_argument("--ablations", action="store_true",
                    help="add AMS with fixed-length segments / no credit / no mass at --ablation-budget")
    ap.add_argument("--ablation-budget", type=float, default=None, help="default: the first of --budgets")
    ap.add_argument("--layer-budgets", type=_csv, default=["uniform"],
                    help="uniform,adaptive: every top-k/AMS policy with each (reference backend; same total KV)")
    ap.add_argument("--set", dest="settings", action="append", default=[],
                    help="PolicyConfig field for every policy, e.g. --set keep_lastn=32 (changes the hash)")
    ap.add_argument("--needle-lengths", type=lambda s: [int(x) for x in _csv(s)], default=[1000, 2000])
    ap.add_argument("--needle-depths", type=lambda s: [float(x) for x in _csv(s)], default=[0.1, 0.5, 0.9])
    ap.add_argument("--needle-seeds", type=int, default=1)
    ap.add_argument("--kv-keys", type=int, default=75, help="kv_retrieval: key-value records per prompt")
    ap.add_argument("--data", default=None, help="data folder (default: $SGLANG_AMS_DATA or ../shared/data)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="server backend: requests in flight at once (the server batches them; outputs of a "
                         "batched greedy run may differ from a lone one in the last bits)")
    ap.add_argument("--out", required=False, default=None, help="output folder (results.jsonl, report, plots)")
    ap.add_argument("--dry-run", action="store_true", help="list what would run and exit")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the report from OUT/results.jsonl (or .jsonl.gz)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def specs_from_args(a) -> list[H.PolicySpec]:
    scorers = list(SCORERS) if a.scorers == "all" else _csv(a.scorers)
    unknown = set(scorers) - set(SCORERS)
    if unknown:
        raise SystemExit(f"unknown scorer(s) {sorted(unknown)}; known: {', '.join(SCORERS)}")
    if a.sweep == "full":
        specs = H.full_sweep(scorers, a.budgets)
        if a.ablations:
            specs += [s for sc in scorers
                      for s in H.ablation_sweep(a.ablation_budget if a.ablation_budget is not None else a.budgets[0],
                                                sc)]
    else:
        specs = H.select_sweep(a.policies, scorers, a.budgets, a.ablations, a.ablation_budget)
    extra = _settings(a.settings)
    if extra:
        specs = [H.PolicySpec(s.policy, s.scorer, s.budget, s.overrides + extra) for s in specs]
    if "adaptive" in a.layer_budgets:      # each compressing policy also with per-layer budgets, same total KV
        adaptive = [H.PolicySpec(s.policy, s.scorer, s.budget, s.overrides + (("layer_budget", "adaptive"),))
                    for s in specs if s.policy in H.COMPRESSING]
        specs = (specs if "uniform" in a.layer_budgets else [s for s in specs if s.policy not in H.COMPRESSING]) \
            + adaptive
    return specs


def new_tokens(a) -> dict[str, int]:
    out = {}
    for item in _csv(a.max_new_tokens):
        task, sep, n = item.rpartition("=")
        if sep:
            out[task] = int(n)
        else:
            out.update({t: int(n) for t in T.TASKS})
    return out


def make_backend(a):
    import qb_backends as B
    if a.backend == "reference":
        return B.ReferenceBackend(a.model)
    from types import SimpleNamespace

    from transformers import AutoTokenizer, GenerationConfig

    from sglang_ams import demo
    from sglang_ams.models import build_model
    folder = build_model(a.model, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # demo.stop_token_ids only reads model.generation_config: no weights needed on the client side.
    stops = demo.stop_token_ids(SimpleNamespace(generation_config=GenerationConfig.from_pretrained(folder)),
                                tokenizer)
    server_cfg = B.server_config(a.server_policy, a.server_scorer, **dict(_settings(a.settings)))
    return B.ServerBackend(a.url, a.model, tokenizer, stops, server_cfg)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    specs = specs_from_args(a)
    if a.print_server_flags:
        import qb_backends as B
        cfg = B.server_config(a.server_policy, a.server_scorer, **dict(_settings(a.settings)))
        print("python -m sglang.launch_server --model-path MODEL --disable-radix-cache "
              + " ".join(B.launch_flags(cfg)))
        return 0
    if a.out is None:
        raise SystemExit("--out is required")
    if a.concurrency < 1 or (a.concurrency > 1 and a.backend != "server"):
        raise SystemExit(f"--concurrency: 1 for the reference backend, >= 1 for the server backend; got {a.concurrency}")
    out = Path(a.out)
    import report
    if a.report_only:
        report.make_report(out)
        return 0
    if H.results_file(out).suffix == ".gz":
        raise SystemExit(f"{out} holds an archived results.jsonl.gz: gunzip it to add runs (reports read it as is)")
    limit = a.limit or None
    if a.dry_run:
        print(f"{len(specs)} policy configurations x tasks {a.tasks} (limit {limit}):")
        for s in specs:
            print(f"  {s.hash}  {s.label}")
        return 0

    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    from tqdm.auto import tqdm

    from sglang_ams import demo
    data_dir = Path(a.data) if a.data else demo.find_data_dir()
    if data_dir is None:
        raise SystemExit("no data folder: pass --data or set $SGLANG_AMS_DATA")
    backend = make_backend(a)
    store = H.ResultStore(out / "results.jsonl")
    opts = T.TaskOptions(needle_lengths=tuple(a.needle_lengths), needle_depths=tuple(a.needle_depths),
                         needle_seeds=a.needle_seeds, kv_keys=a.kv_keys)
    budget_new = new_tokens(a)
    work = []
    for task in a.tasks:
        opts.max_new_tokens = budget_new.get(task)
        for ex in T.load_examples(task, backend.tokenizer, data_dir, limit, opts):
            for spec in specs:
                key = (backend.name, a.model, task, ex.id, ex.max_new_tokens, spec.hash)
                if not store.done(key):
                    work.append((ex, spec))
    skipped = len(store.rows)
    print(f"{len(work)} runs to do ({skipped} rows already in {store.path})", flush=True)
    started = time.perf_counter()

    def run_one(ex, spec) -> dict:
        try:
            cfg = spec.config(ex.basis)
        except ConfigError as err:
            raise SystemExit(f"{spec.label} on {ex.task}/{ex.id}: {err}") from None
        res = backend.generate(ex, cfg)
        return {
            "backend": backend.name, "model": a.model, "task": ex.task, "example_id": ex.id,
            "max_new_tokens": ex.max_new_tokens, "policy_hash": spec.hash, "policy_label": spec.label,
            "policy": spec.policy, "scorer": None if spec.policy == "none" else cfg.scorer,
            "budget_frac": None if spec.policy == "none" else spec.budget,
            "overrides": dict(spec.overrides), "budget": cfg.budget if cfg.enabled else None,
            "interval": cfg.interval if cfg.enabled else None, "basis": ex.basis,
            "prompt_tokens": len(ex.prompt_ids), "forced_tokens": len(ex.forced_ids), "gold": ex.gold,
            "extracted": T.extract(ex.task, res["text"]), "correct": T.score(ex.task, res["text"], ex.gold),
            "meta": ex.meta, "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **res,
        }

    bar = tqdm(total=len(work), desc="quality", unit="run", disable=a.no_progress, dynamic_ncols=True)
    if a.concurrency == 1:
        for ex, spec in work:
            store.append(run_one(ex, spec))
            bar.update()
    else:
        # Rows are appended here, on one thread, in completion order: an interrupted run keeps every finished row.
        from concurrent.futures import ThreadPoolExecutor, as_completed
        with ThreadPoolExecutor(max_workers=a.concurrency) as pool:
            for future in as_completed([pool.submit(run_one, ex, spec) for ex, spec in work]):
                store.append(future.result())
                bar.update()
    bar.close()
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    report.make_report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
