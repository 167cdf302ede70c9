r"""Locust users for an SGLang server: native /generate and OpenAI /v1/completions, /v1/chat/completions.

    locust -f loadtest/locustfile.py --headless -u 32 -r 32 -H http://127.0.0.1:30000 GenerateUser \
        --workload reasoning --output-len 4096 --stream -n 64 --record requests.csv

User classes (name one or more on the command line; with none, all three run):
    GenerateUser  POST /generate        CompletionsUser  POST /v1/completions   ChatUser  POST /v1/chat/completions
Options (each also read from the environment variable in brackets):
    --workload reasoning|long|fewshot [LOCUST_WORKLOAD]   see workloads.py
    --stream [LOCUST_STREAM=1]            stream the answers; TTFT is taken at the first chunk carrying output
    --output-len N|MIN-MAX [LOCUST_OUTPUT_LEN]   output tokens (default per workload: 2048-8192, 32, 256)
    --prompt-len MIN-MAX [LOCUST_PROMPT_LEN]     long-context prompt tokens (8192-32768)
    --ignore-eos auto|true|false          (auto: true for reasoning)
    --data-dir DIR [LOCUST_DATA_DIR]      with gsm8k/ and niah_paulgraham_essays/essays/ (default ../shared/data
                                          beside the checkout, or $SGLANG_AMS_DATA)
    --tokenizer PATH                      HF tokenizer for exact prompt lengths (default: 4 characters a token)
    --random-ids                          send random token ids (dummy weights, --skip-tokenizer-init)
    --kv-override JSON                    per-request policy override, e.g. '{"policy": "ams", "budget": 512}'
    -n/--iterations N [LOCUST_ITERATIONS] stop after N requests in all (0: run until -t or Ctrl-C)
    --record PATH [LOCUST_RECORD]         append one CSV row per request (what compare.py reads)
Every request fires a Locust request event (response_length = output tokens), and streamed ones also fire
"TTFT" and "TPOT" events (milliseconds), so Locust's tables and --csv files show them next to the latency.
"""
from __future__ import annotations

import csv
import json
import random
import sys
import time
from pathlib import Path

import gevent
import requests
from locust import User, constant, events, task
from locust.exception import StopUser

if __package__ in (None, ""):           # run as a script (or loaded by Locust): make `loadtest` importable;
    sys.path.append(str(Path(__file__).resolve().parent.parent))   # appended, so installed packages still win

from loadtest.metrics import summarize_requests  # noqa: E402
from loadtest.workloads import (DEFAULT_DATA, DEFAULT_PROMPT, ENDPOINTS, PATHS, WORKLOADS,  # noqa: E402
                                Reply, Settings, Workload, build_request, check_answer, parse_range, sse_data)

RECORD_FIELDS = ("t_start", "t_end", "endpoint", "workload", "stream", "prompt_tokens", "output_tokens",
                 "cached_tokens", "max_tokens", "ttft_ms", "tpot_ms", "latency_ms", "ok", "status", "error",
                 "correct")


@events.init_command_line_parser.add_listener
def _options(parser):
    group = parser.add_argument_group("sglang load test")
    group.add_argument("--workload", choices=WORKLOADS, default="reasoning", env_var="LOCUST_WORKLOAD",
                       help="reasoning (long fixed outputs), long (long prompts), fewshot (shared 8-shot prefix)")
    group.add_argument("--stream", action="store_true", default=False, env_var="LOCUST_STREAM",
                       help="stream answers (TTFT and TPOT are measured only then)")
    group.add_argument("--output-len", default="", env_var="LOCUST_OUTPUT_LEN",
                       help="output tokens, N or MIN-MAX (default per workload)")
    group.add_argument("--prompt-len", default=DEFAULT_PROMPT, env_var="LOCUST_PROMPT_LEN",
                       help="long-context prompt tokens, N or MIN-MAX")
    group.add_argument("--ignore-eos", choices=("auto", "true", "false"), default="auto",
                       env_var="LOCUST_IGNORE_EOS", help="auto: true for reasoning, else false")
    group.add_argument("--data-dir", default=str(DEFAULT_DATA or ""), env_var="LOCUST_DATA_DIR")
    group.add_argument("--tokenizer", default="", env_var="LOCUST_TOKENIZER",
                       help="HF tokenizer (path or name) for exact prompt lengths")
    group.add_argument("--chars-per-token", type=float, default=4.0, env_var="LOCUST_CHARS_PER_TOKEN")
    group.add_argument("--random-ids", action="store_true", default=False, env_var="LOCUST_RANDOM_IDS",
                       help="random token ids instead of text (servers with --skip-tokenizer-init)")
    group.add_argument("--vocab-size", type=int, default=32000, env_var="LOCUST_VOCAB_SIZE")
    group.add_argument("--temperature", type=float, default=0.0, env_var="LOCUST_TEMPERATURE")
    group.add_argument("--model-name", default="default", env_var="LOCUST_MODEL_NAME",
                       help="'model' field of OpenAI requests")
    group.add_argument("--kv-override", default="", env_var="LOCUST_KV_OVERRIDE",
                       help="JSON for custom_params.kv_policy (per-request policy override)")
    group.add_argument("-n", "--iterations", type=int, default=0, env_var="LOCUST_ITERATIONS",
                       help="stop after this many requests in all (0: no limit)")
    group.add_argument("--record", default="", env_var="LOCUST_RECORD", help="CSV file, one row per request")
    group.add_argument("--request-timeout", type=float, default=3600, env_var="LOCUST_REQUEST_TIMEOUT")
    group.add_argument("--seed", type=int, default=0, env_var="LOCUST_SEED")


