"""The report of a comparison: summary rows from the recorded run folders, the table, summary.csv, PNG plots
and the JSON (device, date, commit, command) written through benchmarks/results_io.py.

Layout of an output folder:
    runs/<run>/run.csv        one row: configuration, memory setting, scraped counters, exit status
    runs/<run>/requests.csv   one row per request (written by the locustfile)
    runs/<run>/running.csv    /metrics polled during the run: running and queued requests, KV usage
    runs/<run>/server.log, locust.log, locust_stats.csv ...  raw logs
    summary.csv, throughput_vs_memory.png, latency_percentiles.png, peak_running.png, loadtest-*.json
"""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

from loadtest.metrics import summarize_polls, summarize_requests


def _load_results_io():
    """benchmarks/results_io.py, loaded by path: putting benchmarks/ on sys.path would let benchmarks/kernels.py
    shadow the `kernels` package SGLang depends on."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "results_io.py"
    spec = importlib.util.spec_from_file_location("loadtest_results_io", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


results_io = _load_results_io()

# run.csv columns, then the derived ones; summary.csv has both, in this order.
RUN_FIELDS = ["run", "config", "policy", "budget", "axis", "pressure", "server_ok", "locust_rc", "wall_s",
              "compactions", "tokens_freed", "kept_ratio", "compaction_steps", "compaction_host_s"]
STAT_FIELDS = ["requests", "ok", "errors", "duration_s", "out_tok_s", "req_s", "ttft_p50_ms", "ttft_p90_ms",
               "ttft_p99_ms", "tpot_p50_ms", "tpot_p90_ms", "tpot_p99_ms", "latency_p50_s", "latency_p99_s",
               "output_tokens_mean", "prompt_tokens_mean", "cache_hit", "accuracy", "peak_running", "mean_running",
               "peak_queued", "peak_token_usage"]
SUMMARY_FIELDS = RUN_FIELDS + STAT_FIELDS
TABLE_COLUMNS = ["config", "axis", "pressure", "ok", "errors", "out_tok_s", "ttft_p50_ms", "ttft_p99_ms",
                 "tpot_p50_ms", "tpot_p99_ms", "peak_running", "compactions", "compaction_steps",
                 "compaction_host_s", "tokens_freed", "kept_ratio"]
PLOTS = ("throughput_vs_memory.png", "latency_percentiles.png", "peak_running.png")
NUMERIC = set(SUMMARY_FIELDS) - {"run", "config", "policy", "axis"}


# --- CSV --------------------------------------------------------------------------------------------------
def read_csv(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> Path:
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in fields})
    return Path(path)


def typed(row: dict) -> dict:
    """CSV text back to numbers (empty -> None); whole numbers as int."""
    out = {}
    for key, value in row.items():
        if key in NUMERIC:
            if isinstance(value, str):
                value = None if value == "" else float(value)
            if isinstance(value, float) and value.is_integer() and key != "kept_ratio":
                value = int(value)
        out[key] = value
    return out


def summarize_run(run_dir: Path) -> dict:
    """One summary row: run.csv plus the statistics of requests.csv and running.csv."""
    run_dir = Path(run_dir)
    head = read_csv(run_dir / "run.csv")
    row = dict(head[0]) if head else {"run": run_dir.name}
    row.update(summarize_requests(read_csv(run_dir / "requests.csv")))
    row.update(summarize_polls(read_csv(run_dir / "running.csv")))
    return typed(row)


def collect(folder: Path) -> list[dict]:
    """Summary rows of an output folder: from its runs/*/ records when present, else from summary.csv."""
    folder = Path(folder)
    runs = sorted(p for p in (folder / "runs").glob("*") if (p / "run.csv").exists()) \
        if (folder / "runs").is_dir() else []
    if runs:
        order = {name: i for i, name in enumerate(_plan_order(folder))}
        rows = [summarize_run(p) for p in runs]
        return sorted(rows, key=lambda r: order.get(r.get("run"), len(order)))
    rows = read_csv(folder / "summary.csv")
    if not rows:
        raise FileNotFoundError(f"{folder} has neither runs/*/run.csv nor summary.csv")
    return [typed(r) for r in rows]


