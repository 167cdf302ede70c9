"""The serving benchmark's numbers: bench_serving's output file -> entries, the server log -> peak running
requests, /server_info -> compaction counters, and entries -> summary.json, summary.md and summary.png."""
from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

# What every entry carries (the columns); the rest of an entry is detail.
FIELDS = ("workload", "config", "repeat", "output_throughput", "median_tpot_ms", "p99_itl_ms", "mean_ttft_ms",
          "peak_running", "completed", "compactions")
# bench_serving result keys copied as they are (ms, tok/s, s)
BENCH_KEYS = ("output_throughput", "median_tpot_ms", "p99_itl_ms", "mean_ttft_ms", "completed", "duration",
              "total_input_tokens", "total_output_tokens", "request_throughput", "mean_tpot_ms", "median_itl_ms",
              "p95_itl_ms", "max_concurrent_requests", "median_ttft_ms", "p99_ttft_ms", "mean_e2e_latency_ms")
# sglang_ams counters (internal_states[i]["sglang_ams"]) whose deltas an entry keeps, under these names
COUNTERS = {"compactions": "compactions", "launches": "compaction_steps", "tokens_freed": "tokens_freed",
            "score_gpu_ms": "score_gpu_ms", "compact_gpu_ms": "compact_gpu_ms", "host_seconds": "host_seconds"}
# ... and maxima, taken as the server reports them at the end (one server per run, so since its start)
MAXIMA = {"step_gpu_ms_max": "longest_step_gpu_ms", "step_seconds_max": "longest_step_host_s",
          "first_step_gpu_ms": "first_step_gpu_ms", "first_step_seconds": "first_step_host_s"}
PROM_COUNTERS = {"compactions": "sglang_ams:compactions_total", "launches": "sglang_ams:compaction_steps_total",
                 "tokens_freed": "sglang_ams:tokens_freed_total", "host_seconds": "sglang_ams:host_seconds_total"}
# "Decode batch, #running-req: 24, ..." (every --decode-log-interval = 40 decode steps) and the prefill line's
# "#running-req: N" (the running batch the new prompts join)
_RUNNING = re.compile(r"#running-req:\s*(\d+)")
_DECODE_RATE = re.compile(r"Decode batch.*?#running-req:\s*(\d+).*?gen throughput \(token/s\):\s*([\d.]+)")
REFERENCE = "production"


def read_bench_output(path) -> dict | None:
    """The last JSON line of a bench_serving --output-file (it appends one per run), or None."""
    try:
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    except OSError:
        return None
    for line in reversed(lines):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return None


# Per-request lists bench_serving writes with --output-details; their ITL statistics are kept, the lists dropped
DETAIL_KEYS = ("input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors", "cached_tokens_details")
STALL_MS = 100.0         # an inter-token gap this long is a stall (a compaction step, a prefill between decodes)


def itl_stalls(result: dict | None) -> dict:
    """From the per-request ITLs (s): the P99 over every request's gaps but its first, stalls >= STALL_MS and the
    time lost in them, split into first gaps and later ones. A request's first gap is where SGLang's
    prefill-first scheduling stalls it (other prompts prefill after its first token); later stalls are the
    decode steps' own (compaction among them). Empty when the result has no ITL lists."""
    itls = (result or {}).get("itls")
    if not isinstance(itls, list) or not itls:
        return {}
    firsts = [1e3 * r[0] for r in itls if r]
    later = sorted(1e3 * x for r in itls for x in r[1:])
    out = {"p99_itl_after_first_ms": round(later[min(len(later) - 1, int(0.99 * len(later)))], 2) if later else None}
    for name, gaps in (("first", firsts), ("later", later)):
        stalls = [g for g in gaps if g >= STALL_MS]
        out[f"stalls_{name}"] = len(stalls)
        out[f"stall_s_{name}"] = round(sum(stalls) / 1e3, 2)
    return out


def strip_details(path) -> None:
    """Rewrite a bench_serving output file without the per-request lists (tens of MB for long runs)."""
    path = Path(path)
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return
    out = []
    for line in lines:
        try:
            data = json.loads(line)
        except ValueError:
            out.append(line)
            continue
        out.append(json.dumps({k: v for k, v in data.items() if k not in DETAIL_KEYS}) if isinstance(data, dict)
                   else line)
    path.write_text("\n".join(out) + "\n")


def bench_metrics(result: dict | None) -> dict:
    """The BENCH_KEYS of one bench_serving result (None where missing); duration as duration_s."""
    result = result or {}
    out = {k: _number(result.get(k)) for k in BENCH_KEYS}
    out["duration_s"] = out.pop("duration")
    if out["completed"] is not None:
        out["completed"] = int(out["completed"])
    return out