def settings_from(options) -> Settings:
    ignore = {"auto": None, "true": True, "false": False}[options.ignore_eos]
    return Settings(workload=options.workload, output_len=parse_range(options.output_len) if options.output_len
                    else None, prompt_len=parse_range(options.prompt_len), ignore_eos=ignore,
                    random_ids=options.random_ids, vocab_size=options.vocab_size,
                    chars_per_token=options.chars_per_token)


class _Run:
    """Per-process state: the workload, the request budget, the record file and the records for the summary."""

    def __init__(self, environment):
        options = environment.parsed_options
        tokenizer = None
        if options.tokenizer:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(options.tokenizer)
        self.options, self.environment = options, environment
        self.workload = Workload(settings_from(options), Path(options.data_dir) if options.data_dir else None, tokenizer)
        self.custom = {"kv_policy": json.loads(options.kv_override)} if options.kv_override else None
        self.started = self.finished = self.users = 0
        self.rows: list[dict] = []
        self.file = self.writer = None
        if options.record:
            path = Path(options.record)
            path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not path.exists() or path.stat().st_size == 0
            self.file = path.open("a", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=RECORD_FIELDS)
            if fresh:
                self.writer.writeheader()

    def claim(self) -> bool:
        limit = self.options.iterations
        if limit and self.started >= limit:
            return False
        self.started += 1
        return True

    def done(self, row: dict) -> None:
        self.rows.append(row)
        if self.writer:
            self.writer.writerow(row)
            self.file.flush()
        self.finished += 1
        if self.options.iterations and self.finished >= self.options.iterations:
            gevent.spawn(self.environment.runner.quit)


RUN: _Run | None = None


@events.test_start.add_listener
def _start(environment, **_):
    global RUN
    try:
        RUN = _Run(environment)
    except Exception as exc:           # missing data, bad --kv-override: stop at once, not spin idle users
        _abort(environment, f"cannot prepare the workload: {type(exc).__name__}: {exc}")


def _abort(environment, message: str) -> None:
    print(f"[loadtest] {message}", file=sys.stderr, flush=True)
    environment.process_exit_code = 2
    gevent.spawn(environment.runner.quit)


@events.quitting.add_listener
def _quit(environment, **_):
    if RUN is None or not RUN.rows:
        return
    s = summarize_requests(RUN.rows)
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    print(f"\n[loadtest] {s['ok']}/{s['requests']} ok in {s['duration_s']:.1f} s: {s['out_tok_s']:.1f} output tok/s, "
          f"TTFT p50 {fmt(s['ttft_p50_ms'], '.0f')} ms p99 {fmt(s['ttft_p99_ms'], '.0f')} ms, "
          f"TPOT p50 {fmt(s['tpot_p50_ms'], '.1f')} ms p99 {fmt(s['tpot_p99_ms'], '.1f')} ms", flush=True)
    if RUN.file:
        RUN.file.close()


