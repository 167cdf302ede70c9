"""benchmarks/serving.py (the bench_serving driver), serving_report.py and serving_model.py, on the CPU.

The driver runs against loadtest/fake_server.py with a stand-in client that speaks bench_serving's command line
and output file (seconds); SERVING_E2E=1 adds a run with the real `python -m sglang.bench_serving`, which takes
~30-40 s per run here only to import SGLang.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module                 # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


serving = _load("serving_bench_driver", BENCH / "serving.py")
rep = serving.rep
smodel = sys.modules["serving_model"]

SGLANG_BENCH = importlib.util.find_spec("sglang")
SERVING_SRC = (Path(SGLANG_BENCH.submodule_search_locations[0]) / "benchmark" / "serving.py") if SGLANG_BENCH else None
needs_sglang = pytest.mark.skipif(SERVING_SRC is None or not SERVING_SRC.exists(),
                                  reason="needs SGLang 0.5.17's sglang/benchmark/serving.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- bench_serving's output and the server's log ----------------------------------------------------------------
def bench_line(**over) -> str:
    result = {"backend": "sglang", "dataset_name": "random-ids", "server_info": {"internal_states": [{}]},
              "duration": 61.5, "completed": 160, "total_input_tokens": 71000, "total_output_tokens": 1146880,
              "request_throughput": 2.6, "output_throughput": 18649.3, "median_tpot_ms": 7.25, "mean_tpot_ms": 7.5,
              "p99_itl_ms": 21.0, "median_itl_ms": 7.0, "p95_itl_ms": 9.5, "mean_ttft_ms": 812.0,
              "median_ttft_ms": 700.0, "p99_ttft_ms": 2100.0, "mean_e2e_latency_ms": 50000.0,
              "max_concurrent_requests": 160}
    result.update(over)
    return json.dumps(result)


def test_bench_output_parsing(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text(bench_line(output_throughput=1.0) + "\n" + "not json\n" + bench_line() + "\n\n")
    m = rep.bench_metrics(rep.read_bench_output(path))          # bench_serving appends: the last line counts
    assert m["output_throughput"] == 18649.3 and m["median_tpot_ms"] == 7.25 and m["p99_itl_ms"] == 21.0
    assert m["mean_ttft_ms"] == 812.0 and m["completed"] == 160 and isinstance(m["completed"], int)
    assert m["duration_s"] == 61.5 and "duration" not in m and m["max_concurrent_requests"] == 160
    assert rep.read_bench_output(tmp_path / "missing.jsonl") is None
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    assert rep.read_bench_output(tmp_path / "bad.jsonl") is None
    empty = rep.bench_metrics(None)
    assert set(empty) == set(m) and all(v is None for v in empty.values())
    m = rep.bench_metrics(json.loads(bench_line(p99_itl_ms=None, completed="12", median_tpot_ms=float("nan"))))
    assert m["p99_itl_ms"] is None and m["completed"] == 12 and m["median_tpot_ms"] is None


def test_itl_stalls_split_first_gaps_from_later_ones(tmp_path):
    # three requests (s): a prefill-first stall after the first token of two, one 0.45 s stall later on
    itls = [[2.0, 0.01, 0.01, 0.45], [0.01, 0.01, 0.02], [5.0, 0.01]]
    out = rep.itl_stalls({"itls": itls})
    assert out["stalls_first"] == 2 and out["stall_s_first"] == 7.0
    assert out["stalls_later"] == 1 and out["stall_s_later"] == 0.45
    assert out["p99_itl_after_first_ms"] == 450.0          # the largest of the 5 later gaps
    assert rep.itl_stalls({"itls": []}) == {} and rep.itl_stalls(None) == {} and rep.itl_stalls({}) == {}
    path = tmp_path / "bench.jsonl"
    path.write_text(bench_line(itls=itls, ttfts=[1.0, 2.0, 3.0], generated_texts=["a", "b", "c"]) + "\n")
    rep.strip_details(path)
    kept = rep.read_bench_output(path)
    assert "itls" not in kept and "ttfts" not in kept and "generated_texts" not in kept
    assert rep.bench_metrics(kept) == rep.bench_metrics(json.loads(bench_line()))   # the summary is untouched
    rep.strip_details(tmp_path / "missing.jsonl")                                   # no file: nothing to do


@needs_sglang
def test_keys_and_flags_exist_in_the_installed_bench_serving(tmp_path):
    """The result keys we read are the ones 0.5.17 writes, and every flag we pass is one it defines."""
    src = SERVING_SRC.read_text()
    written = set(re.findall(r'^\s+"([a-z0-9_]+)":', src, re.M))
    assert set(rep.BENCH_KEYS) <= written, set(rep.BENCH_KEYS) - written
    defined = set(re.findall(r'add_argument\(\s*"(--[a-z0-9-]+)"', src))
    args = serving.parse_args(["--model-path", str(tmp_path / "model"), "--bench-args", "", "--out",
                               str(tmp_path / "out")])
    used = {a for r in serving.plan(args) for a in r["bench_cmd"] if a.startswith("--")}
    assert used and used <= defined, used - defined
    assert "--tokenize-prompt" in used and "--gsp-num-groups" in used


def test_peak_running_from_the_log():
    log = "\n".join([
        "[2026-12-01 10:00:00] Prefill batch, #new-seq: 12, #new-token: 6144, #cached-token: 0, token usage: 0.01, "
        "#running-req: 3, #queue-req: 140, #pending-token: 0, ",
        "[2026-12-01 10:00:01] Decode batch, #running-req: 57, #token: 30000, token usage: 0.30, cuda graph: True, "
        "gen throughput (token/s): 5000.00, #queue-req: 100, ",
        "[2026-12-01 10:00:02] Decode batch [812], #running-req: 160, #token: 90000, token usage: 0.9, ",
        "[2026-12-01 10:00:03] Prefill batch, #new-seq: 1, #new-token: 512, #cached-token: 0, token usage: 0.9, "
        "#running-req: 158, #queue-req: 0, ",
        "[2026-12-01 10:00:04] Decode batch, #running-req: 12, #token: 9000, token usage: 0.09, "])
    assert rep.peak_running(log) == 160
    assert rep.peak_running("server started\nno batches yet\n") is None
    # full load: decode lines at >= 95 % of the peak that logged a rate (160 and 155 here, not 57 or 12)
    rated = log + "\n" + "\n".join(
        f"[2026-12-01 10:00:0{i}] Decode batch, #running-req: {r}, #token: 9, token usage: 0.9, cuda graph: True, "
        f"gen throughput (token/s): {g:.2f}, #queue-req: 0, " for i, (r, g) in enumerate(
            [(160, 9000.0), (155, 8000.0), (160, 9400.0), (151, 100.0), (160, 9600.0), (57, 7000.0)]))
    assert rep.full_load_decode_rate(rated) == (9200.0, 4)
    assert rep.full_load_decode_rate(log) == (5000.0, 1)       # (only the 57-request line logged a rate)
    assert rep.full_load_decode_rate("no batches\n") == (None, 0)
    assert rep.peak_polled([{"running": "3.0"}, {"running": ""}, {"running": "41"}, {}]) == 41
    assert rep.peak_polled([{"running": None}]) is None


def test_engine_span_counts_busy_polls_only():
    rows = [{"t": "100.0", "running": "0", "queued": "0"}, {"t": "101.0", "running": "0", "queued": "5"},
            {"t": "102.0", "running": "160", "queued": "0"}, {"t": "150.5", "running": "3", "queued": ""},
            {"t": "151.5", "running": "0", "queued": "0"}, {"t": "300.0", "running": "0", "queued": "0"}]
    assert rep.engine_span(rows) == 50.5
    assert rep.engine_span([{"t": "1", "running": "0", "queued": "0"}]) is None
    assert rep.engine_span([]) is None


def test_counters_from_server_info():
    info = {"internal_states": [{"sglang_ams": {"compactions": 10, "launches": 3, "tokens_freed": 500,
                                                "host_seconds": 0.25, "policy": "ams"}},
                                {"sglang_ams": {"compactions": 5, "launches": 2, "tokens_freed": 100,
                                                "host_seconds": 0.5}}]}
    after = rep.ams_counters(info)
    assert after == {"compactions": 15, "launches": 5, "tokens_freed": 600, "host_seconds": 0.75}
    before = {"compactions": 4, "launches": 1, "tokens_freed": 100, "host_seconds": 0.25}
    d = rep.counter_deltas(before, after)
    assert d["compactions"] == 11 and d["compaction_steps"] == 4 and d["tokens_freed"] == 500
    assert d["host_seconds"] == 0.5 and d["score_gpu_ms"] == 0
    assert d["longest_step_gpu_ms"] is None                  # a server without the maximum: unknown, not 0
    info["internal_states"][0]["sglang_ams"]["step_gpu_ms_max"] = 12.5
    info["internal_states"][1]["sglang_ams"]["step_gpu_ms_max"] = 30.0
    d = rep.counter_deltas(before, rep.ams_counters(info))
    assert d["longest_step_gpu_ms"] == 30.0 and d["compactions"] == 11   # a maximum over schedulers, not a sum
    info["internal_states"][1]["sglang_ams"]["first_step_seconds"] = 0.05
    assert rep.counter_deltas(before, rep.ams_counters(info))["first_step_host_s"] == 0.05
    # production: the server answers without the plugin's counters -> 0; no answer -> unknown
    plain = rep.ams_counters({"internal_states": [{"avg_spec_accept_length": None}]})
    assert plain == {} and rep.counter_deltas(plain, plain)["compactions"] == 0
    assert rep.ams_counters(None) is None and rep.counter_deltas(None, after)["compactions"] is None
    # PD layout, and the /metrics fallback
    assert rep.ams_counters({"decode": [info]})["compactions"] == 15
    prom = rep.prometheus_counters({"sglang_ams:compactions_total": 7.0, "sglang:num_running_reqs": 3.0})
    assert prom == {"compactions": 7.0} and rep.prometheus_counters({}) is None


# --- summary ----------------------------------------------------------------------------------------------------
def entry(workload, config, repeat, tput, itl, **over):
    e = {"workload": workload, "config": config, "repeat": repeat, "output_throughput": tput,
         "median_tpot_ms": 5.0, "p99_itl_ms": itl, "mean_ttft_ms": 100.0, "peak_running": 10, "completed": 8,
         "num_prompts": 8, "compactions": 0 if config == "production" else 40, "duration_s": 70.0, "error": None}
    e.update(over)
    return e


def test_merge_and_aggregate():
    old = [entry("long_reasoning", "production", 1, 1000.0, 10.0), entry("long_reasoning", "ams", 1, 1500.0, 30.0)]
    new = [entry("long_reasoning", "ams", 1, 2000.0, 12.0), entry("long_reasoning", "ams", 2, 2400.0, 14.0)]
    merged = rep.merge(old, new)
    assert [(e["config"], e["repeat"], e["output_throughput"]) for e in merged] == \
        [("production", 1, 1000.0), ("ams", 1, 2000.0), ("ams", 2, 2400.0)]
    rows = {r["config"]: r for r in rep.aggregate(merged + [entry("short_chat", "ams", 1, 50.0, None)])
            if r["workload"] == "long_reasoning"}
    assert rows["ams"]["repeats"] == 2 and rows["ams"]["output_throughput"] == 2200.0
    assert rows["ams"]["throughput_vs_production"] == pytest.approx(2.2)
    assert rows["ams"]["p99_itl_vs_production"] == pytest.approx(1.3)
    assert rows["ams"]["completed"] == 16 and rows["production"]["throughput_vs_production"] == 1.0
    lone = [r for r in rep.aggregate([entry("short_chat", "ams", 1, 50.0, None)])][0]
    assert lone["throughput_vs_production"] is None and lone["p99_itl_ms"] is None     # no production run


def test_write_summary(tmp_path):
    entries = [entry("shared_prefix", "production", 1, 1000.0, 10.0, engine_output_throughput=1000.0),
               entry("shared_prefix", "ams", 1, 800.0, 25.0, duration_s=30.0, engine_output_throughput=1500.0),
               entry("long_prompts", "production", 1, 300.0, 50.0),
               entry("long_prompts", "ams", 1, None, None, completed=None, error="server exited: | OOM")]
    meta = {"device": "NVIDIA H200", "date": "2026-12-01T20:00:00+00:00", "commit": "abc1234",
            "commands": ["python benchmarks/serving.py --model-path /m"]}
    path = rep.write_summary(tmp_path, entries, meta)
    data = json.loads(path.read_text())
    assert data["device"] == "NVIDIA H200" and data["commit"] == "abc1234" and data["commands"] == meta["commands"]
    assert data["entries"] == entries
    for e in data["entries"]:
        assert set(rep.FIELDS) <= set(e)
    agg = {(r["workload"], r["config"]): r for r in data["aggregate"]}
    assert agg[("shared_prefix", "ams")]["throughput_vs_production"] == pytest.approx(0.8)
    md = (tmp_path / "summary.md").read_text()
    assert "NVIDIA H200" in md and "| shared_prefix | ams | 1 | 800 | 0.8 | 1500 | 1.5 | 25 | 2.5 |" in md
    assert "server exited: / OOM" in md                 # a | inside a cell would break the table
    assert "shorter than 60 s" in md and "shared_prefix/ams/1" in md and "long_prompts/production" not in md
    if importlib.util.find_spec("matplotlib"):
        png = (tmp_path / "summary.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    empty = rep.write_summary(tmp_path / "empty", [], meta)      # a visit cut off before its first run
    assert json.loads(empty.read_text())["entries"] == [] and (tmp_path / "empty" / "summary.md").exists()


def test_merge_folders(tmp_path, capsys):
    for name, es in (("a", [entry("short_chat", "production", 1, 10.0, 1.0)]),
                     ("b", [entry("short_chat", "ams", 1, 12.0, 1.0), entry("short_chat", "production", 1, 11.0, 1.0)])):
        rep.write_summary(tmp_path / name, es, {"device": "GPU", "date": name, "commit": "c", "commands": [name]})
    out = tmp_path / "all"
    assert serving.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    data = json.loads((out / "summary.json").read_text())
    assert [(e["config"], e["output_throughput"]) for e in data["entries"]] == [("ams", 12.0), ("production", 11.0)]
    assert data["commands"][:2] == ["a", "b"] and "--merge" in data["commands"][2]
    assert "short_chat" in capsys.readouterr().out.splitlines()[-1]          # the table is printed last
    assert serving.main(["--merge", str(tmp_path / "none"), "--out", str(out)]) == 2


# --- plan -------------------------------------------------------------------------------------------------------
def test_plan_commands(tmp_path):
    args = serving.parse_args(["--model-path", "/m", "--workloads", "long_reasoning,shared_prefix", "--configs",
                               "production,ams,full", "--repeats", "2", "--policy-args", "--kv-budget 512",
                               "--server-args", "--attention-backend flashinfer", "--out", str(tmp_path),
                               "--port", "31000", "--seed", "7"])
    runs = serving.plan(args)
    assert [r["run"] for r in runs[:4]] == ["long_reasoning_production_r1", "long_reasoning_ams_r1",
                                            "long_reasoning_full_r1", "long_reasoning_production_r2"]
    assert len(runs) == 12
    by = {r["run"]: r for r in runs}
    prod, ams, full = (by[f"long_reasoning_{c}_r1"] for c in ("production", "ams", "full"))
    assert prod["env"] == serving.NO_PLUGINS and "--kv-policy" not in prod["server_cmd"]
    assert prod["server_cmd"][1:3] == ["-m", "sglang.launch_server"] and "flashinfer" in prod["server_cmd"]
    tail = ams["server_cmd"][ams["server_cmd"].index("--kv-policy"):]
    assert tail == ["--kv-policy", "ams", "--kv-budget", "512"] and ams["env"] == {}
    assert full["server_cmd"][-2:] == ["--kv-policy", "none"]
    sp = by["shared_prefix_ams_r2"]["server_cmd"]
    assert sp[sp.index("--kv-policy"):] == ["--kv-policy", "ams", "--ams-prompt-cache", "cached", "--kv-budget", "512"]
    b = prod["bench_cmd"]
    assert b[1:5] == ["-m", "sglang.bench_serving", "--backend", "sglang"]
    opt = lambda cmd, k: cmd[cmd.index(k) + 1]
    assert opt(b, "--dataset-name") == "random-ids" and "--tokenize-prompt" in b and opt(b, "--seed") == "7"
    assert opt(b, "--num-prompts") == "160" and opt(b, "--random-output-len") == "8192"
    assert opt(b, "--random-input-len") == "512" and opt(b, "--random-range-ratio") == "0.75"
    assert opt(b, "--port") == "31000" and opt(b, "--output-file").endswith("long_reasoning_production_r1/bench.jsonl")
    assert "--max-concurrency" not in b
    g = by["shared_prefix_production_r1"]["bench_cmd"]
    assert opt(g, "--dataset-name") == "generated-shared-prefix" and "--tokenize-prompt" not in g
    assert [opt(g, k) for k in ("--gsp-num-groups", "--gsp-prompts-per-group", "--gsp-system-prompt-len",
                                "--gsp-question-len", "--gsp-output-len", "--max-concurrency")] == \
        ["12", "16", "2048", "128", "1024", "128"]
    assert by["shared_prefix_production_r1"]["num_prompts"] == 192


def test_workload_shapes_and_scale():
    w = serving.WORKLOADS
    assert (w["heavy_pressure"].prompts, w["heavy_pressure"].output_len) == (512, 8192)
    assert (w["short_chat"].prompts, w["short_chat"].input_len, w["short_chat"].output_len) == (4096, 256, 256)
    assert w["short_chat"].concurrency == 512               # 512 users at a time: the run lasts about a minute
    lp = w["long_prompts"]
    assert lp.prompts == 96 and lp.input_len * lp.range_ratio == 12288 and lp.input_len == 16384
    assert w["long_reasoning"].input_len * w["long_reasoning"].range_ratio == 384
    assert w["long_reasoning"].output_len * w["long_reasoning"].range_ratio == 6144
    q = w["long_reasoning"].scaled(0.1)
    assert (q.prompts, q.input_len, q.output_len, q.range_ratio) == (16, 51, 819, 0.75)
    s = w["shared_prefix"].scaled(0.05)
    assert (s.groups, s.per_group, s.system_len, s.question_len, s.output_len, s.concurrency) == (1, 16, 102, 8, 51, 6)
    assert s.requests == 16 and s.max_tokens == 161 and w["long_prompts"].max_tokens == 17408
    assert w["short_chat"].scaled(1) is w["short_chat"]
    longer = w["shared_prefix"].scaled(1, 3)        # more requests of the same shape, the same concurrency
    assert (longer.groups, longer.per_group, longer.system_len, longer.output_len, longer.concurrency) == \
        (36, 16, 2048, 1024, 128)
    chat = w["short_chat"].scaled(1, 3)
    assert (chat.prompts, chat.concurrency, chat.output_len) == (12288, 512, 256)
    with pytest.raises(SystemExit):
        serving.parse_args(["--model-path", "/m", "--configs", "production,vllm"])
    with pytest.raises(SystemExit):
        serving.parse_args(["--model-path", "/m", "--workloads", "chat"])
    with pytest.raises(SystemExit):
        serving.parse_args(["--workloads", "short_chat"])                   # no model


def test_dry_run_warns_about_a_short_context(tmp_path, capsys):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 8192, "vocab_size": 128256}))
    assert serving.main(["--model-path", str(model), "--workloads", "long_reasoning", "--configs", "ams",
                         "--repeats", "1", "--dry-run", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "needs 8704 tokens" in out and "[1/1] long_reasoning_ams_r1" in out and "sglang.bench_serving" in out
    assert not (tmp_path / "o").exists()
    assert serving.main(["--model-path", str(model), "--workloads", "short_chat", "--dry-run",
                         "--out", str(tmp_path / "o")]) == 0
    assert "warning" not in capsys.readouterr().out


# --- dummy model tokenizer and the stand-in datasets -----------------------------------------------------------
def test_tokenizer_maker(tmp_path):
    model = tmp_path / "llama8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 128256, "bos_token_id": 128000,
                                                   "eos_token_id": 128001, "max_position_embeddings": 8192,
                                                   "hidden_size": 4096}))
    assert smodel.main(["tokenizer", str(model), "--max-positions", "32768"]) == 0
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["vocab_size"] == 32000 and cfg["bos_token_id"] < 32000 and cfg["eos_token_id"] < 32000
    assert cfg["max_position_embeddings"] == 32768 and cfg["hidden_size"] == 4096
    assert json.loads((model / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    assert tok.get_vocab_size() == 32000 == len(tok.get_vocab())
    assert sorted(tok.get_vocab().values()) == list(range(32000))
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(model))
    assert hf.vocab_size == 32000 and hf.num_special_tokens_to_add() == 0
    ids = [0, 1, 17, 31999, 5, 5]
    text = hf.decode(ids)
    assert hf.encode(text) == ids                       # decode -> encode keeps the count (gsp prompts rely on it)
    # a smaller vocabulary; a config without those keys; max positions never lowered
    smodel.add_tokenizer(model, vocab_size=1000, max_positions=4096)
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["vocab_size"] == 1000 and cfg["max_position_embeddings"] == 32768
    assert AutoTokenizer.from_pretrained(str(model)).vocab_size == 1000
    with pytest.raises(ValueError):
        smodel.add_tokenizer(tmp_path / "x", vocab_size=3)


def test_datasets_stand_in_covers_bench_serving_imports():
    shim = smodel.SHIM / "datasets" / "__init__.py"
    mod = _load("datasets_standin", shim)
    with pytest.raises(RuntimeError, match="stand-in"):
        mod.load_dataset("MMMU/MMMU")
    if SERVING_SRC is None:
        pytest.skip("SGLang not installed: cannot list what bench_serving imports from datasets")
    needed = set()
    for path in SERVING_SRC.parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "datasets" and node.level == 0:
                needed |= {a.name for a in node.names}
    assert needed and needed <= set(dir(mod)), needed - set(dir(mod))


def test_client_env_adds_the_stand_in_only_when_datasets_is_missing(tmp_path):
    bare = tmp_path / "bare-python"          # -S: no site-packages, so no real `datasets`
    bare.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -S \"$@\"\n")
    bare.chmod(0o755)
    env = serving.client_env(str(bare))
    assert str(smodel.SHIM) in env["PYTHONPATH"].split(os.pathsep)
    found = subprocess.run([str(bare), "-c", "import datasets; print(datasets.__version__)"], env=env,
                           capture_output=True, text=True)
    assert found.returncode == 0 and "standin" in found.stdout
    full = tmp_path / "full-python"          # an interpreter that has it keeps its environment
    full.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c 'import sys; sys.exit(0)'\n")
    full.chmod(0o755)
    assert str(smodel.SHIM) not in serving.client_env(str(full)).get("PYTHONPATH", "")


# --- the driver against the stand-in server ---------------------------------------------------------------------
FAKE_CLIENT = r'''
"""Speaks bench_serving's command line and output file: sends --num-prompts concurrent /generate requests."""
import argparse, json, sys, threading, time, urllib.request
p = argparse.ArgumentParser()
p.add_argument("-m"); p.add_argument("--port", type=int); p.add_argument("--host")
p.add_argument("--num-prompts", type=int); p.add_argument("--random-output-len", type=int, default=16)
p.add_argument("--random-input-len", type=int, default=16)
p.add_argument("--gsp-output-len", type=int, default=16); p.add_argument("--output-file")
p.add_argument("--dataset-name"); p.add_argument("--fail", action="store_true")
p.add_argument("--sleep", type=float, default=0)
a, _ = p.parse_known_args()
time.sleep(a.sleep)
if a.fail:
    sys.exit("Warmup failed - Please make sure benchmark arguments are correctly specified")
