"""End-to-end check of `launch_server --kv-policy ams` on a GPU (run by tests/gpu/visit.sh on the H100).

  (a) budget >= every request: output tokens identical to --kv-policy none (same requests, one at a time);
  (b) compression on, >= 500 mixed requests (reasoning-like, long prompts, shared few-shot prefix, per-request
      overrides, bad overrides that must get HTTP 400, cancelled streams), page_size 1 and 16: the server stays
      up, SGLang's idle memory check passes (no leaked slot), the counters prove compactions happened, and
      requests sharing a prefix give the same output alone and together;
  (c) greedy outputs of the SGLang path against the CPU reference decode loop (run here on the GPU with
      HF transformers) under the same policy: token match rate.

    python tests/gpu/engine_e2e.py --model DIR --data DIR --out DIR [--only a,b,c,t,p,w]
(t: a 6144-token pool under load; p: --ams-prompt-cache cached, shared prefixes pinned in the radix tree;
 w: --ams-prefill-window true under the mixed load, and with c its reference-loop match)
Prints a summary last; details go to OUT/e2e.json and the server logs to OUT/server-*.log.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

SUMMARY: list[str] = []
DETAILS: dict = {}


def note(line: str) -> None:
    SUMMARY.append(line)
    print("###", line, flush=True)


# --- servers ------------------------------------------------------------------------------------------------
class Server:
    def __init__(self, name, model, port, flags, out: Path, env=None):
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.log = out / f"server-{name}.log"
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--port", str(port),
               "--mem-fraction-static", "0.15", "--enable-metrics", "--log-level", "info", *flags]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **(env or {})}, cwd="/tmp")

    def wait(self, timeout=600) -> bool:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                return False
            if self.healthy():
                return True
            time.sleep(1)
        return False

    def wait_allocated(self, timeout=300) -> bool:
        """Until the KV pool is sized: the next server may start then without skewing its memory profile."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                return False
            if "KV Cache is allocated" in self.log_text() or self.healthy():
                return True
            time.sleep(1)
        return False

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except Exception:
            return False

    def metrics(self) -> dict:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            if line.startswith("sglang_ams:") and not line.startswith("#"):
                name = line.split("{")[0].split(" ")[0]
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return values

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
            except Exception:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except Exception:
                    pass


def post(url, path, body, timeout=600):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    def parse(raw):   # /flush_cache answers plain text
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            return {"text": raw.decode(errors="replace")}
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, parse(r.read())
    except urllib.error.HTTPError as e:
        return e.code, parse(e.read())


# --- data -------------------------------------------------------------------------------------------------
def load_data(data: Path):
    gsm = [json.loads(l) for l in (data / "gsm8k_test.jsonl").read_text().splitlines() if l.strip()]
    train = [json.loads(l) for l in (data / "gsm8k_train.jsonl").read_text().splitlines() if l.strip()]
    essays = [p.read_text() for p in sorted((data / "essays").glob("*.txt"))]
    return gsm, train, essays


def chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def few_shot_prefix(train, k=8):
    shots = [f"Question: {e['question']}\nAnswer: {e['answer']}" for e in train[:k]]
    return "\n\n".join(shots) + "\n\n"


def greedy(max_new, **extra):
    return {"max_new_tokens": max_new, "temperature": 0, **extra}


# --- (a) --------------------------------------------------------------------------------------------------
def identical_outputs(base: Server, other: Server, prompts, max_new):
    same, pairs = 0, []
    for p in prompts:
        body = {"text": p, "sampling_params": greedy(max_new)}
        _, r1 = post(base.url, "/generate", body)
        _, r2 = post(other.url, "/generate", body)
        a, b = r1.get("output_ids"), r2.get("output_ids")
        same += a == b
        pairs.append((len(a or []), len(b or []), a == b))
    return same, pairs


