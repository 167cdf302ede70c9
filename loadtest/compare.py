r"""AMS against production SGLang under memory pressure: one command, one GPU, one server at a time.

    python loadtest/compare.py --model-path /models/llama3-8b --load-format dummy \
        --max-total-tokens 32768,65536,131072 --users 32 --requests 64 --output-len 4096

For each memory setting (--max-total-tokens or --mem-fraction-static, a list) and each configuration
    sglang       production SGLang: radix cache, overlap scheduler, CUDA graphs, full KV, default attention
                 backend; the plugin is not even loaded (SGLANG_PLUGINS names no plugin)
    full         full KV with the flags the policy runs use: --attention-backend flashinfer --kv-policy none
    topk-bN      --kv-policy topk --kv-budget N      (N = 25% and 50% of the output length by default)
    ams-bN       --kv-policy ams  --kv-budget N
it starts the server, waits for /health, sends a warm-up request, runs Locust headless for a fixed number of
requests while polling /metrics (sglang:num_running_reqs ...), scrapes the sglang_ams: counters, stops the server
(process group), and finally prints a table and writes summary.csv, plots and a JSON (see report.py).

    --dry-run        print the server and Locust commands of every run, start nothing
    --from-csv DIR   rebuild the table, summary.csv, plots and JSON from a recorded output folder (no GPU)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):           # run as a script (or loaded by Locust): make `loadtest` importable;
    sys.path.append(str(Path(__file__).resolve().parent.parent))   # appended, so installed packages still win

from loadtest import report  # noqa: E402
from loadtest.metrics import AMS_COUNTERS, counter_deltas  # noqa: E402
from loadtest.servers import NO_PLUGINS, Poller, Server, server_command  # noqa: E402
from loadtest.workloads import ENDPOINTS, WORKLOADS, parse_range  # noqa: E402

HERE = Path(__file__).resolve().parent

RESULTS = HERE.parent / "benchmarks" / "results"
LOCUSTFILE = HERE / "locustfile.py"
CONFIGS = ("sglang", "full", "topk", "ams")
USER_CLASS = {"generate": "GenerateUser", "completions": "CompletionsUser", "chat": "ChatUser"}
PLUGIN_FLAGS = ["--attention-backend", "flashinfer"]    # what a policy run forces; `full` passes it explicitly
MIN_BUDGET = 37          # the plugin refuses budgets <= sink (4) + keep_lastn (32)
AXES = {"max_total_tokens": ("--max-total-tokens", "mtt"), "mem_fraction_static": ("--mem-fraction-static", "mfs")}


def _list(kind):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
        if not values:
            raise argparse.ArgumentTypeError("empty list")
        return values
    return parse


def _configs(text: str) -> list[str]:
    names = _list(str)(text)
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown configuration {', '.join(bad)}; choose from {', '.join(CONFIGS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loadtest/compare.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("servers")
    g.add_argument("--model-path", help="model folder or HF name (required unless --from-csv)")
    g.add_argument("--python", default=sys.executable, help="interpreter that runs sglang.launch_server")
    g.add_argument("--load-format", default=None, help="passed through, e.g. dummy (random weights)")
    g.add_argument("--skip-tokenizer-init", action="store_true",
                   help="server without tokenizer; Locust then sends random token ids")
    g.add_argument("--configs", type=_configs, default=list(CONFIGS), help="subset of " + ",".join(CONFIGS))
    g.add_argument("--budget-fractions", type=_list(float), default=[0.25, 0.5],
                   help="policy budgets as fractions of the output length (0.25,0.5)")
    g.add_argument("--budgets", type=_list(int), default=None, help="policy budgets in tokens (overrides fractions)")
    g.add_argument("--kv-interval", type=int, default=None, help="--kv-interval of policy runs (plugin default)")
    g.add_argument("--kv-scorer", default=None, help="--kv-scorer of policy runs (plugin default)")
    pressure = g.add_mutually_exclusive_group()
    pressure.add_argument("--max-total-tokens", type=_list(int), default=None,
                          help="memory settings to sweep: KV pool sizes in tokens (default 32768,65536,131072)")
    pressure.add_argument("--mem-fraction-static", type=_list(float), default=None,
                          help="memory settings to sweep: fractions of GPU memory for weights + KV")
    g.add_argument("--server-args", default="",
                   help="extra flags for every server, one string: --server-args='--context-length 16384'")
    g.add_argument("--policy-args", default="", help="extra flags for plugin runs only (full, topk, ams), one string")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=30000)
    g.add_argument("--startup-timeout", type=float, default=1200, help="seconds to wait for /health")

    g = p.add_argument_group("load")
    g.add_argument("--workload", choices=WORKLOADS, default="reasoning")
    g.add_argument("--endpoint", choices=ENDPOINTS, default="generate")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="stream answers (needed for TTFT/TPOT; default on)")
    g.add_argument("--incremental-stream", action=argparse.BooleanOptionalAction, default=True,
                   help="servers stream /generate increments (--incremental-streaming-output), not the whole "
                        "text and ids in every chunk, which costs O(n^2) bytes on long outputs (default on)")
    g.add_argument("--output-len", default="4096", help="output tokens, N or MIN-MAX (budgets use MAX)")
    g.add_argument("--prompt-len", default=None, help="long-context prompt tokens, N or MIN-MAX")
    g.add_argument("--data-dir", default=None, help="data folder for the locustfile")
    g.add_argument("--users", "-u", type=int, default=32, help="concurrent Locust users (closed loop)")
    g.add_argument("--spawn-rate", "-r", type=float, default=None, help="users started per second (all at once)")
    g.add_argument("--requests", "-n", type=int, default=64, help="requests per run")
    g.add_argument("--run-timeout", default="", help="Locust -t limit per run, e.g. 20m (default none)")
    g.add_argument("--locust-args", default="",
                   help="extra Locust arguments, one string: --locust-args='--tokenizer DIR'")
    g.add_argument("--poll-interval", type=float, default=1.0, help="seconds between /metrics polls")

    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/loadtest-<date>)")
    g.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    g.add_argument("--from-csv", type=Path, default=None, metavar="DIR", help="report from a recorded folder")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_csv is None and not args.model_path:
        parser.error("--model-path is required (unless --from-csv)")
    try:
        args.output_range = parse_range(args.output_len)
        if args.prompt_len:
            parse_range(args.prompt_len)
    except ValueError as err:
        parser.error(str(err))
    if args.budgets is None:
        args.budgets = [round(f * args.output_range[1]) for f in args.budget_fractions]
    small = [b for b in args.budgets if b < MIN_BUDGET]
    if small and any(c in ("topk", "ams") for c in args.configs):
        parser.error(f"budgets {small} are below {MIN_BUDGET} tokens; raise --output-len or pass --budgets")
    if args.skip_tokenizer_init and args.endpoint == "chat":
        parser.error("--skip-tokenizer-init sends token ids, which /v1/chat/completions does not take")
    if args.users < 1 or args.requests < 1:
        parser.error("--users and --requests must be positive")
    if args.max_total_tokens is None and args.mem_fraction_static is None:
        args.max_total_tokens = [32768, 65536, 131072]
    args.axis = "max_total_tokens" if args.max_total_tokens is not None else "mem_fraction_static"
    args.pressures = args.max_total_tokens if args.max_total_tokens is not None else args.mem_fraction_static
    if args.out is None:
        args.out = args.from_csv or RESULTS / f"loadtest-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return args


# --- plan -------------------------------------------------------------------------------------------------
def configurations(args) -> list[dict]:
    """(name, policy, budget, flags, env) of each server configuration, in run order."""
    out = []
    for name in args.configs:
        if name == "sglang":
            out.append(dict(config="sglang", policy="", budget=None, flags=[], env=dict(NO_PLUGINS)))
        elif name == "full":
            out.append(dict(config="full", policy="none", budget=None, env={},
                            flags=PLUGIN_FLAGS + ["--kv-policy", "none"] + shlex.split(args.policy_args)))
        else:
            for budget in args.budgets:
                flags = PLUGIN_FLAGS + ["--kv-policy", name, "--kv-budget", str(budget)]
                if args.kv_interval:
                    flags += ["--kv-interval", str(args.kv_interval)]
                if args.kv_scorer:
                    flags += ["--kv-scorer", args.kv_scorer]
                out.append(dict(config=f"{name}-b{budget}", policy=name, budget=budget, env={},
                                flags=flags + shlex.split(args.policy_args)))
    return out


def locust_command(args, url: str, run_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(args.users),
           "-r", f"{args.spawn_rate or args.users:g}", "-H", url, "--only-summary", "--csv", str(run_dir / "locust"),
           "--workload", args.workload, "--output-len", args.output_len, "-n", str(args.requests),
           "--record", str(run_dir / "requests.csv")]
    if args.stream:
        cmd.append("--stream")
    if args.skip_tokenizer_init:
        cmd.append("--random-ids")
    if args.prompt_len:
        cmd += ["--prompt-len", args.prompt_len]
    if args.data_dir:
        cmd += ["--data-dir", str(args.data_dir)]
    if args.run_timeout:
        cmd += ["-t", args.run_timeout]
    return cmd + shlex.split(args.locust_args) + [USER_CLASS[args.endpoint]]


def plan(args) -> list[dict]:
    flag, short = AXES[args.axis]
    url = f"http://{args.host}:{args.port}"
    common = []
    if args.load_format:
        common += ["--load-format", args.load_format]
    if args.skip_tokenizer_init:
        common.append("--skip-tokenizer-init")
    if args.incremental_stream and args.stream and args.endpoint == "generate":
        common.append("--incremental-streaming-output")      # the OpenAI endpoints stream deltas anyway
    common += shlex.split(args.server_args)
    runs = []
    for value in args.pressures:
        for cfg in configurations(args):
            run = f"{cfg['config']}_{short}{_num(value)}"
            run_dir = Path(args.out) / "runs" / run
            flags = [flag, _num(value)] + common + cfg["flags"]
            runs.append(dict(run=run, config=cfg["config"], policy=cfg["policy"], budget=cfg["budget"],
                             axis=args.axis, pressure=value, env=cfg["env"],
                             server_cmd=server_command(args.python, args.model_path, args.port, flags, args.host),
                             locust_cmd=locust_command(args, url, run_dir)))
    return runs


def _num(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def show(cmd: list[str], env: dict | None = None) -> str:
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()] + [shlex.quote(c) for c in cmd])


def print_plan(runs: list[dict]) -> None:
    print(f"{len(runs)} runs, one server at a time:")
    for i, r in enumerate(runs, 1):
        print(f"\n[{i}/{len(runs)}] {r['run']}")
        print(f"  server: {show(r['server_cmd'], r['env'])}")
        print(f"  locust: {show(r['locust_cmd'])}")


# --- running ----------------------------------------------------------------------------------------------
def warmup_body(args) -> dict:
    prompt = {"input_ids": list(range(100, 116))} if args.skip_tokenizer_init else {"text": "Hello, my name is"}
    return {**prompt, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}


def count_rows(path: Path) -> int:
    try:
        return max(0, sum(1 for _ in path.open()) - 1)
    except OSError:
        return 0


def execute(args, r: dict, index: int, total: int) -> dict:
    """Run one configuration; returns its run.csv row (the request records are on disk)."""
    run_dir = Path(args.out) / "runs" / r["run"]
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("requests.csv", "running.csv"):
        (run_dir / stale).unlink(missing_ok=True)
    head = {k: r[k] for k in ("run", "config", "policy", "budget", "axis", "pressure")}
    head.update(server_ok=0, locust_rc=None, wall_s=None)
    tag = f"[{index}/{total}] {r['run']}"
    server = Server(r["server_cmd"], run_dir / "server.log", env=r["env"], port=args.port, host=args.host)
    t0 = time.monotonic()
    poller = locust = None
    try:
        print(f"{tag}: starting server", flush=True)
        server.start()
        last = [0.0]

        def waiting(elapsed):
            if elapsed - last[0] >= 30:
                last[0] = elapsed
                print(f"{tag}: waiting for /health ({elapsed:.0f} s)", flush=True)
        up = server.wait_healthy(args.startup_timeout, waiting)
        if not up or server.post("/generate", warmup_body(args)) is None:
            why = "did not come up" if not up else "failed the warm-up request"
            print(f"{tag}: server {why}; last lines of {server.log}:", flush=True)
            print("\n".join(server.log.read_text(errors="replace").splitlines()[-15:]), flush=True)
            return head
        head["server_ok"] = 1
        before = server.metrics()
        poller = Poller(server, run_dir / "running.csv", args.poll_interval)
        poller.start()
        print(f"{tag}: server up after {time.monotonic() - t0:.0f} s; {args.requests} requests, "
              f"{args.users} users", flush=True)
        t1 = time.monotonic()
        with (run_dir / "locust.log").open("w") as log:
            locust = subprocess.Popen(r["locust_cmd"], stdout=log, stderr=subprocess.STDOUT, cwd=HERE.parent)
            while locust.poll() is None:
                time.sleep(min(10.0, max(1.0, args.poll_interval)))
                live = poller.last
                print(f"{tag}: {count_rows(run_dir / 'requests.csv')}/{args.requests} done, "
                      f"running {live.get('running')}, queued {live.get('queued')}, "
                      f"{time.monotonic() - t1:.0f} s", flush=True)
        head["locust_rc"], head["wall_s"] = locust.returncode, round(time.monotonic() - t1, 2)
        after = server.metrics()
        if after:                      # empty if the server died during the run: counters unknown
            deltas = counter_deltas(before, after)
            head["compactions"] = deltas[AMS_COUNTERS[0]]
            head["tokens_freed"] = deltas[AMS_COUNTERS[1]]
            head["compaction_steps"] = deltas[AMS_COUNTERS[2]]
            head["compaction_host_s"] = round(deltas[AMS_COUNTERS[3]], 3)
            head["kept_ratio"] = after.get("sglang_ams:kept_ratio")
        else:
            print(f"{tag}: /metrics did not answer after the run (server down?)", flush=True)
        return head
    finally:
        if locust is not None and locust.poll() is None:
            locust.terminate()
        if poller is not None:
            poller.stop()
        print(f"{tag}: stopping server", flush=True)
        server.stop()
        report.write_csv(run_dir / "run.csv", [head], report.RUN_FIELDS)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.command = shlex.join([Path(sys.executable).name, "loadtest/compare.py",
                               *(sys.argv[1:] if argv is None else argv)])
    if args.from_csv is not None:
        return from_csv(args)
    runs = plan(args)
    if args.dry_run:
        print_plan(runs)
        print(f"\noutput folder: {args.out}")
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "plan.json").write_text(json.dumps(runs, indent=1, default=str))
    for i, r in enumerate(runs, 1):
        head = execute(args, r, i, len(runs))
        row = report.summarize_run(Path(args.out) / "runs" / r["run"])
        print(f"[{i}/{len(runs)}] {r['run']}: {row.get('ok')}/{row.get('requests')} ok, "
              f"{row.get('out_tok_s') or 0:.1f} output tok/s, peak running {row.get('peak_running')}, "
              f"compactions {head.get('compactions')}\n", flush=True)
    rows = report.collect(args.out)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report.write_report(rows, args.out, extra={"command": args.command, "settings": settings, "plan": runs})
    return 0


def from_csv(args) -> int:
    source = Path(args.from_csv)
    rows = report.collect(source)
    extra = {"source": str(source), "command": args.command}
    recorded = [json.loads(p.read_text()) for p in sorted(source.glob("loadtest-*.json"))]
    recorded = [r for r in recorded if "source" not in r]        # not an earlier regeneration
    if recorded:          # keep where and how the runs were recorded; this command is the regeneration
        old = recorded[-1]
        extra.update({k: old[k] for k in ("device", "settings", "plan") if k in old},
                     recorded={k: old.get(k) for k in ("date", "commit", "command")})
    report.write_report(rows, args.out, extra=extra, name="loadtest-regenerated")   # keeps the recorded JSON
    return 0


if __name__ == "__main__":
    sys.exit(main())
