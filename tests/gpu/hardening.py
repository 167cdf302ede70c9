"""GPU proof of the production-hardening issue, on a dummy-weight Llama-3-8B shape at the default memory fraction.

  load   96 concurrent requests with 12k-16k-token prompts and 768-1024 output tokens (the load that ran out of
         memory inside selection), per server config: every request 200, no scheduler exception or OOM, the idle
         leak check passes, compactions happen, each step's transient peak stays under the reserved bound;
  soak   a mixed soak on one server with --ams-debug-checks true (long reasoning outputs, long prompts, shared
         few-shot prefixes, abandoned streams, malformed bodies, per-request overrides) until --soak-s.

    python tests/gpu/hardening.py --model DIR --configs ams,topk,... --out DIR [--soak-s 600] [--detach]
Configs: see CONFIGS. Results go to OUT/hardening-<config>.json; a summary is printed last.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from engine_e2e import Server, check_server_after  # noqa: E402

BASE = ["--load-format", "dummy", "--skip-tokenizer-init", "--attention-backend", "flashinfer",
        "--mem-fraction-static", "0.85"]
CONFIGS = {
    "production": ["--kv-policy", "none"],
    "ams": ["--kv-policy", "ams"],
    "topk": ["--kv-policy", "topk"],
    "ams-prefill-window": ["--kv-policy", "ams", "--ams-prefill-window", "true"],
    "ams-p16-cached": ["--kv-policy", "ams", "--page-size", "16", "--ams-prompt-cache", "cached"],
    # cached prompts are pinned whole: a budget below the 768-1024 outputs makes them compact too
    "ams-p16-cached-b256": ["--kv-policy", "ams", "--page-size", "16", "--ams-prompt-cache", "cached",
                            "--kv-budget", "256", "--kv-interval", "128"],
    # the warm-up's before/after: each starts with an empty Triton cache (COLD), so its kernels compile in this server
    "ams-cold": ["--kv-policy", "ams"],
    "ams-nowarmup": ["--kv-policy", "ams", "--ams-warmup", "false"],
    "soak": ["--kv-policy", "ams", "--ams-debug-checks", "true"],
}
COLD = {"ams-cold", "ams-nowarmup"}      # fresh Triton cache; 24 requests (the first step is what they measure)
VOCAB = 32000
BAD_CUSTOM = [[1, 2], "abc", "kv_policy", 5, 1.5, True, {"kv_policy": [1, 2]}, {"kv_policy": {1: 2}},
              {"kv_policy": {"budget": 10**30}}, {"kv_policy": {"budget": "512"}}, {"kv_policy": "magic"},
              {"kv_policy": {"window": 3}}, {"kv_policy": {"budget": -1}}, {"kv_policy": {"budget": {"x": [1]}}}]
GOOD_OVERRIDES = [{"budget": 512}, {"policy": "topk"}, "none", {"policy": "ams", "budget": 2048, "scorer": "tova"}]


def ids(rnd: random.Random, n: int) -> list[int]:
    return [rnd.randrange(1, VOCAB) for _ in range(n)]


def long_prompt_requests(seed: int, n: int, shared_groups: int = 0) -> list[dict]:
    """n requests of 12k-16k prompt tokens and 768-1024 outputs; with shared_groups, each group's prompts start
    with the same 8192 tokens (radix hits for --ams-prompt-cache cached)."""
    rnd = random.Random(seed)
    prefixes = [ids(rnd, 8192) for _ in range(shared_groups)]
    out = []
    for i in range(n):
        length = rnd.randint(12288, 16384)
        prompt = (prefixes[i % shared_groups] + ids(rnd, length - 8192)) if shared_groups else ids(rnd, length)
        out.append({"input_ids": prompt, "sampling_params": {"max_new_tokens": rnd.randint(768, 1024),
                                                              "temperature": 0, "ignore_eos": True}})
    return out


async def send(session, url, body, *, abandon_after=0):
    """(status, output tokens). abandon_after > 0: a stream read for that many chunks, then dropped."""
    import aiohttp
    try:
        async with session.post(url + "/generate", json=body) as r:
            if abandon_after:
                n = 0
                async for _ in r.content:
                    n += 1
                    if n >= abandon_after:
                        break
                return r.status, 0
            j = await r.json(content_type=None)
            return r.status, len(j.get("output_ids", [])) if isinstance(j, dict) else 0
    except (aiohttp.ClientError, asyncio.TimeoutError) as err:
        return f"error {type(err).__name__}", 0


def server_info(server: Server) -> dict:
    import urllib.request
    with urllib.request.urlopen(server.url + "/get_server_info", timeout=30) as r:
        info = json.loads(r.read())
    states = info.get("internal_states") or [{}]
    return states[0].get("sglang_ams", {})


async def run_load(server: Server, requests: list[dict], concurrency: int) -> dict:
    import aiohttp
    sem = asyncio.Semaphore(concurrency)
    statuses, tokens = {}, 0
    t0 = time.time()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as s:
        async def one(body):
            nonlocal tokens
            async with sem:
                st, n = await send(s, server.url, body)
            statuses[str(st)] = statuses.get(str(st), 0) + 1
            tokens += n
        await asyncio.gather(*(one(b) for b in requests))
    wall = time.time() - t0
    return {"statuses": statuses, "wall_s": round(wall, 1), "output_tokens": tokens,
            "output_tok_s": round(tokens / wall, 1)}


async def run_soak(server: Server, seconds: float, concurrency: int, seed: int) -> dict:
    import aiohttp
    rnd = random.Random(seed)
    shots = [ids(rnd, 2048) for _ in range(4)]
    by_kind: dict = {}
    deadline = time.time() + seconds

    def body(kind):
        sp = {"temperature": 0, "ignore_eos": True}
        if kind == "reasoning":
            return {"input_ids": ids(rnd, 256), "sampling_params": {**sp, "max_new_tokens": rnd.randint(2048, 4096)}}
        if kind == "long_prompt":
            return {"input_ids": ids(rnd, rnd.randint(8192, 16384)), "sampling_params": {**sp, "max_new_tokens": 256}}
        if kind == "few_shot":
            return {"input_ids": rnd.choice(shots) + ids(rnd, 64), "sampling_params": {**sp, "max_new_tokens": 512}}
        if kind == "override":
            return {"input_ids": ids(rnd, 512), "sampling_params": {
                **sp, "max_new_tokens": 1024, "custom_params": {"kv_policy": rnd.choice(GOOD_OVERRIDES)}}}
        if kind == "malformed":
            return {"input_ids": ids(rnd, 128), "sampling_params": {
                **sp, "max_new_tokens": 32, "custom_params": rnd.choice(BAD_CUSTOM)}}
        return {"input_ids": ids(rnd, 1024), "stream": True, "sampling_params": {**sp, "max_new_tokens": 2048}}

    kinds = ["reasoning"] * 4 + ["long_prompt"] * 2 + ["few_shot"] * 2 + ["override"] * 2 + ["malformed", "abandon"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as s:
        async def worker():
            while time.time() < deadline:
                kind = rnd.choice(kinds)
                st, _ = await send(s, server.url, body(kind), abandon_after=5 if kind == "abandon" else 0)
                key = f"{kind}:{st}"
                by_kind[key] = by_kind.get(key, 0) + 1
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return by_kind


def verdict(server: Server, result: dict, ok_statuses: set) -> dict:
    alive, bad = check_server_after(server)
    log = server.log_text()
    result.update(alive_after_idle_check=alive, error_lines=bad,
                  oom="OutOfMemoryError" in log or "out of memory" in log.lower(),
                  counters=server_info(server) if alive else {})
    c = result["counters"]
    bad_status = {k: v for k, v in result.get("statuses", result.get("by_kind", {})).items()
                  if k.split(":")[-1] not in ok_statuses}
    result["pass"] = bool(alive and not bad and not result["oom"] and not bad_status and c.get("compactions", 0) > 0
                          and c.get("workspace_peak_bytes", 0) <= c.get("workspace_bound_bytes", 0))
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--configs", default="ams")
    ap.add_argument("--out", required=True)
    ap.add_argument("--port", type=int, default=31000)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--soak-s", type=float, default=600)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, name in enumerate(a.configs.split(",")):
        flags = BASE + CONFIGS[name]
        env = {"SGLANG_CHECK_KV_PAGE_INVARIANTS": "1"}
        if name in COLD:
            env["TRITON_CACHE_DIR"] = str(out / f"triton-{name}")
        server = Server(name, a.model, a.port + i, flags, out, env=env)
        server.cmd = [c for c in server.cmd]     # (the command, for the record)
        t0 = time.time()
        if not server.wait(900):
            lines.append(f"{name}: server did not start ({time.time() - t0:.0f} s); log tail: "
                         f"{server.log_text()[-600:]!r}")
            server.stop()
            continue
        start_s = time.time() - t0
        try:
            if name == "soak":
                res = {"by_kind": asyncio.run(run_soak(server, a.soak_s, 64, a.seed))}
                res = verdict(server, res, {"200", "400"})
            else:
                groups = 8 if "cached" in name else 0
                reqs = long_prompt_requests(a.seed, 24 if name in COLD else a.requests, groups)
                res = verdict(server, asyncio.run(run_load(server, reqs, 96)), {"200"})
        finally:
            server.stop()
        res.update(config=name, command=server.cmd, start_s=round(start_s, 1))
        (out / f"hardening-{name}.json").write_text(json.dumps(res, indent=1))
        c = res.get("counters", {})
        lines.append(
            f"{name}: pass {res['pass']}; {res.get('statuses', res.get('by_kind'))}; "
            f"{res.get('output_tok_s', '-')} out tok/s; alive {res['alive_after_idle_check']}, errors "
            f"{len(res['error_lines'])}, oom {res['oom']}; compactions {c.get('compactions')} in "
            f"{c.get('launches')} steps; step peak {c.get('workspace_peak_bytes', 0) / 2**20:.0f} of "
            f"{c.get('workspace_bound_bytes', 0) / 2**20:.0f} MiB; warm-up {c.get('warmup_seconds', 0):.1f} s, "
            f"first step {c.get('first_step_seconds', 0) * 1e3:.0f} ms, longest later "
            f"{c.get('step_seconds_max', 0) * 1e3:.0f} ms; server start {start_s:.0f} s")
        print("###", lines[-1], flush=True)
    print("================ hardening summary")
    for line in lines:
        print(" -", line)


if __name__ == "__main__":
    main()