def peak_running(log_text: str) -> int | None:
    """Largest #running-req the server logged, or None when it logged none."""
    values = [int(m) for m in _RUNNING.findall(log_text)]
    return max(values) if values else None


def full_load_decode_rate(log_text: str, band: float = 0.95) -> tuple[float | None, int]:
    """(median decode tok/s the server logged while at least `band` of its peak logged running requests ran,
    samples): the engine's speed at full load, apart from the ramp, the tail and the client; comparable across
    configs at the same peak (lease-to-lease spread shows here first)."""
    rows = [(int(r), float(g)) for r, g in _DECODE_RATE.findall(log_text)]
    if not rows:
        return None, 0
    top = max(r for r, _ in rows)
    rates = [g for r, g in rows if r >= band * top]
    return round(statistics.median(rates), 1), len(rates)


def peak_polled(rows) -> int | None:
    """Largest polled sglang:num_running_reqs (running.csv rows of loadtest.servers.Poller)."""
    values = [_number(r.get("running")) for r in rows]
    values = [v for v in values if v is not None]
    return int(max(values)) if values else None


def engine_span(rows, every: float = 1.0) -> float | None:
    """Seconds the engine had requests (running or queued), from the 1 s poll: first to last busy sample plus one
    interval. bench_serving's duration also counts output still streaming after the engine finished, so this
    separates the engine's speed from the HTTP/detokenizer path's."""
    busy = [_number(r.get("t")) for r in rows
            if (_number(r.get("running")) or 0) + (_number(r.get("queued")) or 0) > 0]
    busy = [t for t in busy if t is not None]
    return round(busy[-1] - busy[0] + every, 1) if busy else None


def ams_counters(server_info: dict | None) -> dict | None:
    """Sum over schedulers of the plugin's counters; {} when the server runs without the plugin's counters
    (production), None when there is no server info at all."""
    if not isinstance(server_info, dict):
        return None
    states = server_info.get("internal_states")
    if isinstance(server_info.get("decode"), list) and server_info["decode"]:        # PD layout, as bench_serving
        states = server_info["decode"][0].get("internal_states")
    total: dict = {}
    for state in states or []:
        ams = state.get("sglang_ams") if isinstance(state, dict) else None
        for key in COUNTERS:
            value = _number((ams or {}).get(key))
            if value is not None:
                total[key] = total.get(key, 0) + value
        for key in MAXIMA:
            value = _number((ams or {}).get(key))
            if value is not None:
                total[key] = max(total.get(key, value), value)
    return total


def prometheus_counters(values: dict | None) -> dict | None:
    """The same counters from a parsed /metrics page (fallback when /server_info does not answer)."""
    if not values:
        return None
    return {key: values[name] for key, name in PROM_COUNTERS.items() if name in values}


def counter_deltas(before: dict | None, after: dict | None) -> dict:
    """{entry name: after - before}; all None when either side is unknown, 0 for counters the server lacks."""
    if before is None or after is None:
        return {name: None for name in (*COUNTERS.values(), *MAXIMA.values())}
    out = {name: after.get(key) for key, name in MAXIMA.items()}
    for key, name in COUNTERS.items():
        if key not in after and key not in before:
            out[name] = 0
            continue
        delta = after.get(key, 0) - before.get(key, 0)
        out[name] = round(delta, 3) if isinstance(delta, float) and not delta.is_integer() else int(delta)
    return out


# --- summary ------------------------------------------------------------------------------------------------
def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """old entries with those of the same (workload, config, repeat) replaced by new ones, in run order."""
    key = lambda e: (e.get("workload"), e.get("config"), e.get("repeat"))
    fresh = {key(e) for e in new}
    return [e for e in old if key(e) not in fresh] + list(new)


def aggregate(entries: list[dict]) -> list[dict]:
    """Mean over repeats per (workload, config), with throughput and P99 ITL relative to production."""
    groups: dict = {}
    for e in entries:
        groups.setdefault((e["workload"], e["config"]), []).append(e)
    rows = []
    for (workload, config), group in groups.items():
        row = {"workload": workload, "config": config, "repeats": len(group)}
        for k in ("output_throughput", "engine_output_throughput", "median_tpot_ms", "p99_itl_ms", "mean_ttft_ms",
                  "peak_running", "compactions"):
            vals = [_number(e.get(k)) for e in group]
            vals = [v for v in vals if v is not None]
            row[k] = sum(vals) / len(vals) if vals else None
        row["completed"] = sum(int(e.get("completed") or 0) for e in group)
        row["requests"] = sum(int(e.get("num_prompts") or 0) for e in group)
        rows.append(row)
    ref = {r["workload"]: r for r in rows if r["config"] == REFERENCE}
    for r in rows:
        base = ref.get(r["workload"])
        r["throughput_vs_production"] = _ratio(r["output_throughput"], base and base["output_throughput"])
        r["engine_vs_production"] = _ratio(r["engine_output_throughput"], base and base["engine_output_throughput"])
        r["p99_itl_vs_production"] = _ratio(r["p99_itl_ms"], base and base["p99_itl_ms"])
        r["ttft_vs_production"] = _ratio(r["mean_ttft_ms"], base and base["mean_ttft_ms"])
    return rows


