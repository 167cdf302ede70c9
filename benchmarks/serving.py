r"""Serving benchmark with SGLang's own client: production SGLang against the plugin, one server at a time.

    python benchmarks/serving.py --model-path M --server-args="--load-format dummy --attention-backend flashinfer" \
        --workloads long_reasoning,shared_prefix --configs production,ams,topk --repeats 2

For each workload, repeat and configuration it starts `python -m sglang.launch_server` (loadtest/servers.py),
waits for /health, runs `python -m sglang.bench_serving --backend sglang` with a fixed --seed and an
--output-file, reads the plugin's counters from /server_info (internal_states[i]["sglang_ams"]) before and
after, takes the peak number of running requests from the server log's "#running-req: N" lines (logged every
40 decode steps) and from a 1 s poll of /metrics, and the median decode rate those lines log at >= 95 % of
their peak (full_load_decode_tok_s: the engine at full load, apart from ramp, tail and client), stops the
server, and writes summary.json, summary.md and summary.png to --out (default
benchmarks/results/serving-<date>-<gpu>). An --out that already holds a summary.json keeps its entries, except
those of the same (workload, config, repeat), so runs of several visits accumulate; --merge DIR... combines the
summaries of several folders into --out without running anything.

Configurations:  production  SGLang without the plugin (SGLANG_PLUGINS names no plugin), --server-args only
                 ams / topk  --kv-policy ams / topk, the workload's policy flags, then --policy-args
                 full        --kv-policy none (the plugin loaded, policy off)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE), str(HERE.parent)):      # appended: installed packages win over the repo's folders
    if _p not in sys.path:
        sys.path.append(_p)

import results_io  # noqa: E402
import serving_report as rep  # noqa: E402
from serving_model import SHIM  # noqa: E402
from loadtest.servers import NO_PLUGINS, Poller, Server, server_command  # noqa: E402

CONFIGS = ("production", "ams", "topk", "full")


@dataclasses.dataclass(frozen=True)
class Workload:
    """One bench_serving dataset setting. random-ids draws lengths uniformly in [len * ratio, len]."""
    dataset: str                    # random-ids | generated-shared-prefix
    prompts: int = 0                # random-ids requests
    input_len: int = 0
    output_len: int = 0
    range_ratio: float = 1.0
    groups: int = 0                 # generated-shared-prefix: groups x per_group requests
    per_group: int = 0
    system_len: int = 0
    question_len: int = 0
    concurrency: int | None = None  # --max-concurrency (None: every request at once)
    policy_args: str = ""           # flags for ams/topk on this workload (before --policy-args)

    def scaled(self, scale: float, count_scale: float = 1.0) -> "Workload":
        """Lengths x scale; request counts (and the concurrency cap) x scale x count_scale."""
        if scale == 1 and count_scale == 1:
            return self
        n = lambda v, f, lo=1: max(lo, round(v * f)) if v else v
        c = scale * count_scale
        return dataclasses.replace(self, prompts=n(self.prompts, c), input_len=n(self.input_len, scale, 8),
                                   output_len=n(self.output_len, scale, 8), groups=n(self.groups, c),
                                   system_len=n(self.system_len, scale, 8),
                                   question_len=n(self.question_len, scale, 8),
                                   concurrency=n(self.concurrency, scale) if self.concurrency else None)

    @property
    def requests(self) -> int:
        return self.groups * self.per_group if self.dataset == "generated-shared-prefix" else self.prompts

    @property
    def max_tokens(self) -> int:
        """Longest request (prompt + output), to check against the model's context."""
        if self.dataset == "generated-shared-prefix":
            return self.system_len + self.question_len + self.output_len
        return self.input_len + self.output_len

    def bench_args(self) -> list[str]:
        if self.dataset == "generated-shared-prefix":     # text prompts: gsp refuses --tokenize-prompt
            args = ["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", str(self.groups),
                    "--gsp-prompts-per-group", str(self.per_group), "--gsp-system-prompt-len", str(self.system_len),
                    "--gsp-question-len", str(self.question_len), "--gsp-output-len", str(self.output_len),
                    "--num-prompts", str(self.requests)]
        else:
            args = ["--dataset-name", "random-ids", "--tokenize-prompt", "--num-prompts", str(self.prompts),
                    "--random-input-len", str(self.input_len), "--random-output-len", str(self.output_len),
                    "--random-range-ratio", f"{self.range_ratio:g}"]
        if self.concurrency:
            args += ["--max-concurrency", str(self.concurrency)]
        return args