# --- (b) --------------------------------------------------------------------------------------------------
def mixed_requests(tok, gsm, train, essays, n, seed):
    rnd = random.Random(seed)
    prefix = few_shot_prefix(train)
    reqs = []
    for i in range(n):
        kind = rnd.choices(["reasoning", "long", "prefix", "override", "bad", "cancel"],
                           [35, 20, 25, 10, 4, 6])[0]
        q = gsm[rnd.randrange(len(gsm))]["question"]
        if kind == "reasoning":
            body = {"text": chat(tok, q + " Think step by step."),
                    "sampling_params": greedy(rnd.choice([256, 512, 1024]), ignore_eos=rnd.random() < 0.5)}
        elif kind == "long":
            essay = essays[rnd.randrange(len(essays))]
            start = rnd.randrange(max(1, len(essay) - 12000))
            body = {"text": chat(tok, essay[start:start + rnd.choice([2000, 6000, 12000])] +
                                 "\n\nSummarise the text above in one sentence."),
                    "sampling_params": greedy(rnd.choice([32, 64, 128]))}
        elif kind == "prefix":
            body = {"text": prefix + f"Question: {q}\nAnswer:", "sampling_params": greedy(rnd.choice([128, 256]))}
        elif kind == "override":
            ov = rnd.choice([{"budget": 96}, "none", {"scorer": "tova"}, {"policy": "topk"},
                             {"policy": "streaming", "budget": 160}])
            body = {"text": chat(tok, q), "sampling_params": greedy(384, ignore_eos=True,
                                                                    custom_params={"kv_policy": ov})}
        elif kind == "bad":
            ov = rnd.choice([{"budget": 3}, {"scorer": "nope"}, {"delta": 0.5}, 12])
            body = {"text": chat(tok, q), "sampling_params": greedy(16, custom_params={"kv_policy": ov})}
        else:  # a stream the client abandons after a few chunks: exercises abort
            body = {"text": chat(tok, q), "sampling_params": greedy(800, ignore_eos=True), "stream": True}
        reqs.append((kind, body))
    return reqs


async def run_mixed(url, reqs, concurrency):
    import aiohttp
    sem = asyncio.Semaphore(concurrency)
    results = []

    async def one(session, kind, body):
        async with sem:
            t0 = time.time()
            try:
                async with session.post(url + "/generate", json=body) as resp:
                    if kind == "cancel":
                        chunks = 0
                        async for _ in resp.content:
                            chunks += 1
                            if chunks >= 5:
                                break
                        results.append((kind, resp.status, chunks, time.time() - t0))
                        return
                    data = await resp.json(content_type=None)
                    n_out = len(data.get("output_ids", [])) if isinstance(data, dict) else 0
                    results.append((kind, resp.status, n_out, time.time() - t0))
            except Exception as e:  # noqa: BLE001 - recorded and counted as a failure
                results.append((kind, -1, repr(e)[:200], time.time() - t0))

    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(one(session, k, b) for k, b in reqs))
    return results


def prefix_sharing(server: Server, tok, train, gsm, k, max_new):
    prefix = few_shot_prefix(train)
    bodies = [{"text": prefix + f"Question: {gsm[i]['question']}\nAnswer:",
               "sampling_params": greedy(max_new, ignore_eos=True)} for i in range(k)]
    post(server.url, "/flush_cache", {})
    replies = [post(server.url, "/generate", b)[1] for b in bodies]
    alone = [r.get("output_ids") for r in replies]
    # Radix hits of the later requests on the shared prefix (0 where prompts stay private to their request).
    DETAILS[f"prefix-cached-tokens-{server.name}"] = [r.get("meta_info", {}).get("cached_tokens") for r in replies]

    async def together():
        import aiohttp
        async with aiohttp.ClientSession() as s:
            async def one(b):
                async with s.post(server.url + "/generate", json=b) as r:
                    return (await r.json()).get("output_ids")
            return await asyncio.gather(*(one(b) for b in bodies))
    both = asyncio.run(together())
    same = sum(a == b for a, b in zip(alone, both))
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                  for a, b in zip(alone, both)]
    return same, first_diff


def openai_overrides(server: Server):
    """The per-request override through the OpenAI-compatible endpoints (the `custom_params` body field)."""
    good = {"kv_policy": {"policy": "ams", "budget": 96}}
    bad = {"kv_policy": {"budget": 2}}
    cases = [("/v1/completions", {"model": "m", "prompt": "Count to fifty:", "max_tokens": 300,
                                  "ignore_eos": True}, good, 200),
             ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "Count to fifty."}],
                                       "max_tokens": 300, "ignore_eos": True}, good, 200),
             ("/v1/completions", {"model": "m", "prompt": "Hi", "max_tokens": 8}, bad, 400),
             ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                                       "max_tokens": 8}, bad, 400)]
    rows = []
    for path, body, custom, want in cases:
        status, reply = post(server.url, path, {**body, "custom_params": custom})
        message = json.dumps(reply)[:200] if status != 200 else ""
        rows.append({"path": path, "status": status, "want": want, "message": message})
    DETAILS[f"openai-{server.name}"] = rows
    ok = sum(r["status"] == r["want"] for r in rows)
    note(f"(b) OpenAI overrides on {server.name}: {ok}/{len(rows)} statuses as expected "
         f"({[(r['path'].split('/')[-1], r['status']) for r in rows]}); 400 says: {rows[-1]['message'][:120]}")


