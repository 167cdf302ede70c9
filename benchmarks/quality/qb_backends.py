"""Backends that turn (example, PolicyConfig) into generated text plus the compression facts of the run.

reference  the CPU reference loop (sglang_ams.reference.generate_reference) on HF transformers: exact, slow, and
           the only one that sees what every (layer, head) kept, so it also measures the region wipe-out rate and
           the AMS boundary jitter (segment ids are recorded by wrapping `plan` for the duration of a call).
server     HTTP POST /generate against a running SGLang server with the sglang-ams plugin. One server serves
           every policy of the sweep through the per-request override
               sampling_params.custom_params = {"kv_policy": {"policy", "budget", "interval", "scorer"}}
           which only compresses when the server was started with a policy other than "none" (the override is
           rejected otherwise), and only the four request keys can change per request: window, sink, keep_lastn,
           lmin, qmin, delta, segmenter, use_credit, use_mass... are server flags (--ams-*). `payload` checks that
           the request resolves, on that server, to exactly the PolicyConfig the reference path uses, and says
           which flag to start the server with when it does not (e.g. the ablations need their own server).
           A server started with a query-free policy (streaming, top-k of keydiff/random) has no query ring and
           rejects ams / query-scorer overrides: start it with --kv-policy ams.
           The server cannot teacher-force decode tokens: the forced answer start of retrieval tasks is appended to
           the prompt (prefill), so there the answer is emitted before the first compaction (after W decode
           steps) and per-example agreement with the reference path is not expected for needle / kv_retrieval.
           Start the server with --disable-radix-cache for these runs: a prompt that a previous full-KV request
           left in the radix tree would be matched and pinned (never compressed) by the next request.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import urllib.error
import urllib.request
from typing import Callable

import sglang_ams.reference as reference
from sglang_ams import demo
from sglang_ams.config import EXTERNAL_NAMES, REQUEST_KEYS, PolicyConfig, request_override
from sglang_ams.reference import generate_reference, prefill_reference

import qb_harness as H


# ---------------------------------------------------------------------------------------------------------------
# Reference (CPU) backend

@contextlib.contextmanager
def recording_segments(store: list):
    """Record Selection.segment_ids [L, H, T] of every compaction the reference loop plans (AMS only has them)."""
    original = reference.plan

    def recording_plan(*args, **kwargs):
        selection = original(*args, **kwargs)
        if selection.segment_ids is not None:
            store.append(selection.segment_ids[0].detach().cpu())
        return selection

    reference.plan = recording_plan
    try:
        yield store
    finally:
        reference.plan = original


def compression_facts(result, cfg: PolicyConfig, tokenizer, forced_ids, segment_ids) -> dict:
    """Wipe-out (reasoning steps, fixed 32-token blocks) and, for AMS, boundary jitter of one reference run."""
    facts = {}
    if not result.compactions:
        return facts
    fed = result.prompt_length + len(result.decode_positions)
    # Forced tokens follow the prompt whether they were prefilled (prefill window) or fed as decode steps.
    start = result.prompt_length - result.forced_prefilled
    steps = H.step_blocks(tokenizer, list(forced_ids) + list(result.token_ids), start)
    facts["wipeout_step"] = list(H.wipeout(result.compactions, steps, cfg.sink, cfg.keep_lastn))
    facts["wipeout_fixed32"] = list(H.wipeout(result.compactions, H.fixed_blocks(cfg.sink, fed, 32),
                                              cfg.sink, cfg.keep_lastn))
    if segment_ids:
        if len(segment_ids) != len(result.compactions):
            raise RuntimeError(f"{len(segment_ids)} segmentations recorded for {len(result.compactions)} compactions")
        facts["jitter"] = list(H.boundary_jitter(result.compactions, segment_ids, cfg.sink, cfg.keep_lastn))
        facts["segments_mean"] = sum(float((s.amax(-1) + 1).float().mean()) for s in segment_ids) / len(segment_ids)
    return facts


class ReferenceBackend:
    name = "reference"

    def __init__(self, model_name: str, model=None, tokenizer=None):
        if model is None:
            model, tokenizer = demo.load_model(model_name, progress=False)
        self.model_name, self.model, self.tokenizer = model_name, model, tokenizer
        self.stops = demo.stop_token_ids(model, tokenizer)
        self._prefill = None        # (key, Prefill) of the last prefill-window prompt: the policies of one example share it

    def _shared_prefill(self, example, cfg: PolicyConfig):
        """The prefill a prefill-window policy runs (prompt + forced answer start), made once per example and
        window (generate_reference gives the same result with it; tests/test_reference.py checks)."""
        if not (cfg.enabled and cfg.needs_queries and cfg.prefill_window):
            return None
        ids = list(example.prompt_ids) + list(example.forced_ids)
        key = (tuple(ids), cfg.window)
        if self._prefill is None or self._prefill[0] != key:
            self._prefill = (key, prefill_reference(self.model, ids, window=cfg.window))
        return self._prefill[1]

    def generate(self, example, cfg: PolicyConfig) -> dict:
        segments: list = []
        start = time.perf_counter()
        prefill = self._shared_prefill(example, cfg)
        with recording_segments(segments):
            result = generate_reference(self.model, example.prompt_ids, cfg, example.max_new_tokens,
                                        tokenizer=self.tokenizer, eos_token_ids=self.stops,
                                        forced_tokens=example.forced_ids, prefill=prefill)
        out = {"text": result.text or "", "n_generated": len(result.token_ids),
               "compactions": result.num_compactions, "peak_kv": result.peak_kv_length,
               "final_kv": result.final_kv_length, "seconds": round(time.perf_counter() - start, 3)}
        out.update(compression_facts(result, cfg, self.tokenizer, example.forced_ids, segments))
        return out


# ---------------------------------------------------------------------------------------------------------------
# SGLang server backend

def _flag_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def launch_flags(server_cfg: PolicyConfig) -> list[str]:
    """The --kv-* / --ams-* flags that start a server whose defaults match server_cfg (every field spelled out)."""
    flags = []
    for field, name in EXTERNAL_NAMES.items():
        value = getattr(server_cfg, field)
        if field == "triattention_stats" and not value:
            continue
        flags += ["--" + name.replace("_", "-"), _flag_value(value)]
    return flags


def server_config(policy: str = "ams", scorer: str = "snapkv", budget: int = 1024, **overrides) -> PolicyConfig:
    """The server's own policy for a sweep: HARNESS_DEFAULTS plus overrides (budget and scorer are per request)."""
    settings = {**H.HARNESS_DEFAULTS, **overrides}
    settings.setdefault("interval", max(settings["window"], budget // 4))
    return PolicyConfig(policy=policy, scorer=scorer, budget=budget, **settings)


class ServerBackend:
    name = "server"

    def __init__(self, url: str, model_name: str, tokenizer, stop_ids, server_cfg: PolicyConfig,
                 timeout: float = 1800.0, post: Callable[[str, dict, float], dict] | None = None):
        self.url = url.rstrip("/")
        self.model_name, self.tokenizer = model_name, tokenizer
        self.stops = sorted(int(t) for t in stop_ids)
        self.server_cfg, self.timeout = server_cfg, timeout
        self.post = post or _post_json

    def override(self, cfg: PolicyConfig) -> dict | None:
        """The custom_params.kv_policy value that makes this server run `cfg` (None: send nothing)."""
        if not self.server_cfg.enabled:
            if cfg.enabled:
                raise ValueError("the server was started with --kv-policy none: per-request overrides are rejected "
                                 "there; start it with --kv-policy ams (or topk/streaming) "
                                 + " ".join(launch_flags(self.server_cfg.replace(policy="ams"))))
            return None
        if not cfg.enabled:
            return {"policy": "none"}
        # layer_budget only when not the default, so uniform request bodies stay as they were
        override = {key: getattr(cfg, key) for key in REQUEST_KEYS
                    if key != "layer_budget" or cfg.layer_budget != "uniform"}
        resolved = request_override(self.server_cfg, override)
        if resolved != cfg:
            differ = [f for f in dataclasses.fields(cfg) if getattr(resolved, f.name) != getattr(cfg, f.name)]
            flags = " ".join(f"--{EXTERNAL_NAMES[f.name].replace('_', '-')} {_flag_value(getattr(cfg, f.name))}"
                             for f in differ)
            raise ValueError(f"{cfg.policy}/{cfg.scorer} needs server-level settings this server does not have; "
                             f"start one with {flags}")
        if cfg.needs_queries and not self.server_cfg.needs_queries:
            raise ValueError(f"{cfg.policy}/{cfg.scorer} reads window queries but the server's policy "
                             f"{self.server_cfg.policy}/{self.server_cfg.scorer} keeps no query ring; "
                             "start it with --kv-policy ams")
        return override

    def payload(self, example, cfg: PolicyConfig) -> dict:
        params = {"temperature": 0.0, "max_new_tokens": example.max_new_tokens, "stop_token_ids": self.stops,
                  "skip_special_tokens": True}
        override = self.override(cfg)
        if override is not None:
            params["custom_params"] = {"kv_policy": override}
        return {"input_ids": list(example.prompt_ids) + list(example.forced_ids), "sampling_params": params}

    def generate(self, example, cfg: PolicyConfig) -> dict:
        body = self.payload(example, cfg)
        start = time.perf_counter()
        response = self.post(self.url + "/generate", body, self.timeout)
        meta = response.get("meta_info", {}) or {}
        out = {"text": response.get("text", ""), "n_generated": meta.get("completion_tokens"),
               "finish_reason": meta.get("finish_reason"), "seconds": round(time.perf_counter() - start, 3)}
        extra = {k: v for k, v in meta.items() if "kv" in k or "ams" in k or "compact" in k}
        if extra:
            out["server_meta"] = extra
        return out


def _post_json(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:                    # 400: the server's message says what was wrong
        raise RuntimeError(f"{url}: HTTP {err.code}: {err.read().decode(errors='replace')[:500]}") from None