# The shapes (8B model, default memory fraction). shared_prefix compresses generated tokens only, as in
# the run (--ams-prompt-cache cached); --policy-args come later and override.
WORKLOADS = {
    "long_reasoning": Workload("random-ids", prompts=160, input_len=512, output_len=8192, range_ratio=0.75),
    "heavy_pressure": Workload("random-ids", prompts=512, input_len=512, output_len=8192, range_ratio=0.75),
    # 512 chat users at a time, 4096 requests in all: 1536 at once ran 27.7 s on an H200, under the 60 s asked for
    "short_chat": Workload("random-ids", prompts=4096, input_len=256, output_len=256, range_ratio=1.0,
                           concurrency=512),
    "long_prompts": Workload("random-ids", prompts=96, input_len=16384, output_len=1024, range_ratio=0.75),
    "shared_prefix": Workload("generated-shared-prefix", groups=12, per_group=16, system_len=2048, question_len=128,
                              output_len=1024, concurrency=128, policy_args="--ams-prompt-cache cached"),
}


def _names(choices):
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad) or 'empty list'}; choose from "
                                             f"{', '.join(choices)}")
        return names
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/serving.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", help="model folder (required unless --merge)")
    p.add_argument("--tokenizer", default=None, help="tokenizer for bench_serving (default: --model-path)")
    p.add_argument("--workloads", type=_names(tuple(WORKLOADS)), default=list(WORKLOADS),
                   help="subset of " + ",".join(WORKLOADS))
    p.add_argument("--configs", type=_names(CONFIGS), default=["production", "ams", "topk"],
                   help="subset of " + ",".join(CONFIGS) + " (default production,ams,topk)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each (workload, config)")
    p.add_argument("--first-repeat", type=int, default=1, help="number of the first repeat (to add repeats later)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="factor on request counts and lengths (quick runs: 0.1)")
    p.add_argument("--count-scale", type=float, default=1.0,
                   help="extra factor on request counts only, to make short workloads run >= 60 s (e.g. 3)")
    p.add_argument("--seed", type=int, default=1, help="bench_serving --seed (the same requests for every config)")
    p.add_argument("--server-args", default="", help="flags for every server, one string")
    p.add_argument("--policy-args", default="", help="flags for ams and topk servers, one string")
    p.add_argument("--bench-args", default="", help="extra bench_serving flags, one string")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--python", default=sys.executable, help="interpreter that runs sglang.launch_server")
    p.add_argument("--client-python", default=sys.executable, help="interpreter that runs sglang.bench_serving")
    p.add_argument("--startup-timeout", type=float, default=1200, help="seconds to wait for /health")
    p.add_argument("--run-timeout", type=float, default=1800, help="seconds one bench_serving run may take")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between /metrics polls")
    p.add_argument("--deadline", type=float, default=None, metavar="S",
                   help="seconds the whole driver may take: a run is not started when an earlier run of its "
                        "workload and config says it would end past them (a device call's limit would cut it "
                        "mid-way)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/serving-...)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="DIR",
                   help="combine the summary.json of these folders into --out; runs nothing")
    p.add_argument("--recover", action="store_true",
                   help="add entries for runs of --out (as planned by the other flags) whose client finished but "
                        "that the summary lacks; runs nothing")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge is None and not args.model_path:
        parser.error("--model-path is required (unless --merge)")
    if (args.merge is not None or args.recover) and args.out is None:
        parser.error("--merge and --recover need --out")
    if args.repeats < 1 or args.scale <= 0 or args.count_scale <= 0:
        parser.error("--repeats must be >= 1, --scale and --count-scale > 0")
    args.tokenizer = args.tokenizer or args.model_path
    return args


# --- plan -----------------------------------------------------------------------------------------------------
def config_flags(config: str, workload: Workload, args) -> tuple[list[str], dict]:
    """Server flags and environment of one configuration."""
    flags = shlex.split(args.server_args)
    if config == "production":
        return flags, dict(NO_PLUGINS)
    if config == "full":
        return flags + ["--kv-policy", "none"], {}
    return flags + ["--kv-policy", config] + shlex.split(workload.policy_args) + shlex.split(args.policy_args), {}


def plan(args) -> list[dict]:
    runs = []
    for name in args.workloads:
        wl = WORKLOADS[name].scaled(args.scale, args.count_scale)
        for repeat in range(args.first_repeat, args.first_repeat + args.repeats):
            for config in args.configs:           # configs interleaved within a repeat: drift hits all alike
                run = f"{name}_{config}_r{repeat}"
                run_dir = Path(args.out) / "runs" / run
                flags, env = config_flags(config, wl, args)
                bench = [args.client_python, "-m", "sglang.bench_serving", "--backend", "sglang", "--host", args.host,
                         "--port", str(args.port), "--model", args.model_path, "--tokenizer", args.tokenizer,
                         *wl.bench_args(), "--seed", str(args.seed), "--output-file", str(run_dir / "bench.jsonl"),
                         "--ready-check-timeout-sec", "0", "--disable-tqdm", "--output-details",
                         *shlex.split(args.bench_args)]
                runs.append(dict(run=run, workload=name, config=config, repeat=repeat, num_prompts=wl.requests,
                                 max_tokens=wl.max_tokens, env=env, run_dir=str(run_dir),
                                 server_cmd=server_command(args.python, args.model_path, args.port, flags, args.host),
                                 bench_cmd=bench))
    return runs


def show(cmd: list[str], env: dict | None = None) -> str:
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()] + [shlex.quote(c) for c in cmd])