n_out = a.random_output_len if a.dataset_name == "random-ids" else a.gsp_output_len
def one():
    body = json.dumps({"input_ids": list(range(a.random_input_len)), "sampling_params": {"max_new_tokens": n_out}}).encode()
    req = urllib.request.Request(f"http://{a.host}:{a.port}/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=60).read()
t0 = time.perf_counter()
threads = [threading.Thread(target=one) for _ in range(a.num_prompts)]
[t.start() for t in threads]; [t.join() for t in threads]
dur = time.perf_counter() - t0
with open(a.output_file, "a") as f:
    f.write(json.dumps({"completed": a.num_prompts, "duration": dur, "output_throughput": a.num_prompts * n_out / dur,
                        "median_tpot_ms": 1.0, "p99_itl_ms": 2.0, "mean_ttft_ms": 3.0}) + "\n")
'''


@pytest.fixture
def stand_ins(tmp_path):
    fake_python = tmp_path / "fake-python"      # runs loadtest/fake_server.py as `python -m sglang.launch_server`
    fake_python.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                           f"{shlex.quote(str(ROOT / 'loadtest' / 'fake_server.py'))} \"$@\"\n")
    fake_python.chmod(0o755)
    client = tmp_path / "client.py"
    client.write_text(FAKE_CLIENT)
    client_python = tmp_path / "client-python"
    client_python.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(client))} \"$@\"\n")
    client_python.chmod(0o755)
    return str(fake_python), str(client_python)


def test_driver_against_the_stand_in_server(stand_ins, tmp_path, capsys):
    fake_python, client_python = stand_ins
    out = tmp_path / "out"
    argv = ["--model-path", "fake", "--python", fake_python, "--client-python", client_python,
            "--workloads", "short_chat", "--configs", "production,ams", "--repeats", "1", "--scale", "0.05",
            "--count-scale", "0.125",
            "--server-args", "--token-ms 20 --decode-log-s 0.05 --max-total-tokens 200",
            "--policy-args", "--kv-budget 4 --kv-interval 2", "--port", str(free_port()), "--out", str(out),
            "--poll-interval", "0.1"]
    assert serving.main(argv) == 0
    printed = capsys.readouterr().out
    assert "[2/2] short_chat_ams_r1: stopping server" in printed and printed.strip().splitlines()[-1].split()[0] \
        == "short_chat"
    data = json.loads((out / "summary.json").read_text())
    assert {"device", "date", "commit", "commands", "settings", "workloads"} <= set(data)
    assert "--client-python" in data["commands"][0]
    e = {x["config"]: x for x in data["entries"]}
    for x in e.values():
        assert x["error"] is None and x["completed"] == 26 and x["bench_rc"] == 0 and x["output_throughput"] > 0
        assert "-m sglang.launch_server" in x["server_cmd"] and "--output-file" in x["bench_cmd"]
    # 26 requests of 13 + 13 tokens hold 26 tokens each: the 200-token pool runs 7 at once; compressed (4 + 2)
    # they all fit, and each compacts (13 + 13 - 6) // 2 = 10 times
    assert e["production"]["peak_running"] <= 7 < e["ams"]["peak_running"]
    assert e["production"]["peak_running_log"] is not None and e["ams"]["peak_running_log"] is not None
    assert e["production"]["compactions"] == 0 and e["ams"]["compactions"] == 26 * 10
    assert "SGLANG_PLUGINS=no-plugins" in e["production"]["server_cmd"]
    # a second visit adds a repeat to the same folder; a failing client is an entry with its error
    argv2 = [a for a in argv] + ["--first-repeat", "2", "--configs", "ams", "--bench-args=--fail"]
    assert serving.main(argv2) == 0
    data = json.loads((out / "summary.json").read_text())
    assert [(x["config"], x["repeat"]) for x in data["entries"]] == [("production", 1), ("ams", 1), ("ams", 2)]
    failed = data["entries"][-1]
    assert failed["completed"] is None and "Warmup failed" in failed["error"] and failed["bench_rc"] == 1
    assert len(data["commands"]) == 2
    # a client past --run-timeout is stopped, and its run is an entry with that error
    argv3 = [a for a in argv] + ["--first-repeat", "3", "--configs", "ams", "--bench-args=--sleep 60",
                                 "--run-timeout", "2"]
    assert serving.main(argv3) == 0
    late = json.loads((out / "summary.json").read_text())["entries"][-1]
    assert late["repeat"] == 3 and "--run-timeout 2 s" in late["error"] and late["wall_s"] < 30
    assert late["bench_rc"] is not None and late["completed"] is None
    # a run that earlier runs of its workload and config say would end past --deadline is not started
    argv4 = [a for a in argv] + ["--first-repeat", "4", "--configs", "ams", "--deadline", "1"]
    assert serving.main(argv4) == 3
    assert "not started, it would end past --deadline 1 s" in capsys.readouterr().out
    assert [x["repeat"] for x in json.loads((out / "summary.json").read_text())["entries"]] == [1, 1, 2, 3]


def test_driver_stops_its_server_on_sigterm(stand_ins, tmp_path):
    """`timeout` around a visit sends SIGTERM: the server must not outlive the driver (it would hold the GPU)."""
    fake_python, client_python = stand_ins
    port = free_port()
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(BENCH / "serving.py"), "--model-path", "fake", "--python", fake_python,
                             "--client-python", client_python, "--workloads", "short_chat", "--configs", "ams",
                             "--repeats", "1", "--scale", "0.05", "--count-scale", "0.125", "--port", str(port),
                             "--out", str(out),
                             "--bench-args=--sleep 120"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "server up" in line:
                break
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 130 and "stopped" in rest and "stopping server" in rest
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0          # nothing listens there any more
    assert json.loads((out / "summary.json").read_text())["entries"] == []


def test_a_run_that_finished_is_kept_when_sigterm_comes_while_its_server_stops(stand_ins, tmp_path, monkeypatch):
    """The 2026-12-08 visit: `timeout` stopped the driver while the last run's server shut down, after its client
    had finished; that run's numbers must be in the summary."""
    fake_python, client_python = stand_ins
    real_stop = serving.Server.stop

    def stop_then_interrupted(self):
        real_stop(self)
        raise KeyboardInterrupt("signal 15")           # what _interrupt raises for SIGTERM

    monkeypatch.setattr(serving.Server, "stop", stop_then_interrupted)
    out = tmp_path / "out"
    assert serving.main(["--model-path", "fake", "--python", fake_python, "--client-python", client_python,
                         "--workloads", "short_chat", "--configs", "production,ams", "--repeats", "1",
                         "--scale", "0.05", "--count-scale", "0.125", "--port", str(free_port()),
                         "--out", str(out), "--poll-interval", "0.1"]) == 130
    entries = json.loads((out / "summary.json").read_text())["entries"]
    assert [(e["config"], e["completed"]) for e in entries] == [("production", 26)]   # ams never started


def test_recover_rebuilds_a_lost_entry_from_the_run_files(stand_ins, tmp_path):
    fake_python, client_python = stand_ins
    out = tmp_path / "out"
    argv = ["--model-path", "fake", "--python", fake_python, "--client-python", client_python,
            "--workloads", "short_chat", "--configs", "production,ams", "--repeats", "1", "--scale", "0.05",
            "--count-scale", "0.125", "--server-args", "--token-ms 20 --decode-log-s 0.05 --max-total-tokens 200",
            "--policy-args", "--kv-budget 4 --kv-interval 2", "--port", str(free_port()), "--out", str(out),
            "--poll-interval", "0.1"]
    assert serving.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    kept = summary["entries"][:1]
    lost = summary["entries"][1]
    (out / "summary.json").write_text(json.dumps({**summary, "entries": kept}))
    assert serving.main(argv + ["--recover"]) == 0
    entries = json.loads((out / "summary.json").read_text())["entries"]
    assert [e["config"] for e in entries] == ["production", "ams"] and "recovered" not in entries[0]
    back = entries[1]
    assert "recovered" in back and back["compactions"] is None and back["error"] is None
    for key in ("completed", "output_throughput", "p99_itl_ms", "total_output_tokens", "peak_running_poll",
                "server_cmd", "bench_cmd"):
        assert back[key] == lost[key], key
    assert serving.main(argv + ["--recover"]) == 2              # nothing left to recover
    with pytest.raises(SystemExit):
        serving.main(argv[:argv.index("--out")] + ["--recover"])


def test_driver_survives_a_server_that_does_not_start(tmp_path, capsys):
    bad = tmp_path / "bad-python"
    bad.write_text("#!/bin/sh\necho 'CUDA out of memory' >&2\nexit 1\n")
    bad.chmod(0o755)
    out = tmp_path / "out"
    assert serving.main(["--model-path", "x", "--python", str(bad), "--configs", "production", "--workloads",
                         "short_chat", "--repeats", "1", "--port", str(free_port()), "--out", str(out),
                         "--startup-timeout", "20"]) == 0
    e = json.loads((out / "summary.json").read_text())["entries"][0]
    assert "CUDA out of memory" in e["error"] and e["completed"] is None and e["output_throughput"] is None
    assert (out / "summary.md").exists()


@pytest.mark.skipif(os.environ.get("SERVING_E2E") != "1" or SERVING_SRC is None,
                    reason="SERVING_E2E=1 runs the real sglang.bench_serving (~40 s a run to import SGLang)")
def test_real_bench_serving_against_the_stand_in(stand_ins, tmp_path):
    fake_python, _ = stand_ins
    model = smodel.add_tokenizer(tmp_path / "tok", vocab_size=1000)
    out = tmp_path / "out"
    assert serving.main(["--model-path", str(model), "--python", fake_python, "--workloads", "short_chat",
                         "--configs", "ams", "--repeats", "1", "--scale", "0.05", "--count-scale", "0.125",
                         "--port", str(free_port()),
                         "--server-args", "--token-ms 2 --decode-log-s 0.05 --max-total-tokens 200",
                         "--policy-args", "--kv-budget 4 --kv-interval 2", "--out", str(out)]) == 0
    e = json.loads((out / "summary.json").read_text())["entries"][0]
    assert e["error"] is None and e["completed"] == 26 and e["output_throughput"] > 0
    assert e["median_tpot_ms"] > 0 and e["p99_itl_ms"] > 0 and e["mean_ttft_ms"] > 0
    assert e["compactions"] == 27 * 10 and e["peak_running"] >= 1      # + bench_serving's warm-up request
    assert e["full_load_decode_tok_s"] > 0 and e["full_load_decode_samples"] >= 1     # the fake logs its rate
    assert e["p99_itl_after_first_ms"] > 0 and e["stalls_later"] >= 0     # --output-details reached the entry
    assert "itls" not in rep.read_bench_output(Path(e["run_dir"]) / "bench.jsonl")     # and was stripped


def test_a_run_that_would_pass_the_deadline_is_not_started():
    done = [entry("shared_prefix", "production", 1, 8700, 30, server_ready_s=73.0, wall_s=90.0),
            entry("short_chat", "production", 1, 13000, 200, server_ready_s=65.0, wall_s=300.0),
            entry("heavy_pressure", "production", 1, 5896, 72, server_ready_s=87.1, wall_s=671.4),
            entry("heavy_pressure", "ams", 1, 14998, 89, server_ready_s=74.1, wall_s=276.0)]
    # a second shared_prefix production run (163 s, as the first) started after 170 s would end at 333 s: past a
    # 315 s deadline less the 20 s margin
    assert not serving.fits(done, "shared_prefix", "production", elapsed=170, deadline=315)
    assert serving.fits(done, "shared_prefix", "production", elapsed=100, deadline=315)
    assert serving.fits(done, "shared_prefix", "production", elapsed=10_000, deadline=None)
    assert serving.fits(done, "long_prompts", "production", elapsed=300, deadline=315)   # nothing to judge by
    assert not serving.fits(done, "short_chat", "production", elapsed=0, deadline=300)   # by its own run: 365 s
    assert serving.fits(done, "short_chat", "ams", elapsed=0, deadline=300)    # short_chat AMS has not run
    # a config not run yet starts whatever the others took (heavy AMS after production's 758 s) ...
    assert serving.fits(done[:3], "heavy_pressure", "ams", elapsed=770, deadline=1485)
    # ... and one that ran is judged by its own longest run (AMS 350 s; production 758 s)
    assert not serving.fits(done, "heavy_pressure", "production", elapsed=770, deadline=1485)
    assert serving.fits(done, "heavy_pressure", "ams", elapsed=1100, deadline=1485)
    assert not serving.fits(done, "heavy_pressure", "ams", elapsed=1200, deadline=1485)