class _LLMUser(User):
    abstract = True
    wait_time = constant(0)
    endpoint = "generate"

    def on_start(self):
        if RUN is None:
            raise StopUser()
        self.session = requests.Session()
        RUN.users += 1
        self.rng = random.Random(f"{RUN.options.seed}-{RUN.users}")     # reproducible prompts per user

    @task
    def one_request(self):
        if RUN is None or not RUN.claim():
            raise StopUser()
        opts = RUN.options
        prompt = RUN.workload.sample(self.rng)
        try:
            path, body = build_request(self.endpoint, prompt, stream=opts.stream, temperature=opts.temperature,
                                       model=opts.model_name, custom_params=RUN.custom)
        except ValueError as exc:      # e.g. random ids for the chat endpoint
            _abort(self.environment, str(exc))
            raise StopUser()
        row = self.send(path, body, opts.stream, opts.request_timeout)
        text = row.pop("_text")
        correct = check_answer(prompt, text) if row["ok"] else None
        row.update(workload=prompt.workload, max_tokens=prompt.max_tokens,
                   correct=None if correct is None else int(correct))
        # One request event (response_length = output tokens; the context carries every measured number, for
        # other listeners), plus TTFT and TPOT as their own request types so Locust's tables and CSVs show them.
        name = f"{path} {prompt.workload}{' stream' if opts.stream else ''}"
        latency_s = row["latency_ms"] / 1000
        context = {k: row[k] for k in ("ttft_ms", "tpot_ms", "output_tokens", "prompt_tokens", "cached_tokens")}
        context["output_tok_s"] = row["output_tokens"] / latency_s if row["ok"] and latency_s > 0 else None
        fire = self.environment.events.request.fire
        fire(request_type="POST", name=name, response_time=row["latency_ms"], response_length=row["output_tokens"],
             exception=None if row["ok"] else RuntimeError(row["error"]), context=context)
        for kind in ("ttft", "tpot"):
            if row["ok"] and row[f"{kind}_ms"] is not None:
                fire(request_type=kind.upper(), name=name, response_time=row[f"{kind}_ms"], response_length=0,
                     exception=None, context=context)
        RUN.done(row)

    def send(self, path: str, body: dict, stream: bool, timeout: float) -> dict:
        """POST one request and time it; the row of the record file (plus '_text' for the answer check)."""
        reply, ttft, status, error = Reply(self.endpoint), None, None, ""
        wall0, t0 = time.time(), time.perf_counter()
        try:
            with self.session.post(self.host.rstrip("/") + path, json=body, stream=stream, timeout=timeout) as resp:
                status = resp.status_code
                if status != 200:
                    error = f"HTTP {status}: {resp.text[:300]}"
                elif stream:
                    # large reads: a chunked response still yields each event as it arrives, and long
                    # cumulative native chunks are not re-joined from 512-byte pieces
                    for line in resp.iter_lines(chunk_size=1 << 16):
                        data = sse_data(line)
                        if data is None:
                            continue
                        if isinstance(data, dict) and data.get("error"):
                            error = f"stream error: {json.dumps(data['error'])[:300]}"
                            break
                        if reply.feed(data) and ttft is None:
                            ttft = time.perf_counter() - t0
                else:
                    reply = Reply.from_json(self.endpoint, resp.json())
        except Exception as exc:       # connection refused, timeout, bad JSON: an error row, not a crash
            error = f"{type(exc).__name__}: {exc}"[:300]
        latency = time.perf_counter() - t0
        tokens = reply.tokens
        tpot = (latency - ttft) / (tokens - 1) if ttft is not None and tokens > 1 else None
        ok = not error and tokens > 0
        if not error and tokens == 0:
            error = "no output tokens"
        return {"t_start": round(wall0, 4), "t_end": round(wall0 + latency, 4), "endpoint": self.endpoint,
                "stream": int(stream), "prompt_tokens": reply.prompt_tokens, "output_tokens": tokens,
                "cached_tokens": reply.cached_tokens, "ttft_ms": _ms(ttft), "tpot_ms": _ms(tpot),
                "latency_ms": _ms(latency), "ok": int(ok), "status": status, "error": error, "correct": None,
                "_text": reply.text}


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000, 3)


class GenerateUser(_LLMUser):
    endpoint = "generate"


class CompletionsUser(_LLMUser):
    endpoint = "completions"


class ChatUser(_LLMUser):
    endpoint = "chat"


assert {u.endpoint for u in (GenerateUser, CompletionsUser, ChatUser)} == set(ENDPOINTS) == set(PATHS)