def model_context(model_path: str) -> int | None:
    try:
        return int(json.loads((Path(model_path) / "config.json").read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def device() -> str:
    """The GPU's name from nvidia-smi (no CUDA context in this process), else results_io's guess."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return results_io.device_name()


def default_out(dev: str) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in dev).strip("-")[:40]
    return results_io.RESULTS / f"serving-{_dt.datetime.now(_dt.timezone.utc):%Y%m%d}-{slug}"


def client_env(client_python: str) -> dict:
    """The client's environment: the stand-in `datasets` appended to PYTHONPATH when the real one is missing."""
    env = dict(os.environ)
    probe = subprocess.run([client_python, "-c", "import importlib.util as u, sys; "
                            "sys.exit(u.find_spec('datasets') is None)"], env=env, capture_output=True)
    if probe.returncode != 0:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(SHIM)) if p)
    return env


# --- one run --------------------------------------------------------------------------------------------------
def server_info(server: Server) -> dict | None:
    for path in ("/server_info", "/get_server_info"):      # 0.5.17 deprecates the second
        text = server.get(path, timeout=30)
        if text:
            try:
                return json.loads(text)
            except ValueError:
                pass
    return None


def counters(server: Server) -> dict | None:
    found = rep.ams_counters(server_info(server))
    return found if found is not None else rep.prometheus_counters(server.metrics())


def file_metrics(run_dir: Path, log_offset: int, poll_interval: float) -> dict:
    """What a run's files say: bench_serving's output, the server log from `log_offset` (where the client
    started) and the /metrics polls."""
    m = {}
    result = rep.read_bench_output(run_dir / "bench.jsonl")
    m.update(rep.bench_metrics(result))
    m.update(rep.itl_stalls(result))
    rep.strip_details(run_dir / "bench.jsonl")
    with (run_dir / "server.log").open(errors="replace") as f:
        f.seek(log_offset)
        log_text = f.read()
    m["peak_running_log"] = rep.peak_running(log_text)
    m["full_load_decode_tok_s"], m["full_load_decode_samples"] = rep.full_load_decode_rate(log_text)
    polled = read_csv(run_dir / "running.csv")
    m["peak_running_poll"] = rep.peak_polled(polled)
    m["engine_span_s"] = rep.engine_span(polled, poll_interval)
    if m["engine_span_s"] and m.get("total_output_tokens"):
        m["engine_output_throughput"] = round(m["total_output_tokens"] / m["engine_span_s"], 1)
    peaks = [p for p in (m["peak_running_log"], m["peak_running_poll"]) if p is not None]
    m["peak_running"] = max(peaks) if peaks else None       # both sample the truth: the larger is closer
    return m


def base_entry(r: dict) -> dict:
    entry = {k: r[k] for k in ("workload", "config", "repeat", "num_prompts")}
    entry.update(rep.bench_metrics(None), peak_running=None, compactions=None, error=None,
                 server_cmd=show(r["server_cmd"], r["env"]), bench_cmd=show(r["bench_cmd"]), run_dir=r["run_dir"])
    return entry


