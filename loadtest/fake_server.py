"""A CPU stand-in for `python -m sglang.launch_server`, for tests and smoke runs of compare.py without a GPU.

    python loadtest/fake_server.py -m sglang.launch_server --model-path X --port 30000 --kv-policy ams ...

It answers /health, /metrics (sglang:num_running_reqs, num_queue_reqs, token_usage; the sglang_ams: counters when
--kv-policy is topk/ams/streaming), /server_info (the same counters under internal_states[0]["sglang_ams"]), /generate, /v1/completions and /v1/chat/completions (streamed or not), emitting
`max_tokens` fake tokens at --token-ms each. Memory pressure is imitated: a request holds prompt + output tokens of
a --max-total-tokens pool (budget + interval under a policy), and waits in the queue while the pool is full.
With --decode-log-s S it prints SGLang's "Decode batch, #running-req: N, ..." line every S seconds while busy.
compare.py drives it through a `--python` wrapper that runs this file instead of the interpreter.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def parse(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("-m", dest="module")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--kv-policy", default="")
    p.add_argument("--kv-budget", type=int, default=1024)
    p.add_argument("--kv-interval", type=int, default=512)
    p.add_argument("--max-total-tokens", type=int, default=0)
    p.add_argument("--mem-fraction-static", type=float, default=0.0)
    p.add_argument("--token-ms", type=float, default=0.5)
    p.add_argument("--startup-s", type=float, default=0.5)
    p.add_argument("--context-length", type=int, default=1 << 20)
    p.add_argument("--incremental-streaming-output", action="store_true")
    p.add_argument("--decode-log-s", type=float, default=0.0)
    args, _ = p.parse_known_args(argv)
    if not args.max_total_tokens:
        args.max_total_tokens = int(200000 * (args.mem_fraction_static or 0.5))
    return args


class State:
    def __init__(self, args):
        self.args, self.cond = args, threading.Condition()
        self.used = self.running = self.queued = 0
        self.compactions = self.freed = 0
        self.ready_at = time.monotonic() + args.startup_s

    def hold(self, prompt: int, output: int) -> int:
        a = self.args
        need = prompt + output
        if a.kv_policy in ("topk", "ams", "streaming"):
            need = min(need, a.kv_budget + a.kv_interval)
        need = min(need, a.max_total_tokens)
        with self.cond:
            self.queued += 1
            self.cond.wait_for(lambda: self.used + need <= a.max_total_tokens)
            self.queued -= 1
            self.used += need
            self.running += 1
            if need < prompt + output:
                self.compactions += max(1, (prompt + output - need) // max(1, a.kv_interval))
                self.freed += prompt + output - need
        return need

    def release(self, need: int) -> None:
        with self.cond:
            self.used -= need
            self.running -= 1
            self.cond.notify_all()

    def metrics(self) -> str:
        labels = '{model_name="fake model, v1",engine_type="unified"}'
        lines = ["# HELP sglang:num_running_reqs The number of running requests.",
                 "# TYPE sglang:num_running_reqs gauge",
                 f"sglang:num_running_reqs{labels} {float(self.running)}",
                 f"sglang:num_queue_reqs{labels} {float(self.queued)}",
                 f"sglang:token_usage{labels} {self.used / self.args.max_total_tokens:.4f}"]
        if self.args.kv_policy in ("topk", "ams", "streaming"):
            lines += ["# TYPE sglang_ams:compactions_total counter",
                      f"sglang_ams:compactions_total{labels} {float(self.compactions)}",
                      f"sglang_ams:compactions_created{labels} 1.7e9",
                      f"sglang_ams:tokens_freed_total{labels} {float(self.freed)}",
                      f"sglang_ams:kept_ratio{labels} 0.5"]
        return "\n".join(lines) + "\n"

    def server_info(self) -> dict:
        state = {}
        if self.args.kv_policy in ("topk", "ams", "streaming"):
            state["sglang_ams"] = {"compactions": self.compactions, "launches": self.compactions,
                                   "tokens_freed": self.freed, "policy": self.args.kv_policy}
        return {"internal_states": [state], "version": "fake"}

    def decode_log(self) -> None:
        while True:
            time.sleep(self.args.decode_log_s)
            if self.running:
                print(f"[fake] Decode batch, #running-req: {self.running}, #token: {self.used}, "
                      f"token usage: {self.used / self.args.max_total_tokens:.2f}, "
                      f"gen throughput (token/s): {self.running * 1000 / self.args.token_ms:.2f}, "
                      f"#queue-req: {self.queued}, ",
                      flush=True)


def make_handler(state: State):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def send(self, code: int, body: bytes, ctype="application/json"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if time.monotonic() < state.ready_at:
                return self.send(503, b"starting")
            if self.path == "/health":
                return self.send(200, b"")
            if self.path == "/metrics":
                return self.send(200, state.metrics().encode(), "text/plain")
            if self.path in ("/server_info", "/get_server_info"):
                return self.send(200, json.dumps(state.server_info()).encode())
            self.send(404, b"{}")

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            kind = {"/generate": "generate", "/v1/completions": "completions",
                    "/v1/chat/completions": "chat"}.get(self.path)
            if kind is None:
                return self.send(404, b"{}")
            if kind == "generate":
                sp = body.get("sampling_params", {})
                n, prompt = sp.get("max_new_tokens", 16), body.get("input_ids") or body.get("text", "")
            else:
                n = body.get("max_tokens", 16)
                prompt = body.get("prompt") or json.dumps(body.get("messages", ""))
            prompt_tokens = len(prompt) if isinstance(prompt, list) else max(1, len(prompt) // 4)
            if prompt_tokens + n > state.args.context_length:      # SGLang answers 400 as well
                message = f"{prompt_tokens} + {n} tokens exceed the context length {state.args.context_length}"
                return self.send(400, json.dumps({"error": {"message": message}}).encode())
            need = state.hold(prompt_tokens, n)
            try:
                self.answer(kind, body, n, prompt_tokens)
            finally:
                state.release(need)

        def answer(self, kind, body, n, prompt_tokens):
            delay = state.args.token_ms / 1000
            if not body.get("stream"):
                time.sleep(delay * n)
                return self.send(200, json.dumps(self.chunk(kind, " tok" * n, n, prompt_tokens, True)).encode())
            self.send_response(200)                # chunked, like uvicorn's streaming responses
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            text = ""
            cumulative = kind == "generate" and not state.args.incremental_streaming_output   # as SGLang does
            for i in range(1, n + 1):
                time.sleep(delay)
                text += " tok"
                piece = text if cumulative else " tok"
                self.event(json.dumps(self.chunk(kind, piece, i, prompt_tokens, False, i if cumulative else 1)))
            if kind != "generate":
                self.event(json.dumps({"choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                                "completion_tokens": n}}))
            self.event("[DONE]")
            self.wfile.write(b"0\r\n\r\n")

        def event(self, data: str):
            payload = f"data: {data}\n\n".encode()
            self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")

        @staticmethod
        def chunk(kind, text, done, prompt_tokens, whole, ids=None):
            if kind == "generate":
                return {"text": text, "output_ids": [7] * (done if ids is None else ids),
                        "meta_info": {"prompt_tokens": prompt_tokens, "completion_tokens": done, "cached_tokens": 0}}
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": done} if whole else None
            if kind == "completions":
                return {"choices": [{"index": 0, "text": text}], "usage": usage}
            key = "message" if whole else "delta"
            return {"choices": [{"index": 0, key: {"role": "assistant", "content": text}}], "usage": usage}

    return Handler


def main(argv=None):
    args = parse(argv)
    ThreadingHTTPServer.request_queue_size = 256       # many users connect at once
    state = State(args)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(state))
    if args.decode_log_s > 0:
        threading.Thread(target=state.decode_log, daemon=True).start()
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