def check_server_after(server: Server, idle_s=8):
    time.sleep(idle_s)   # let the scheduler go idle: SGLang's strict idle check runs there
    alive = server.healthy() and server.proc.poll() is None
    log = server.log_text()
    bad = [l for l in log.splitlines() if ("Traceback" in l or "memory leak" in l.lower() or "ValueError" in l)]
    return alive, bad[:10]


# --- (c) --------------------------------------------------------------------------------------------------
def reference_match(server: Server, model_dir, tok, prompts, max_new, policy_kwargs):
    import torch
    from transformers import AutoModelForCausalLM

    from sglang_ams.config import PolicyConfig
    from sglang_ams.reference import generate_reference
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    cfg = PolicyConfig(**policy_kwargs)
    rows = []
    for p in prompts:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        post(server.url, "/flush_cache", {})
        _, r = post(server.url, "/generate", {"input_ids": ids, "sampling_params": greedy(max_new, ignore_eos=True)})
        got = r.get("output_ids", [])
        ref = generate_reference(model, ids, cfg, max_new_tokens=max_new, eos_token_ids=[])
        ref_ids = list(ref.token_ids)
        n = min(len(got), len(ref_ids))
        prefix_match = next((i for i in range(n) if got[i] != ref_ids[i]), n)
        rows.append({"prompt_tokens": len(ids), "sglang": len(got), "reference": len(ref_ids),
                     "first_divergence": prefix_match, "positions_equal": sum(a == b for a, b in zip(got, ref_ids)),
                     "compactions_ref": getattr(ref, "num_compactions", None)})
    del model
    torch.cuda.empty_cache()
    total = sum(r["sglang"] for r in rows)
    matched_prefix = sum(r["first_divergence"] for r in rows)
    return rows, matched_prefix / max(1, total), sum(r["first_divergence"] == r["sglang"] for r in rows)


