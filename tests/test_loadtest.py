"""loadtest/ on the CPU: compare.py's arguments and run plan, the report from recorded CSVs, the locustfile's
request builders and answer parsing, the Prometheus parser, and (against loadtest/fake_server.py, a stand-in
for sglang.launch_server) a real Locust run and a whole compare.py run. No timings are asserted."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOADTEST = ROOT / "loadtest"


def _import_package():
    """The `loadtest` package by path: the repo root stays off sys.path (its kernels/ would shadow SGLang's)."""
    if "loadtest" not in sys.modules:
        spec = importlib.util.spec_from_file_location("loadtest", LOADTEST / "__init__.py",
                                                      submodule_search_locations=[str(LOADTEST)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["loadtest"] = module
        spec.loader.exec_module(module)


_import_package()
from loadtest import compare, metrics, report, servers  # noqa: E402
from loadtest import workloads as wl  # noqa: E402

assert Path(metrics.__file__).parent == LOADTEST

DATA = wl.DEFAULT_DATA
PLAN_OUT = str(ROOT / "build" / "lt-plan")    # plans only: nothing is written there
if DATA is None or not (DATA / "gsm8k").exists():
    DATA = ROOT / ".gpu" / "data"
HAS_DATA = (DATA / "gsm8k").exists() or (DATA / "gsm8k_train.jsonl").exists()
needs_data = pytest.mark.skipif(not HAS_DATA, reason="needs the GSM8K and essay data")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- compare.py: arguments and plan -------------------------------------------------------------------------
def dry_run(capsys, *extra) -> str:
    assert compare.main(["--model-path", "models/llama-8b", "--dry-run", "--out", PLAN_OUT, *extra]) == 0
    return capsys.readouterr().out


def plan_of(*extra) -> list[dict]:
    return compare.plan(compare.parse_args(["--model-path", "m", "--out", PLAN_OUT, *extra]))


def server_flags(run: dict) -> list[str]:
    cmd = run["server_cmd"]
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    return cmd[3:]


def has_seq(cmd: list[str], *seq: str) -> bool:
    return any(cmd[i:i + len(seq)] == list(seq) for i in range(len(cmd)))


def test_dry_run_prints_every_configuration_and_budget(capsys):
    out = dry_run(capsys, "--load-format", "dummy", "--max-total-tokens", "32768,65536", "--output-len", "4096",
                  "--python", "/opt/py/bin/python3")
    assert "12 runs" in out
    servers_ = [l.split("server: ", 1)[1] for l in out.splitlines() if l.strip().startswith("server:")]
    locusts = [l.split("locust: ", 1)[1] for l in out.splitlines() if l.strip().startswith("locust:")]
    assert len(servers_) == len(locusts) == 12
    for pressure in ("32768", "65536"):
        runs = {l.split()[1]: s for l, s in zip([l for l in out.splitlines() if l.startswith("[")], servers_)
                if l.split()[1].endswith("mtt" + pressure)}
        assert set(runs) == {f"{c}_mtt{pressure}" for c in
                             ("sglang", "full", "topk-b1024", "topk-b2048", "ams-b1024", "ams-b2048")}
        for name, line in runs.items():
            cmd = shlex.split(line)
            assert "/opt/py/bin/python3" in cmd and has_seq(cmd, "--max-total-tokens", pressure)
            assert has_seq(cmd, "--load-format", "dummy") and "--enable-metrics" in cmd
            assert has_seq(cmd, "--model-path", "models/llama-8b")
            assert "--incremental-streaming-output" in cmd              # streamed /generate: deltas, not O(n^2)
        base = shlex.split(runs[f"sglang_mtt{pressure}"])
        assert base[0] == "SGLANG_PLUGINS=no-plugins"                # production SGLang, plugin not loaded
        assert "--kv-policy" not in base and "--attention-backend" not in base
        full = shlex.split(runs[f"full_mtt{pressure}"])
        assert has_seq(full, "--attention-backend", "flashinfer") and has_seq(full, "--kv-policy", "none")
        assert "--kv-budget" not in full
        for policy in ("topk", "ams"):
            for budget in ("1024", "2048"):                               # 25% and 50% of 4096
                cmd = shlex.split(runs[f"{policy}-b{budget}_mtt{pressure}"])
                assert has_seq(cmd, "--attention-backend", "flashinfer")
                assert has_seq(cmd, "--kv-policy", policy, "--kv-budget", budget)
    for line in locusts:
        cmd = shlex.split(line)
        assert has_seq(cmd, "-m", "locust") and "--headless" in cmd and cmd[-1] == "GenerateUser"
        assert has_seq(cmd, "-n", "64") and has_seq(cmd, "-u", "32") and "--stream" in cmd
        assert has_seq(cmd, "--workload", "reasoning") and has_seq(cmd, "--output-len", "4096")
        assert cmd[cmd.index("-f") + 1].endswith("loadtest/locustfile.py")
    assert f"output folder: {PLAN_OUT}" in out


def test_plan_options_reach_the_right_commands():
    runs = plan_of("--configs", "sglang,full,ams", "--mem-fraction-static", "0.6,0.85", "--output-len", "2k-8k",
                   "--kv-interval", "256", "--kv-scorer", "tova", "--server-args", "--context-length 16384",
                   "--policy-args", "--ams-prompt-cache cached", "--endpoint", "chat", "--no-stream",
                   "--users", "5", "--requests", "9", "--workload", "fewshot")
    assert [r["run"] for r in runs] == ["sglang_mfs0.6", "full_mfs0.6", "ams-b2048_mfs0.6", "ams-b4096_mfs0.6",
                                        "sglang_mfs0.85", "full_mfs0.85", "ams-b2048_mfs0.85", "ams-b4096_mfs0.85"]
    for r in runs:
        flags, loc = server_flags(r), r["locust_cmd"]
        assert has_seq(flags, "--mem-fraction-static", "0.6" if r["pressure"] == 0.6 else "0.85")
        assert has_seq(flags, "--context-length", "16384")                    # every server
        assert "--incremental-streaming-output" not in flags                   # chat streams deltas anyway
        assert has_seq(flags, "--ams-prompt-cache", "cached") == (r["config"] != "sglang")
        assert has_seq(flags, "--kv-interval", "256") == (r["policy"] == "ams")
        assert has_seq(flags, "--kv-scorer", "tova") == (r["policy"] == "ams")
        assert loc[-1] == "ChatUser" and "--stream" not in loc and has_seq(loc, "-u", "5", "-r", "5")
        assert has_seq(loc, "--workload", "fewshot") and has_seq(loc, "-n", "9")
        assert r["axis"] == "mem_fraction_static"
    assert {r["budget"] for r in runs if r["policy"] == "ams"} == {2048, 4096}   # fractions of the MAX output


def test_plan_budgets_and_dummy_tokenizer():
    runs = plan_of("--configs", "topk", "--budgets", "512,768", "--skip-tokenizer-init", "--max-total-tokens", "1000")
    assert [r["config"] for r in runs] == ["topk-b512", "topk-b768"]
    for r in runs:
        assert "--skip-tokenizer-init" in server_flags(r) and "--random-ids" in r["locust_cmd"]
    assert compare.parse_args(["--model-path", "m"]).max_total_tokens == [32768, 65536, 131072]   # default sweep
    assert all("--incremental-streaming-output" not in server_flags(r)
               for r in plan_of("--no-incremental-stream") + plan_of("--no-stream"))


@pytest.mark.parametrize("argv, message", [
    (["--dry-run"], "--model-path is required"),
    (["--model-path", "m", "--configs", "sglang,h2o"], "unknown configuration h2o"),
    (["--model-path", "m", "--output-len", "100"], "below 37"),                      # 25% of 100 = 25
    (["--model-path", "m", "--max-total-tokens", "1", "--mem-fraction-static", "0.5"], "not allowed with"),
    (["--model-path", "m", "--skip-tokenizer-init", "--endpoint", "chat"], "chat"),
    (["--model-path", "m", "--output-len", "8k-2k"], "MIN > MAX"),
    (["--model-path", "m", "--max-total-tokens", "a,b"], "comma-separated list of int"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        compare.parse_args(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_small_budgets_are_fine_without_policies():
    args = compare.parse_args(["--model-path", "m", "--output-len", "100", "--configs", "sglang,full"])
    assert [r["config"] for r in compare.plan(args)][:2] == ["sglang", "full"]


def test_parse_range():
    assert wl.parse_range("4096") == (4096, 4096)
    assert wl.parse_range("2048-8192") == (2048, 8192)
    assert wl.parse_range("8k-32k") == (8192, 32768)
    for bad in ("", "0", "5-", "9-3", "a-b", "1-2-3"):
        with pytest.raises(ValueError):
            wl.parse_range(bad)


# --- report from recorded CSVs ------------------------------------------------------------------------------
def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def synth_run(folder: Path, config: str, policy: str, budget, pressure: int, tokens: int, errors: int = 0):
    """A recorded run: 4 requests of `tokens` output tokens each, 10 s apart in all, plus polls."""
    run = f"{config}_mtt{pressure}"
    d = folder / "runs" / run
    write_rows(d / "run.csv", [dict(run=run, config=config, policy=policy, budget=budget or "",
                                    axis="max_total_tokens", pressure=pressure, server_ok=1, locust_rc=0,
                                    wall_s=11, compactions=7 if policy in ("topk", "ams") else 0,
                                    tokens_freed=900 if policy in ("topk", "ams") else 0,
                                    kept_ratio=0.4 if policy in ("topk", "ams") else "")])
    rows = []
    for i in range(4 + errors):
        ok = i < 4
        rows.append(dict(t_start=1000 + i, t_end=1010 if i == 3 else 1005 + i, endpoint="generate",
                         workload="reasoning", stream=1, prompt_tokens=50 if ok else "", output_tokens=tokens if ok
                         else 0, cached_tokens=10 if ok else "", max_tokens=tokens, ttft_ms=100 * (i + 1) if ok
                         else "", tpot_ms=10 + i if ok else "", latency_ms=5000 if ok else 3, ok=int(ok),
                         status=200 if ok else 400, error="" if ok else "HTTP 400: too long", correct=""))
    write_rows(d / "requests.csv", rows)
    write_rows(d / "running.csv", [dict(t=1000 + i, running=r, queued=q, token_usage=u)
                                   for i, (r, q, u) in enumerate([(0, 4, 0.1), (3, 1, 0.9), (2, 0, 0.5)])])
    return run


@pytest.fixture
def recorded(tmp_path):
    folder = tmp_path / "rec"
    runs = [synth_run(folder, "sglang", "", None, p, 100) for p in (1024, 4096)]
    runs += [synth_run(folder, "ams-b64", "ams", 64, p, 200, errors=1) for p in (1024, 4096)]
    (folder / "plan.json").write_text(json.dumps([{"run": r} for r in sorted(runs, key=lambda r: r[-4:])]))
    return folder


def test_summarize_requests_numbers():
    rows = [dict(t_start=0, t_end=10, ok=1, output_tokens=100, prompt_tokens=20, cached_tokens=5, ttft_ms=100,
                 tpot_ms=4, latency_ms=10000, correct=1),
            dict(t_start=2, t_end=6, ok="1", output_tokens="50", prompt_tokens="20", cached_tokens="15",
                 ttft_ms="300", tpot_ms="6", latency_ms="4000", correct="0"),
            dict(t_start=3, t_end=4, ok=0, output_tokens=0, error="HTTP 500", ttft_ms="", tpot_ms="")]
    s = metrics.summarize_requests(rows)
    assert (s["requests"], s["ok"], s["errors"]) == (3, 2, 1)
    assert s["duration_s"] == 10 and s["out_tok_s"] == 15.0 and s["req_s"] == 0.2
    assert s["ttft_p50_ms"] == 200 and s["ttft_p99_ms"] == pytest.approx(298)
    assert s["tpot_p50_ms"] == 5 and s["latency_p50_s"] == 7 and s["accuracy"] == 0.5
    assert s["cache_hit"] == 0.5 and s["output_tokens_mean"] == 75
    assert metrics.summarize_requests([])["out_tok_s"] == 0.0
    assert metrics.percentile([], 50) is None and metrics.percentile([3, None, 1], 100) == 3


def test_report_from_recorded_runs(recorded, tmp_path, capsys):
    out = tmp_path / "regen"
    assert compare.main(["--from-csv", str(recorded), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = [l.split() for l in printed.splitlines()]
    body = [r for r in table if r and r[0] in ("sglang", "ams-b64")]
    assert [(r[0], r[2]) for r in body] == [("sglang", "1024"), ("ams-b64", "1024"), ("sglang", "4096"),
                                            ("ams-b64", "4096")]                      # plan order
    header = table[0]
    for r in body:
        row = dict(zip(header, r))
        assert row["ok"] == "4" and row["errors"] == ("1" if r[0] == "ams-b64" else "0")
        assert float(row["out_tok_s"]) == (40.0 if r[0] == "sglang" else 80.0)    # 4 x tokens / 10 s
        assert row["peak_running"] == "3"
        assert row["compactions"] == ("7" if r[0] == "ams-b64" else "0")
    with (out / "summary.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == report.SUMMARY_FIELDS
    assert len(rows) == 4 and rows[1]["run"] == "ams-b64_mtt1024" and rows[1]["tokens_freed"] == "900"
    assert float(rows[0]["ttft_p50_ms"]) == 250 and rows[0]["peak_queued"] == "4"
    for name in report.PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    meta = json.loads(next(out.glob("loadtest-regenerated-*.json")).read_text())
    assert {"device", "date", "commit", "command", "rows"} <= set(meta)
    assert "--from-csv" in meta["command"] and meta["source"] == str(recorded) and len(meta["rows"]) == 4


def test_report_from_summary_csv_only(recorded, tmp_path, capsys):
    compare.main(["--from-csv", str(recorded), "--out", str(tmp_path / "a")])
    only = tmp_path / "only"
    only.mkdir()
    (only / "summary.csv").write_bytes((tmp_path / "a" / "summary.csv").read_bytes())
    capsys.readouterr()
    assert compare.main(["--from-csv", str(only)]) == 0             # writes next to the CSV
    assert "ams-b64" in capsys.readouterr().out
    assert all((only / p).stat().st_size > 0 for p in report.PLOTS)
    with pytest.raises(FileNotFoundError):
        report.collect(tmp_path / "empty")


# --- workloads: prompts and request bodies ------------------------------------------------------------------
class WordTokenizer:
    """Tokenizer stand-in: one token per whitespace-separated word."""

    def __init__(self):
        self.words: list[str] = []
        self.ids: dict[str, int] = {}

    def encode(self, text):
        out = []
        for w in text.split():
            if w not in self.ids:
                self.ids[w] = len(self.words)
                self.words.append(w)
            out.append(self.ids[w])
        return out

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


@needs_data
@pytest.mark.parametrize("tokenizer", [None, WordTokenizer()], ids=["chars", "words"])
def test_long_prompts_are_within_range(tokenizer):
    settings = wl.Settings(workload="long", prompt_len=(2000, 6000), output_len=(16, 32))
    w = wl.Workload(settings, DATA, tokenizer)
    rng = random.Random(3)
    count = tokenizer.encode if tokenizer else (lambda t: [0] * round(len(t) / 4))
    for _ in range(20):
        p = w.sample(rng)
        n = len(count(p.text))
        assert 2000 * 0.97 <= n <= 6000 * 1.03, n           # the needle and question cost a few tokens
        assert p.approx_tokens == n and 16 <= p.max_tokens <= 32 and not p.ignore_eos
        assert f"magic number is {p.expect}." in p.text and p.text.endswith("Answer:")
    assert wl.check_answer(p, f"The number is {p.expect}.") and not wl.check_answer(p, "I do not know")


@needs_data
def test_fewshot_prompts_share_the_prefix_and_reasoning_is_long():
    w = wl.Workload(wl.Settings(workload="fewshot"), DATA)
    rng = random.Random(0)
    prompts = [w.sample(rng) for _ in range(10)]
    assert w.prefix.count("Question:") == 8 and w.prefix.count("####") == 8
    assert all(p.text.startswith(w.prefix) and p.text.endswith("\nAnswer:") for p in prompts)
    assert len({p.text for p in prompts}) > 1 and all(p.max_tokens == 256 for p in prompts)
    p = prompts[0]
    assert wl.check_answer(p, f"She pays 3 * 4 = 12.\n#### {p.expect}\n\nQuestion: next") is True
    assert wl.check_answer(p, "#### 123456789") is False
    r = wl.Workload(wl.Settings(workload="reasoning", output_len=(2048, 8192)), DATA)
    for _ in range(10):
        p = r.sample(rng)
        assert 2048 <= p.max_tokens <= 8192 and p.ignore_eos and p.expect is None
        assert p.text.startswith("Question: ") and p.approx_tokens < 200


def test_data_folder_layouts(tmp_path):
    flat = tmp_path / "flat"
    (flat / "essays").mkdir(parents=True)
    (flat / "essays" / "a.txt").write_text("One essay. " * 50)
    row = json.dumps({"question": "1+1?", "answer": "2\n#### 2"})
    (flat / "gsm8k_train.jsonl").write_text((row + "\n") * 9)
    (flat / "gsm8k_test.jsonl").write_text(row + "\n")
    train, test = wl.load_gsm8k(flat)
    assert len(train) == 9 and test[0]["question"] == "1+1?"
    assert wl.load_essays(flat).startswith("One essay.")
    long = wl.Workload(wl.Settings(workload="long", prompt_len=(400, 400)), flat).sample(random.Random(0))
    assert 380 <= long.approx_tokens <= 420                    # the short corpus wraps around
    with pytest.raises(FileNotFoundError):
        wl.load_gsm8k(tmp_path / "missing")


def test_random_id_prompts_need_no_data():
    rng = random.Random(0)
    for workload, lo, hi in (("reasoning", 48, 128), ("long", 3000, 3000), ("fewshot", 1248, 1248)):
        w = wl.Workload(wl.Settings(workload=workload, random_ids=True, prompt_len=(3000, 3000), vocab_size=1000),
                        data=None)
        p = w.sample(rng)
        assert p.text is None and lo <= len(p.ids) <= hi and p.approx_tokens == len(p.ids)
        assert all(100 <= i < 1000 for i in p.ids)
    a, b = wl.Workload(wl.Settings(workload="fewshot", random_ids=True), None), \
        wl.Workload(wl.Settings(workload="fewshot", random_ids=True), None)
    assert a.sample(rng).ids[:1200] == b.sample(rng).ids[:1200]        # same prefix in every Locust process


def test_request_bodies_for_each_endpoint():
    text = wl.Prompt("reasoning", 4096, True, text="Question: 2+2?\nAnswer:")
    ids = wl.Prompt("long", 32, False, ids=[101, 102, 103])
    override = {"kv_policy": {"policy": "ams", "budget": 512}}

    path, body = wl.build_request("generate", text, stream=True, custom_params=override)
    assert path == "/generate" and body["text"] == text.text and body["stream"] is True
    assert body["sampling_params"] == {"max_new_tokens": 4096, "temperature": 0.0, "ignore_eos": True,
                                       "custom_params": override}
    path, body = wl.build_request("generate", ids)
    assert body["input_ids"] == [101, 102, 103] and "text" not in body and body["stream"] is False
    assert "custom_params" not in body["sampling_params"]

    path, body = wl.build_request("completions", text, stream=True, model="m")
    assert path == "/v1/completions" and body["prompt"] == text.text and body["max_tokens"] == 4096
    assert body["ignore_eos"] is True and body["model"] == "m" and body["stream_options"] == {"include_usage": True}
    path, body = wl.build_request("completions", ids, custom_params=override)
    assert body["prompt"] == [101, 102, 103] and "stream_options" not in body and body["custom_params"] == override

    path, body = wl.build_request("chat", text, temperature=0.7)
    assert path == "/v1/chat/completions" and body["messages"] == [{"role": "user", "content": text.text}]
    assert body["temperature"] == 0.7 and body["max_tokens"] == 4096 and "prompt" not in body
    json.dumps(body)
    with pytest.raises(ValueError, match="text prompts"):
        wl.build_request("chat", ids)
    with pytest.raises(ValueError):
        wl.build_request("embeddings", text)


def test_replies_whole_and_streamed():
    r = wl.Reply.from_json("generate", {"text": "abc", "meta_info": {"prompt_tokens": 7, "completion_tokens": 3,
                                                                     "cached_tokens": 2}})
    assert (r.text, r.tokens, r.prompt_tokens, r.cached_tokens) == ("abc", 3, 7, 2)
    r = wl.Reply.from_json("chat", {"choices": [{"message": {"content": "hi"}}],
                                    "usage": {"prompt_tokens": 5, "completion_tokens": 1}})
    assert (r.text, r.tokens, r.prompt_tokens) == ("hi", 1, 5)

    stream = wl.Reply("generate")                                # cumulative text, counts in meta_info
    for i, t in enumerate(["a", "ab", "abc"], 1):
        assert stream.feed({"text": t, "meta_info": {"completion_tokens": i}})
    assert (stream.text, stream.tokens, stream.chunks) == ("abc", 3, 3)
    for cumulative in (True, False):                             # SGLang's default, --incremental-streaming-output
        stream = wl.Reply("generate")
        for i in range(1, 4):
            chunk = {"text": " tok" * i if cumulative else " tok", "output_ids": [5] * (i if cumulative else 1),
                     "meta_info": {"completion_tokens": i}}
            assert stream.feed(chunk)
        assert stream.text == " tok tok tok" and stream.tokens == 3
    ids_only = wl.Reply("generate")                              # --skip-tokenizer-init: ids, no text
    assert ids_only.feed({"output_ids": [9], "meta_info": {"completion_tokens": 1}}) and ids_only.text is None
    stream = wl.Reply("completions")                             # deltas, then a usage-only chunk
    for t in ["x", "y"]:
        assert stream.feed(wl.sse_data(f'data: {json.dumps({"choices": [{"text": t}], "usage": None})}'))
    assert stream.tokens == 2                                    # no usage yet: one per chunk
    assert not stream.feed({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 5}})
    assert (stream.text, stream.tokens, stream.prompt_tokens) == ("xy", 5, 4)
    chat = wl.Reply("chat")
    chat.feed({"choices": [{"delta": {"role": "assistant"}}]})
    chat.feed({"choices": [{"delta": {"content": "ok"}}]})
    assert chat.text == "ok" and chat.chunks == 2
    assert wl.sse_data(b"data: [DONE]") is None and wl.sse_data("") is None and wl.sse_data(": ping") is None
    assert wl.sse_data(b'data: {"a": 1}') == {"a": 1}


# --- Prometheus text ----------------------------------------------------------------------------------------
SAMPLE = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="meta-llama/Llama-3.1-8B",engine_type="unified",tp_rank="0"} 12.0
sglang:num_running_reqs{model_name="meta-llama/Llama-3.1-8B",engine_type="unified",tp_rank="1"} 3.0
sglang:num_queue_reqs{model_name="a \\"quoted\\", spaced {name}"} 5
sglang:token_usage 0.93 1712345678000
# TYPE sglang_ams:compactions_total counter
sglang_ams:compactions_total{model_name="m"} 1234.0
sglang_ams:compactions_created{model_name="m"} 1.712e+09
sglang_ams:tokens_freed_total{model_name="m"} 5.5e6
sglang_ams:kept_ratio{model_name="m"} 0.37
sglang:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 40.0
sglang:e2e_request_latency_seconds_sum{model_name="m"} 81.5
sglang:gen_throughput{model_name="m"} NaN
this line is not a sample
sglang:broken{model_name="m" 3
"""


def test_parse_prometheus():
    v = metrics.parse_prometheus(SAMPLE)
    assert v[metrics.RUNNING] == 15.0                           # summed over label sets (ranks)
    assert v[metrics.QUEUED] == 5 and v[metrics.TOKEN_USAGE] == 0.93
    assert v["sglang_ams:compactions_total"] == 1234 and v["sglang_ams:tokens_freed_total"] == 5.5e6
    assert v["sglang_ams:kept_ratio"] == 0.37
    assert v["sglang:e2e_request_latency_seconds_bucket"] == 40 and v["sglang:e2e_request_latency_seconds_sum"] == 81.5
    assert "this" not in v and "sglang:broken" not in v
    before = metrics.parse_prometheus("sglang_ams:compactions_total 1000\n")
    assert metrics.counter_deltas(before, v) == {"sglang_ams:compactions_total": 234.0,
                                                  "sglang_ams:tokens_freed_total": 5.5e6,
                                                  "sglang_ams:compaction_steps_total": 0.0,      # not exported
                                                  "sglang_ams:host_seconds_total": 0.0}
    assert metrics.counter_deltas({}, {}) == {k: 0.0 for k in metrics.AMS_COUNTERS}
    assert metrics.parse_prometheus("") == {}


# --- against the stand-in server ----------------------------------------------------------------------------
@pytest.fixture
def fake_python(tmp_path):
    """An executable that compare.py can use as --python: runs loadtest/fake_server.py instead."""
    path = tmp_path / "fake-python"
    path.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(LOADTEST / 'fake_server.py'))} "
                    '"$@"\n')
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def fake_server(fake_python, tmp_path):
    port = free_port()
    cmd = servers.server_command(fake_python, "fake", port, ["--token-ms", "50", "--context-length", "3000"])
    server = servers.Server(cmd, tmp_path / "fake.log", port=port)
    server.start()
    assert server.wait_healthy(30)
    yield server
    server.stop()
    assert not server.alive()


def run_locust(server, tmp_path, name, *extra):
    record = tmp_path / f"{name}.csv"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOADTEST / "locustfile.py"), "--headless", "-u", "3", "-r", "3",
           "-H", server.url, "--only-summary", "--csv", str(tmp_path / name), "-t", "120",
           "--record", str(record), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    rows = list(csv.DictReader(record.open())) if record.exists() else []
    return proc, rows


@needs_data
def test_locust_against_the_stand_in(fake_server, tmp_path):
    proc, rows = run_locust(fake_server, tmp_path, "stream", "--workload", "fewshot", "--output-len", "20", "--stream",
                            "-n", "9", "--data-dir", str(DATA), "GenerateUser", "CompletionsUser", "ChatUser")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(rows) == 9, proc.stderr[-2000:]
    assert {"t_start", "t_end", "ttft_ms", "tpot_ms", "latency_ms", "output_tokens", "error"} <= set(rows[0])
    assert {r["endpoint"] for r in rows} == {"generate", "completions", "chat"}
    for r in rows:
        assert r["ok"] == "1" and r["output_tokens"] == "20" and r["workload"] == "fewshot" and r["stream"] == "1"
        assert int(r["prompt_tokens"]) > 500 and r["correct"] == "0"          # the stand-in answers " tok tok ..."
        # TTFT is taken at the first chunk: the other 19 tokens (>= 50 ms apart on the server) come after it;
        # the 25% margin is for the client's own scheduling delays, not a timing target
        assert float(r["latency_ms"]) - float(r["ttft_ms"]) >= 0.75 * 19 * 50
        assert float(r["tpot_ms"]) >= 0.75 * 50 and float(r["ttft_ms"]) < float(r["latency_ms"]) / 2
    stats = {(s["Type"], s["Name"]) for s in csv.DictReader((tmp_path / "stream_stats.csv").open())}
    assert ("TTFT", "/v1/chat/completions fewshot stream") in stats and ("POST", "/generate fewshot stream") in stats
    assert ("TPOT", "/v1/completions fewshot stream") in stats
    assert "[loadtest] 9/9 ok" in proc.stdout + proc.stderr

    # not streamed, random ids; a request over the stand-in's context length (3000) is an error row, not a crash
    proc, rows = run_locust(fake_server, tmp_path, "whole", "--workload", "long", "--random-ids", "--prompt-len",
                            "2900-3100", "--output-len", "10", "-n", "12", "CompletionsUser")
    assert len(rows) == 12, proc.stderr[-2000:]
    assert all(r["stream"] == "0" and r["ttft_ms"] == "" for r in rows)
    good = [r for r in rows if r["ok"] == "1" and r["output_tokens"] == "10"]
    bad = [r for r in rows if r["ok"] == "0"]
    assert good and bad and all(r["error"].startswith("HTTP 400") for r in bad)
    assert proc.returncode == 1                                  # Locust's exit code when requests failed


def test_locust_stops_on_a_workload_error(fake_server, tmp_path):
    proc, rows = run_locust(fake_server, tmp_path, "chat-ids", "--random-ids", "-n", "3", "ChatUser")
    assert proc.returncode == 2 and rows == []
    assert "needs text prompts" in proc.stderr
    proc, rows = run_locust(fake_server, tmp_path, "no-data", "--workload", "fewshot", "--data-dir",
                            str(tmp_path / "nowhere"), "-n", "3", "GenerateUser")
    assert proc.returncode == 2 and "cannot prepare the workload" in proc.stderr


def test_server_stop_kills_the_process_group(tmp_path):
    port = free_port()
    server = servers.Server(["sh", "-c", "sleep 300 & sleep 300 & wait"], tmp_path / "s.log", port=port)
    server.start()
    time.sleep(0.3)
    pgid = server.proc.pid
    server.stop(grace=5)
    assert not server.alive()
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


def test_compare_end_to_end_with_the_stand_in(fake_python, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--model-path", "fake", "--python", fake_python, "--configs", "sglang,ams", "--budgets", "64",
            "--kv-interval", "32", "--max-total-tokens", "600", "--users", "4", "--requests", "8",
            "--output-len", "200", "--port", str(free_port()), "--out", str(out), "--poll-interval", "0.2",
            "--server-args", "--token-ms 5", "--skip-tokenizer-init"]
    assert compare.main(argv) == 0
    printed = capsys.readouterr().out
    assert "[1/2] sglang_mtt600: starting server" in printed and "[2/2] ams-b64_mtt600: stopping server" in printed
    rows = {r["run"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert set(rows) == {"sglang_mtt600", "ams-b64_mtt600"}
    for r in rows.values():
        assert r["server_ok"] == "1" and r["ok"] == "8" and r["errors"] == "0" and r["locust_rc"] == "0"
        assert float(r["out_tok_s"]) > 0 and float(r["peak_running"]) >= 1
    assert float(rows["ams-b64_mtt600"]["compactions"]) > 0 and rows["sglang_mtt600"]["compactions"] == "0"
    # the stand-in's 600-token pool holds at most 2 full requests (248-328 tokens) but 6 compressed ones (96)
    assert float(rows["sglang_mtt600"]["peak_running"]) <= 2 < float(rows["ams-b64_mtt600"]["peak_running"])
    for run in rows:
        d = out / "runs" / run
        assert (d / "server.log").exists() and (d / "locust_stats.csv").exists()
        assert len(list(csv.DictReader((d / "requests.csv").open()))) == 8
        assert len(list(csv.DictReader((d / "running.csv").open()))) >= 1
    assert all((out / p).stat().st_size > 0 for p in report.PLOTS)
    meta = json.loads(next(out.glob("loadtest-*.json")).read_text())
    assert len(meta["plan"]) == 2 and meta["settings"]["requests"] == 8 and "--python" in meta["command"]
    # the report can be rebuilt from what was recorded
    assert compare.main(["--from-csv", str(out), "--out", str(tmp_path / "again")]) == 0
    again = {r["run"]: r for r in csv.DictReader((tmp_path / "again" / "summary.csv").open())}
    assert again == rows
    regen = json.loads(next((tmp_path / "again").glob("loadtest-regenerated-*.json")).read_text())
    assert regen["recorded"]["command"] == meta["command"] and regen["plan"] == meta["plan"]


def test_compare_survives_a_server_that_does_not_start(tmp_path, capsys):
    bad = tmp_path / "bad-python"
    bad.write_text("#!/bin/sh\necho 'CUDA out of memory' >&2\nexit 1\n")
    bad.chmod(0o755)
    out = tmp_path / "out"
    assert compare.main(["--model-path", "x", "--python", str(bad), "--configs", "full", "--max-total-tokens", "1000",
                         "--port", str(free_port()), "--out", str(out), "--startup-timeout", "20"]) == 0
    assert "CUDA out of memory" in capsys.readouterr().out
    row = next(csv.DictReader((out / "summary.csv").open()))
    assert row["server_ok"] == "0" and row["requests"] == "0"
