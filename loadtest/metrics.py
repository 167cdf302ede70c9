"""Numbers: the Prometheus text the server exposes at /metrics, and the statistics of recorded requests."""
from __future__ import annotations

import math
import re

# name{labels} value [timestamp]; label values are quoted and may hold spaces, commas and escaped quotes.
_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?\s+(\S+)(?:\s+\S+)?\s*$')

# Counters the harness reads (deltas over a run) and gauges it polls during a run.
AMS_COUNTERS = ("sglang_ams:compactions_total", "sglang_ams:tokens_freed_total", "sglang_ams:compaction_steps_total",
                "sglang_ams:host_seconds_total")
AMS_GAUGES = ("sglang_ams:kept_ratio",)
RUNNING, QUEUED, TOKEN_USAGE = "sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage"


def parse_prometheus(text: str) -> dict[str, float]:
    """{metric name: value summed over its label sets}. Comments, blank and malformed lines are skipped;
    histogram series keep their suffixed names (x_bucket, x_sum, x_count)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        name = match.group(1)
        values[name] = values.get(name, 0.0) + value
    return values


def counter_deltas(before: dict[str, float], after: dict[str, float], names=AMS_COUNTERS) -> dict[str, float]:
    """after - before for each counter (0 when the server does not export it, e.g. without the plugin)."""
    return {name: after.get(name, 0.0) - before.get(name, 0.0) for name in names}


def percentile(values, q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]) of the non-missing values; None when there are none."""
    data = sorted(float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v)))
    if not data:
        return None
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _num(row: dict, key: str) -> float | None:
    value = row.get(key)
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _ok(row: dict) -> bool:
    return str(row.get("ok", "")).strip().lower() in ("1", "true", "yes")


def summarize_requests(rows: list[dict]) -> dict:
    """Throughput and latency of one run from its per-request records (requests.csv rows, values may be text).

    out_tok_s is the output tokens of successful requests over the span from the first start to the last end.
    ttft/tpot are in milliseconds (streamed requests only), latency in seconds."""
    ok = [r for r in rows if _ok(r)]
    starts = [_num(r, "t_start") for r in rows]
    ends = [_num(r, "t_end") for r in rows]
    starts, ends = [s for s in starts if s is not None], [e for e in ends if e is not None]
    span = (max(ends) - min(starts)) if starts and ends else 0.0
    out_tokens = sum(_num(r, "output_tokens") or 0 for r in ok)
    prompt_tokens = [_num(r, "prompt_tokens") for r in ok]
    cached = [_num(r, "cached_tokens") for r in ok]
    correct = [_num(r, "correct") for r in ok if _num(r, "correct") is not None]
    summary = {
        "requests": len(rows), "ok": len(ok), "errors": len(rows) - len(ok), "duration_s": span,
        "out_tok_s": out_tokens / span if span > 0 else 0.0, "req_s": len(ok) / span if span > 0 else 0.0,
        "output_tokens_mean": out_tokens / len(ok) if ok else None,
        "prompt_tokens_mean": (sum(p for p in prompt_tokens if p is not None) / len(ok)) if ok else None,
        "cache_hit": (sum(c for c in cached if c is not None) / max(1.0, sum(p or 0 for p in prompt_tokens)))
        if any(c is not None for c in cached) else None,
        "accuracy": sum(correct) / len(correct) if correct else None,
    }
    for key, unit in (("ttft", "ttft_ms"), ("tpot", "tpot_ms")):
        vals = [_num(r, unit) for r in ok]
        for q in (50, 90, 99):
            summary[f"{key}_p{q}_ms"] = percentile(vals, q)
    lat = [_num(r, "latency_ms") for r in ok]
    summary["latency_p50_s"] = _div(percentile(lat, 50), 1000)
    summary["latency_p99_s"] = _div(percentile(lat, 99), 1000)
    return summary


def summarize_polls(rows: list[dict]) -> dict:
    """Peak and mean of the polled gauges (running.csv rows: t, running, queued, token_usage)."""
    out = {}
    for key in ("running", "queued", "token_usage"):
        vals = [_num(r, key) for r in rows]
        vals = [v for v in vals if v is not None]
        out[f"peak_{key}"] = max(vals) if vals else None
        if key == "running":
            out["mean_running"] = sum(vals) / len(vals) if vals else None
    return out


def _div(value, by):
    return None if value is None else value / by