# --- main -------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(tempfile.gettempdir(), "e2e-out"))
    ap.add_argument("--only", default="a,b,c")
    ap.add_argument("--requests", type=int, default=520)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--interval", type=int, default=32)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = set(a.only.split(","))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a.model)
    gsm, train, essays = load_data(Path(a.data))
    debug_env = {"SGLANG_CHECK_KV_PAGE_INVARIANTS": "1"}
    policy = ["--kv-policy", "ams", "--kv-budget", str(a.budget), "--kv-interval", str(a.interval),
              "--ams-debug-checks", "true"]
    specs = {}
    if "a" in parts or "b" in parts:
        specs["none"] = ["--kv-policy", "none", "--attention-backend", "flashinfer"]
    if "a" in parts:
        specs["ams-huge"] = ["--kv-policy", "ams", "--kv-budget", "100000"]
    if "c" in parts or "w" in parts:
        specs.setdefault("none", ["--kv-policy", "none", "--attention-backend", "flashinfer"])
    if "b" in parts or "c" in parts:
        specs["ams-p1"] = policy + ["--page-size", "1"]
    if "b" in parts:
        specs["ams-p16"] = policy + ["--page-size", "16"]
    if "p" in parts:     # the prompt cached in the radix tree and pinned; only generated tokens compress
        specs["ams-cached"] = policy + ["--page-size", "16", "--ams-prompt-cache", "cached"]
        # Upstream at the same page size, radix hits included: the floor for "alone vs together" outputs.
        specs["none-p16"] = ["--kv-policy", "none", "--attention-backend", "flashinfer", "--page-size", "16"]
    if "w" in parts:     # long prompts compact two decode steps after prefill, on the prompt's last queries
        specs["ams-window"] = policy + ["--page-size", "16", "--ams-prefill-window", "true"]
    if "t" in parts:     # memory pressure: a pool smaller than the running requests' full KV (retractions)
        specs["ams-tight"] = policy + ["--page-size", "16", "--max-total-tokens", "6144"]
    t0 = time.time()
    servers = {}
    try:
        for i, (name, flags) in enumerate(specs.items()):
            servers[name] = Server(name, a.model, 31000 + i, flags, out, debug_env)
            if not servers[name].wait_allocated():
                print(servers[name].log_text()[-4000:])
                raise SystemExit(f"server {name} died before allocating its KV pool")
        for name, s in servers.items():
            ok = s.wait()
            note(f"server {name} {'up' if ok else 'FAILED to start'} at {time.time() - t0:.0f} s")
            if not ok:
                print(s.log_text()[-4000:])
                raise SystemExit(1)
        prompts = [chat(tok, e["question"]) for e in gsm[:24]]
        if "a" in parts:
            same, pairs = identical_outputs(servers["none"], servers["ams-huge"], prompts, 192)
            DETAILS["a"] = pairs
            m = servers["ams-huge"].metrics()
            note(f"(a) budget >= request: {same}/{len(prompts)} outputs identical to --kv-policy none "
                 f"(compactions: {m.get('sglang_ams:compactions_total', 0):.0f})")
        if parts & {"b", "t", "p", "w"}:
            mixed = [n for n in ("ams-p1", "ams-p16", "ams-tight", "ams-cached", "ams-window") if n in servers]
            for name in mixed:
                openai_overrides(servers[name])
            for name in mixed:
                s = servers[name]
                reqs = mixed_requests(tok, gsm, train, essays, a.requests, seed=hash(name) % 1000)
                t1 = time.time()
                res = asyncio.run(run_mixed(s.url, reqs, a.concurrency))
                dt = time.time() - t1
                by_kind = {}
                for kind, status, n_out, _ in res:
                    by_kind.setdefault(kind, []).append(status)
                ok_normal = all(st == 200 for k, sts in by_kind.items() if k not in ("bad",) for st in sts)
                ok_bad = all(st == 400 for st in by_kind.get("bad", []))
                alive, bad_lines = check_server_after(s)
                m = s.metrics()
                DETAILS[f"b-{name}"] = {"statuses": {k: sorted(set(v)) for k, v in by_kind.items()},
                                       "metrics": m, "bad_log_lines": bad_lines, "seconds": dt}
                retracted = sum("retract" in line.lower() and "server_args" not in line
                                for line in s.log_text().splitlines())
                counters = [line for line in s.log_text().splitlines() if "AMS compactions:" in line]
                note(f"(b) {name} last counter line: {counters[-1].split('] ')[-1] if counters else 'none'}")
                note(f"(b) {name}: {len(res)} requests in {dt:.0f} s; non-bad all 200: {ok_normal}; "
                     f"bad all 400: {ok_bad} ({len(by_kind.get('bad', []))}); alive after idle check: {alive}; "
                     f"error lines: {len(bad_lines)}; compactions {m.get('sglang_ams:compactions_total', 0):.0f}, "
                     f"tokens freed {m.get('sglang_ams:tokens_freed_total', 0):.0f}, "
                     f"kept ratio {m.get('sglang_ams:kept_ratio', 0):.3f}; log lines mentioning retraction: {retracted}")
        if parts & {"b", "p", "w"}:
            for name in [n for n in ("none", "none-p16", "ams-p1", "ams-p16", "ams-cached", "ams-window")
                         if n in servers]:
                same, first = prefix_sharing(servers[name], tok, train, gsm, 8, 160)
                DETAILS[f"prefix-{name}"] = first
                hits = DETAILS.get(f"prefix-cached-tokens-{name}")
                note(f"(b) shared prefix on {name}: {same}/8 outputs identical alone vs together "
                     f"(first differing token per request: {first}; radix-cached prompt tokens alone: {hits})")
        if parts & {"c", "w"}:
            # The same comparison with the policy off is the floor: bf16 kernels differ between the two stacks.
            runs = []
            if "c" in parts:
                runs += [("none", dict(policy="none"), prompts[:8]),
                         ("ams-p1", dict(policy="ams", budget=a.budget, interval=a.interval), prompts[:8])]
            if "w" in parts:
                # Prompts past the trigger (~500 tokens): the window starts from the prompt's last queries. The
                # policy-off run on the same prompts is this comparison's floor.
                rnd = random.Random(7)
                long_prompts = [chat(tok, e[s:s + 2000] + "\n\nSummarise the text above in one sentence.")
                                for e in (essays[rnd.randrange(len(essays))] for _ in range(8))
                                for s in [rnd.randrange(max(1, len(e) - 2000))]]
                runs += [("none", dict(policy="none"), long_prompts),
                         ("ams-window", dict(policy="ams", budget=a.budget, interval=a.interval,
                                             prefill_window=True), long_prompts)]
            for name, kw, run_prompts in runs:
                rows, rate, exact = reference_match(servers[name], a.model, tok, run_prompts, 256, kw)
                DETAILS[f"c-{name}-{len(run_prompts[0])}"] = rows
                pos_rate = sum(r["positions_equal"] for r in rows) / max(1, sum(r["sglang"] for r in rows))
                note(f"(c) SGLang {name} vs reference loop ({kw['policy']}, prompts of ~{len(run_prompts[0])} "
                     f"chars): {rate:.3f} of tokens before the first divergence, {pos_rate:.3f} of positions equal, "
                     f"{exact}/8 sequences identical; compactions in reference: "
                     f"{[r['compactions_ref'] for r in rows]}")
    finally:
        for s in servers.values():
            s.stop()
        (out / "e2e.json").write_text(json.dumps({"summary": SUMMARY, "details": DETAILS}, indent=1, default=str))
    print("=================== e2e summary")
    for line in SUMMARY:
        print(" -", line)


if __name__ == "__main__":
    main()