def execute(args, r: dict, env: dict, tag: str, record=lambda entry: None) -> dict:
    """One (workload, config, repeat): its summary entry (bench_serving's numbers + ours), passed to `record`
    before the server stops: `timeout` may stop the driver while the server shuts down (a 2026-12-08 visit lost
    a finished short_chat run that way)."""
    run_dir = Path(r["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("bench.jsonl", "running.csv"):
        (run_dir / stale).unlink(missing_ok=True)
    entry = base_entry(r)
    server = Server(r["server_cmd"], run_dir / "server.log", env=r["env"], port=args.port, host=args.host)
    poller = bench = None
    t0 = time.monotonic()
    try:
        print(f"{tag}: starting server", flush=True)
        server.start()
        if not server.wait_healthy(args.startup_timeout):
            entry["error"] = "server did not come up: " + tail(run_dir / "server.log", 5)
            print(f"{tag}: {entry['error']}", flush=True)
            record(entry)
            return entry
        entry["server_ready_s"] = round(time.monotonic() - t0, 1)
        before = counters(server)
        offset = (run_dir / "server.log").stat().st_size
        poller = Poller(server, run_dir / "running.csv", args.poll_interval)
        poller.start()
        print(f"{tag}: server up after {entry['server_ready_s']} s; {r['num_prompts']} requests", flush=True)
        t1 = time.monotonic()
        with (run_dir / "bench.log").open("w") as log:
            bench = subprocess.Popen(r["bench_cmd"], stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
            while bench.poll() is None:
                if time.monotonic() - t1 > args.run_timeout:
                    entry["error"] = f"bench_serving ran past --run-timeout {args.run_timeout:g} s"
                    _kill_group(bench)
                    break
                try:
                    bench.wait(timeout=min(30.0, max(1.0, args.run_timeout / 20)))
                except subprocess.TimeoutExpired:
                    print(f"{tag}: running {poller.last.get('running')}, queued {poller.last.get('queued')}, "
                          f"{time.monotonic() - t1:.0f} s", flush=True)
        entry["wall_s"] = round(time.monotonic() - t1, 1)
        entry["bench_rc"] = bench.returncode
        after = counters(server) if server.alive() else None
        entry.update(rep.counter_deltas(before, after))
        poller.stop()
        entry.update(file_metrics(run_dir, offset, args.poll_interval))
        if entry["error"] is None and entry["completed"] is None:
            entry["error"] = f"bench_serving exit {bench.returncode}: " + tail(run_dir / "bench.log", 3)
        if not server.alive():
            entry["error"] = (entry["error"] or "") + " server exited: " + tail(run_dir / "server.log", 3)
        record(entry)
        return entry
    finally:
        if bench is not None and bench.poll() is None:
            _kill_group(bench)
        if poller is not None:
            poller.stop()
        print(f"{tag}: stopping server", flush=True)
        server.stop()


def fits(entries: list[dict], workload: str, config: str, elapsed: float, deadline: float | None,
         margin: float = 20.0) -> bool:
    """Whether a run of (`workload`, `config`) started after `elapsed` seconds ends before `deadline`, judged by
    the longest finished run of that pair (server start plus client). A pair not run yet starts: configs differ
    too much to judge by each other (AMS ran heavy_pressure in 350 s where production took 758 s, and judging
    it by production's time kept it from starting)."""
    if deadline is None:
        return True
    spans = [(e.get("server_ready_s") or 0) + (e.get("wall_s") or 0) for e in entries
             if e["workload"] == workload and e["config"] == config and e.get("wall_s")]
    return not spans or elapsed + max(spans) + margin <= deadline


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(10)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, n: int) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-600:]


def read_csv(path: Path) -> list[dict]:
    import csv
    try:
        with path.open() as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


# --- main -----------------------------------------------------------------------------------------------------
SUMMARY_COLUMNS = ("workload", "config", "repeats", "output_throughput", "throughput_vs_production",
                   "engine_output_throughput", "engine_vs_production", "p99_itl_ms",
                   "p99_itl_vs_production", "mean_ttft_ms", "median_tpot_ms", "peak_running", "compactions",
                   "completed", "requests")


def finish(out: Path, entries: list[dict], meta: dict) -> None:
    path = rep.write_summary(out, entries, meta)
    print(f"\nwrote {path}, {out / 'summary.md'}, {out / 'summary.png'}")
    rows = rep.aggregate(entries)
    print(results_io.table(rows, list(SUMMARY_COLUMNS)) if rows else "no finished runs", flush=True)


def merge_main(args, command: str) -> int:
    entries, commands, metas = [], [], []
    for folder in args.merge:
        s = rep.load_summary(folder)
        if not s:
            print(f"no summary.json in {folder}", file=sys.stderr)
            return 2
        entries = rep.merge(entries, s.get("entries", []))
        commands += s.get("commands", [])
        metas.append({k: s.get(k) for k in ("device", "date", "commit")})
    meta = {**metas[-1], "commands": commands + [command], "merged_from": [str(f) for f in args.merge],
            "sources": metas}
    finish(Path(args.out), entries, meta)
    return 0


def recover_main(args, command: str) -> int:
    """Entries for planned runs of --out whose client finished but whose driver stopped before recording them
    (older drivers could lose a run to a SIGTERM while its server shut down): built from the run's files alone,
    so without the server's counters (compactions) or the startup and client wall times, and marked."""
    old = rep.load_summary(args.out)
    entries = old.get("entries", [])
    have = {(e["workload"], e["config"], e["repeat"]) for e in entries}
    found = []
    for r in plan(args):
        run_dir = Path(r["run_dir"])
        if (r["workload"], r["config"], r["repeat"]) in have or not (run_dir / "bench.jsonl").exists():
            continue
        entry = base_entry(r)
        entry.update(file_metrics(run_dir, 0, args.poll_interval))
        if entry["completed"] is None:
            entry["error"] = "recovered: no bench_serving result in " + str(run_dir / "bench.jsonl")
        entry["recovered"] = "from the run's files: no server counters, startup or wall times; log read whole"
        found.append(entry)
        print(f"recovered {r['run']}: {entry['completed']} completed, "
              f"{entry.get('output_throughput') or 0:.0f} output tok/s")
    if not found:
        print(f"nothing to recover in {args.out}", file=sys.stderr)
        return 2
    meta = {k: v for k, v in old.items() if k != "entries"}
    meta["commands"] = old.get("commands", []) + [command]
    finish(args.out, rep.merge(entries, found), meta)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    command = shlex.join([Path(sys.executable).name, "benchmarks/serving.py", *(sys.argv[1:] if argv is None else argv)])
    if args.merge is not None:
        return merge_main(args, command)
    if args.recover:
        return recover_main(args, command)
    dev = device()
    args.out = Path(args.out) if args.out else default_out(dev)
    runs = plan(args)
    context = model_context(args.model_path)
    for r in runs:
        if context and r["max_tokens"] > context and "--context-length" not in args.server_args:
            print(f"warning: {r['workload']} needs {r['max_tokens']} tokens per request, the model's "
                  f"max_position_embeddings is {context} (benchmarks/serving_model.py tokenizer --max-positions)")
            break
    if args.dry_run:
        for i, r in enumerate(runs, 1):
            print(f"[{i}/{len(runs)}] {r['run']}\n  server: {show(r['server_cmd'], r['env'])}\n"
                  f"  client: {show(r['bench_cmd'])}")
        print(f"\noutput folder: {args.out}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    old = rep.load_summary(args.out)
    entries = old.get("entries", [])
    meta = {**results_io.metadata(), "device": dev, "command": command,
            "commands": old.get("commands", []) + [command],
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "workloads": {n: dataclasses.asdict(WORKLOADS[n].scaled(args.scale, args.count_scale))
                          for n in args.workloads}}
    env = client_env(args.client_python)
    previous = signal.signal(signal.SIGTERM, _interrupt)   # `timeout` stops us: the finally blocks stop the server
    code = 0
    started = time.monotonic()

    def record(entry):
        nonlocal entries
        entries = rep.merge(entries, [entry])
        rep.write_summary(args.out, entries, meta)      # after every run: a cut-off visit keeps what ran

    try:
        for i, r in enumerate(runs, 1):
            if not fits(entries, r["workload"], r["config"], time.monotonic() - started, args.deadline):
                print(f"[{i}/{len(runs)}] {r['run']}: not started, it would end past --deadline {args.deadline:g} s; "
                      f"{len(runs) - i} later runs not tried either", flush=True)
                code = 3
                break
            entry = execute(args, r, env, f"[{i}/{len(runs)}] {r['run']}", record)
            print(f"[{i}/{len(runs)}] {r['run']}: {entry.get('completed')}/{r['num_prompts']} completed, "
                  f"{entry.get('output_throughput') or 0:.0f} output tok/s, P99 ITL {entry.get('p99_itl_ms')}, "
                  f"peak running {entry.get('peak_running')}, compactions {entry.get('compactions')}"
                  + (f", error: {entry['error']}" if entry.get("error") else "") + "\n", flush=True)
    except KeyboardInterrupt as why:
        print(f"stopped ({why or 'interrupt'}); the summary has the runs that finished", flush=True)
        code = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    finish(args.out, entries, meta)
    return code


if __name__ == "__main__":
    sys.exit(main())