def write_summary(folder, entries: list[dict], meta: dict) -> Path:
    """summary.json (meta + entries + aggregate), summary.md and summary.png in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "summary.json"
    path.write_text(json.dumps({**meta, "entries": entries, "aggregate": aggregate(entries)}, indent=1))
    (folder / "summary.md").write_text(markdown(entries, meta))
    plot(entries, folder / "summary.png")
    return path


def load_summary(folder) -> dict:
    path = Path(folder) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


ENTRY_COLUMNS = ("workload", "config", "repeat", "output_throughput", "engine_output_throughput",
                 "full_load_decode_tok_s", "median_tpot_ms", "p99_itl_ms", "mean_ttft_ms", "peak_running",
                 "completed", "num_prompts", "compactions", "duration_s", "engine_span_s", "p99_itl_after_first_ms",
                 "stall_s_first", "stall_s_later", "longest_step_host_s", "longest_step_gpu_ms", "first_step_host_s",
                 "first_step_gpu_ms", "error")
AGG_COLUMNS = ("workload", "config", "repeats", "output_throughput", "throughput_vs_production",
               "engine_output_throughput", "engine_vs_production", "p99_itl_ms",
               "p99_itl_vs_production", "mean_ttft_ms", "ttft_vs_production", "median_tpot_ms", "peak_running",
               "completed", "requests")


def markdown(entries: list[dict], meta: dict) -> str:
    short = [e for e in entries if (_number(e.get("duration_s")) or 0) and e["duration_s"] < 60]
    lines = [f"# Serving benchmark ({meta.get('device', '?')}, {meta.get('date', '?')}, commit {meta.get('commit')})",
             "", "Client: `python -m sglang.bench_serving --backend sglang`; one server at a time. Output tok/s,"
             " ms. Ratios are against `production` (SGLang without the plugin), means over repeats.",
             " `engine_output_throughput`: output tokens over the seconds the engine had requests (1 s poll of"
             " /metrics); below it, bench_serving's number includes output still streaming after the engine"
             " finished.", "",
             "## Means over repeats", "", md_table(aggregate(entries), AGG_COLUMNS), "",
             "## Every run", "", md_table(entries, ENTRY_COLUMNS), ""]
    if short:
        names = ", ".join(f"{e['workload']}/{e['config']}/{e['repeat']}" for e in short)
        lines += [f"Runs shorter than 60 s (less stable): {names}.", ""]
    lines += ["Commands: see `summary.json` (`commands`, and each entry's `server_cmd` and `bench_cmd`).", ""]
    return "\n".join(lines)


def md_table(rows: list[dict], columns) -> str:
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    return "\n".join([head, rule] + ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows])


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v).replace("|", "/").replace("\n", " ")[:80]


def plot(entries: list[dict], path) -> Path | None:
    """Two panels: output throughput and P99 ITL per workload, one bar per config (mean), dots per repeat."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    workloads = list(dict.fromkeys(e["workload"] for e in entries))
    configs = list(dict.fromkeys(e["config"] for e in entries))
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.8 * len(workloads) * max(1, len(configs)) / 2), 7))
    width = 0.8 / max(1, len(configs))
    for ax, key, label in ((axes[0], "output_throughput", "output tok/s"), (axes[1], "p99_itl_ms", "P99 ITL (ms)")):
        for j, config in enumerate(configs):
            xs, means = [], []
            for i, workload in enumerate(workloads):
                vals = [_number(e.get(key)) for e in entries if e["workload"] == workload and e["config"] == config]
                vals = [v for v in vals if v is not None]
                if not vals:
                    continue
                x = i + (j - (len(configs) - 1) / 2) * width
                xs.append(x)
                means.append(sum(vals) / len(vals))
                ax.plot([x] * len(vals), vals, "k.", markersize=4)
            ax.bar(xs, means, width * 0.9, label=config)
        ax.set_xticks(range(len(workloads)), workloads)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    if configs:
        axes[0].legend(fontsize=8)
    axes[0].set_title("sglang.bench_serving: bars = mean over repeats, dots = repeats")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _ratio(a, b):
    return a / b if a is not None and b else None


def _number(v):
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return None if isinstance(v, float) and math.isnan(v) else v
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