def _plan_order(folder: Path) -> list[str]:
    path = folder / "plan.json"
    return [r["run"] for r in json.loads(path.read_text())] if path.exists() else []


# --- table ------------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    return results_io.table(rows, TABLE_COLUMNS)


# --- plots ------------------------------------------------------------------------------------------------
def _series(rows: list[dict], key: str) -> dict[str, tuple[list, list]]:
    """config -> (pressures, values), sorted by pressure, skipping missing values."""
    out: dict[str, tuple[list, list]] = {}
    for r in sorted(rows, key=lambda r: (r.get("pressure") or 0)):
        if r.get(key) is None or r.get("pressure") is None:
            continue
        xs, ys = out.setdefault(r["config"], ([], []))
        xs.append(r["pressure"])
        ys.append(r[key])
    return out


def plot(rows: list[dict], folder: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    axis = next((r.get("axis") for r in rows if r.get("axis")), "memory")
    paths = []

    pressures = [r["pressure"] for r in rows if r.get("pressure")]
    log_x = axis == "max_total_tokens" and pressures and max(pressures) >= 4 * min(pressures)

    configs = list(dict.fromkeys(r["config"] for r in rows))
    markers = {c: "osD^vP*X"[i % 8] for i, c in enumerate(configs)}     # lines that coincide stay visible

    def lines(ax, key, style="-", label_suffix="", colors=None):
        for i, (config, (xs, ys)) in enumerate(_series(rows, key).items()):
            color = (colors or {}).get(config, f"C{i}")
            ax.plot(xs, ys, style, marker=markers.get(config, "o"), color=color, label=config + label_suffix,
                    alpha=0.85, markersize=max(4, 9 - configs.index(config)))
        ax.set_xlabel(axis)
        if log_x:
            ax.set_xscale("log", base=2)
        if pressures:
            ticks = sorted(set(pressures))
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
        ax.grid(alpha=0.3)

    colors = {c: f"C{i}" for i, c in enumerate(configs)}
    for name, key, ylabel, title in (
            (PLOTS[0], "out_tok_s", "output tokens / s", "Throughput vs memory"),
            (PLOTS[2], "peak_running", "peak running requests", "Peak running requests (sglang:num_running_reqs)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        lines(ax, key, colors=colors)
        ax.set_ylim(bottom=0)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        paths.append(folder / name)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, unit in ((axes[0], "ttft", "TTFT (ms)"), (axes[1], "tpot", "TPOT (ms)")):
        lines(ax, f"{metric}_p50_ms", "-", " p50", colors)
        lines(ax, f"{metric}_p99_ms", "--", " p99", colors)
        ax.set_ylabel(unit)
        values = [r[k] for r in rows for k in (f"{metric}_p50_ms", f"{metric}_p99_ms") if r.get(k)]
        if values and max(values) > 20 * min(values):
            ax.set_yscale("log")
        ax.set_title(f"{unit.split()[0]} percentiles (p50 solid, p99 dashed)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(folder / PLOTS[1], dpi=120)
    plt.close(fig)
    paths.insert(1, folder / PLOTS[1])
    return paths


# --- everything -------------------------------------------------------------------------------------------
def write_report(rows: list[dict], folder: Path, extra: dict | None = None, name: str = "loadtest") -> dict:
    """summary.csv, the plots and the JSON in `folder`; returns their paths and prints the table."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(folder / "summary.csv", rows, SUMMARY_FIELDS)
    pngs = plot(rows, folder)
    json_path = results_io.save(name, rows, extra=extra, folder=folder)
    print(table(rows))
    print(f"\nwrote {csv_path}, {json_path.name}, {', '.join(p.name for p in pngs)} in {folder}")
    return {"csv": csv_path, "json": json_path, "plots": pngs}
