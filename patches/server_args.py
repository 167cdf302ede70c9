"""Hooks on sglang.srt.server_args: our flags on the CLI and as sglang.Engine keyword arguments.

With a policy on, settings SGLang would otherwise pick for itself are forced (FlashInfer attention) and features
that compaction cannot honour yet are refused at startup with a message naming the flag.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

from sglang_ams.config import (EXTERNAL_NAMES, LAYER_BUDGETS, POLICIES, SCORERS, SEGMENTERS, ConfigError,
                               PolicyConfig)
from sglang_ams.engine import settings as ams_settings
from sglang_ams.engine.settings import (ALL_NAMES, ENGINE_NAMES, PROMPT_CACHE_MODES, SCORING_LSE_MODES,
                                        EngineSettings)

MODULE = "sglang.srt.server_args.ServerArgs"
ATTR = "_ams_settings"


class UnsupportedFeature(ConfigError):
    """A server flag that cannot be combined with a KV policy (yet)."""

    def __init__(self, field: str, value: Any, why: str):
        self.field, self.value, self.valid = field, value, why
        flag = "--" + field.replace("_", "-")
        ValueError.__init__(self, f"--kv-policy cannot be combined with {flag}={value!r}: {why}. "
                                  f"Remove {flag} or run with --kv-policy none.")


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_HELP = {
    "policy": "KV policy: none (upstream behaviour), topk (global top-k of --kv-scorer), ams (adaptive "
              "mass-segmented quotas on top of --kv-scorer), streaming (sink + recent).",
    "budget": "KV tokens each request keeps (beyond a radix-shared prefix), sink and recent tokens included.",
    "interval": "Compaction runs when a request holds budget + interval tokens.",
    "scorer": "Token importance used inside segments (ams) or globally (topk).",
    "window": "Window of recent decode queries whose attention is the evidence (query ring size).",
    "pool_kernel": "Average-pooling kernel over attention evidence (odd).",
    "delta": "Mass per AMS segment (segments cut at equal cumulative mass).",
    "lmin": "Shortest AMS segment; shorter ones merge into a neighbour.",
    "lmax": "Longest AMS segment; longer ones are split.",
    "qmin": "Floor quota of tokens every segment keeps.",
    "keep_lastn": "Most recent tokens always kept.",
    "sink": "First tokens always kept.",
    "credit_decay": "EMA decay of the carried credit.",
    "mass_mix": "Weight of fresh mass against carried credit.",
    "segmenter": "How segments are cut (fixed_length is an ablation).",
    "use_credit": "Carry EMA credit across compactions (ablation: false).",
    "use_mass": "Share the budget by segment mass (ablation: false = by length).",
    "seed": "Seed of the random scorer.",
    "triattention_stats": "Calibration statistics for --kv-scorer triattention (empty: estimate from the window).",
    "prefill_window": "Fill the query window with the prompt's last queries at prefill (SnapKV's observation "
                      "window): a prompt already past its trigger compacts two decode steps after prefill instead "
                      "of after a window of decode steps; the scoring of that compaction recomputes the LSE.",
    "layer_budget": "uniform: every layer keeps the budget. adaptive (per-layer budgets split by attention spread) "
                    "runs in the reference loop only; the engine refuses it (its pool keeps equal counts per layer).",
    "prompt_cache": "private: the prompt stays private to the request and is compressible; cached: it is "
                    "inserted into the radix tree (shared with later requests) and pinned, only generated "
                    "tokens are compressed.",
    "ring_rows": "Rows of the query ring (requests that can collect window queries at once); 0 sizes it from "
                 "the KV pool.",
    "debug_checks": "Assert bookkeeping invariants after every compaction (slow; for testing).",
    "scoring_lse": "decode: window attention uses each window query's log-sum-exp from the decode attention "
                   "(keys read once); recompute: the scoring kernel computes it (keys read twice).",
    "workspace_mib": "GPU memory (MiB) a compaction step may use for its temporaries, reserved from the KV budget; "
                     "groups are split so no step passes it. 0: the larger of 2%% of the KV budget and one layer "
                     "of one request at the context length.",
    "warmup": "Compile the compaction kernels at startup, so the first compaction costs what later ones do "
              "(false: they compile in the first compaction step).",
    "batch_slack": "A request this fraction of its interval short of its trigger compacts together with a due "
                   "request (fewer, larger compaction steps); 0 compacts every request exactly at its trigger.",
}
_CHOICES = {"policy": POLICIES, "scorer": SCORERS, "segmenter": SEGMENTERS, "layer_budget": LAYER_BUDGETS, "prompt_cache": PROMPT_CACHE_MODES,
            "scoring_lse": SCORING_LSE_MODES}


def add_cli_args_hook(result, parser: argparse.ArgumentParser):
    group = parser.add_argument_group("sglang-ams KV compression")
    defaults = {**dataclasses.asdict(PolicyConfig()), **{k: getattr(EngineSettings(), k) for k in ENGINE_NAMES}}
    names = {**EXTERNAL_NAMES, **ENGINE_NAMES}
    for field, name in names.items():
        default = defaults[field]
        kind = type(default)
        kwargs = dict(dest=name, default=default, help=f"{_HELP[field]} (default: {default!r})")
        if field in _CHOICES:
            kwargs["choices"] = _CHOICES[field]
        elif kind is bool:
            kwargs.update(type=_bool, metavar="{true,false}")
        else:
            kwargs["type"] = kind
        group.add_argument("--" + name.replace("_", "-"), **kwargs)
    return result


# --- compatibility -----------------------------------------------------------------------------------------
_REFUSED_TRUE = {
    "enable_mixed_chunk": "mixed chunks re-extend running requests at logical positions, which compaction moves",
    "enable_hierarchical_cache": "host-side KV copies would go stale after compaction",
    "enable_lmcache": "external KV stores would receive compacted KV under the wrong tokens",
    "enable_flexkv": "external KV stores would receive compacted KV under the wrong tokens",
    "enable_hisparse": "hierarchical sparse attention owns the KV layout",
    "enable_streaming_session": "session continuation re-extends compacted KV",
    "enable_session_radix_cache": "session radix caches re-extend compacted KV",
    "enable_torch_compile": "torch.compile would trace the query-ring hook (not supported yet)",
    "enable_dp_attention": "data-parallel attention is not supported yet",
    "enable_two_batch_overlap": "two-batch overlap is not supported yet",
    "enable_pdmux": "PD multiplexing is not supported yet",
    "strip_thinking_cache": "it changes which KV a finished request owns",
}
_REFUSED_SET = {
    "speculative_algorithm": "speculative decoding has its own decode preparation and a draft KV pool",
    "radix_cache_backend": "the plugin works with SGLang's default radix cache only",
    "dllm_algorithm": "diffusion LLM decoding is not supported",
}
_REFUSED_TRUE.update({       # flags of newer SGLang (absent ones read as their default)
    "enable_unified_cache_external_linker": "external KV stores would receive compacted KV under the wrong tokens",
    "disaggregation_decode_enable_offload_kvcache": "offloaded KV copies would go stale after compaction",
    "enable_kv_cache_sharding": "page-interleaved KV sharding stripes a request's pages across ranks, which "
                                "compaction does not follow",
})
_KV_DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "half")


def compatible_overrides(get: Callable[[str, Any], Any]) -> dict:
    """Check the server flags (read through `get(name, default)`) and return the values to force."""
    for name, why in _REFUSED_TRUE.items():
        if get(name, False):
            raise UnsupportedFeature(name, True, why)
    for name, why in _REFUSED_SET.items():
        if get(name, None) not in (None, ""):
            raise UnsupportedFeature(name, get(name, None), why)
    if (get("attn_dp_size", 1) or 1) > 1:
        raise UnsupportedFeature("attn_dp_size", get("attn_dp_size", 1), "data-parallel attention is not supported yet")
    for name in ("pp_size", "dcp_size"):
        if (get(name, 1) or 1) > 1:
            raise UnsupportedFeature(name, get(name, 1), "pipeline / decode-context parallelism is not supported")
    for name in ("tp_size", "dp_size"):
        if (get(name, 1) or 1) > 1:
            raise UnsupportedFeature(name, get(name, 1), "compaction has not been run on several GPUs yet (tensor "
                                     "and data parallelism are refused until a multi-GPU run proves them)")
    if get("disaggregation_mode", "null") not in (None, "null"):
        raise UnsupportedFeature("disaggregation_mode", get("disaggregation_mode", None),
                                 "prefill/decode disaggregation moves KV between servers")
    dtype = get("kv_cache_dtype", "auto")
    if dtype not in _KV_DTYPES:
        raise UnsupportedFeature("kv_cache_dtype", dtype, "compaction supports bf16/fp16 KV only (fp8 and fp4 "
                                 "need their scales moved too)")
    for name in ("decode_attention_backend", "prefill_attention_backend"):
        if get(name, None) not in (None, "flashinfer"):
            raise UnsupportedFeature(name, get(name, None), "the plugin is built and tested on FlashInfer attention")
    backend = get("attention_backend", None)
    if backend not in (None, "flashinfer"):
        raise UnsupportedFeature("attention_backend", backend, "the plugin is built and tested on FlashInfer "
                                 "attention (it is selected automatically)")
    return {} if backend == "flashinfer" else {"attention_backend": "flashinfer"}


# --- hooks -------------------------------------------------------------------------------------------------
_in_from_cli = False


def _attach(server_args, settings: EngineSettings) -> None:
    setattr(server_args, ATTR, settings)     # (a msgspec ServerArgs keeps underscore names through pickling)
    ams_settings.publish(settings)


def from_cli_args_hook(orig, cls, args: argparse.Namespace):
    global _in_from_cli
    values = {name: getattr(args, name) for name in ALL_NAMES if hasattr(args, name)}
    for name in values:
        delattr(args, name)
    try:
        settings = ams_settings.from_user_values(values)
        if settings.enabled:
            for name, value in compatible_overrides(lambda n, d: getattr(args, n, d)).items():
                setattr(args, name, value)
    except ConfigError as err:
        raise SystemExit(f"sglang-ams: {err}") from None
    _in_from_cli = True
    try:
        server_args = orig(cls, args)
    finally:
        _in_from_cli = False
    _attach(server_args, settings)
    return server_args


def init_hook(orig, self, *args, **kwargs):
    ours = {name: kwargs.pop(name) for name in ALL_NAMES if name in kwargs}
    settings = None
    if ours:
        settings = ams_settings.from_user_values(ours)
        if settings.enabled:
            kwargs.update(compatible_overrides(lambda n, d: kwargs.get(n, d)))
    orig(self, *args, **kwargs)
    if settings is not None:
        _attach(self, settings)
    elif not _in_from_cli:
        ams_settings.publish(None)   # an Engine without our kwargs must not inherit an earlier Engine's policy


# SGLang whose ServerArgs is a msgspec Struct: its __init__ cannot be hooked, so sglang.Engine's keyword
# arguments are taken in Engine.__init__ and the settings attached where Engine logs the ServerArgs it built.
_pending: list = []          # [EngineSettings] between the two


def take_engine_kwargs(kwargs: dict) -> None:
    """Pop our keyword arguments from an Engine call (in place) and force the flags a policy needs."""
    _pending.clear()
    if "server_args" in kwargs:
        return
    ours = {name: kwargs.pop(name) for name in ALL_NAMES if name in kwargs}
    settings = ams_settings.from_user_values(ours)
    if settings.enabled:
        kwargs.update(compatible_overrides(lambda n, d: kwargs.get(n, d)))
    _pending.append(settings)


def engine_init_hook(orig, self, *args, **kwargs):
    take_engine_kwargs(kwargs)
    try:
        return orig(self, *args, **kwargs)
    finally:
        _pending.clear()


def engine_logging_hook(server_args, *args, **kwargs):
    if _pending:
        settings = _pending.pop()
        if isinstance(settings, Exception):
            raise settings                       # a bad value in the first Engine call (see take_first_engine_call)
        _attach(server_args, settings)           # an Engine without our kwargs publishes "no policy"
    return None


def take_first_engine_call() -> None:
    """The plugin is loaded inside the first Engine.__init__, after its hook could apply: take that call's
    keyword arguments from its frame (the dict it is about to pass to ServerArgs)."""
    import sys
    engine = sys.modules.get("sglang.srt.entrypoints.engine")
    code = getattr(getattr(getattr(engine, "Engine", None), "__init__", None), "__code__", None)
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    kwargs = frame.f_locals.get("kwargs") if frame is not None else None
    if isinstance(kwargs, dict):
        try:
            take_engine_kwargs(kwargs)
        except ConfigError as err:               # raised here, SGLang would only log it: raise it at the attach
            _pending[:] = [err]


def settings_of(server_args) -> EngineSettings:
    return getattr(server_args, ATTR, None) or EngineSettings()


ENGINE = "sglang.srt.entrypoints.engine"
HOOKS = [
    (MODULE + ".add_cli_args", add_cli_args_hook, "after"),
    (MODULE + ".from_cli_args", from_cli_args_hook, "around"),
]
INIT_HOOKS = [(MODULE + ".__init__", init_hook, "around")]        # a dataclass ServerArgs
ENGINE_HOOKS = [(ENGINE + ".Engine.__init__", engine_init_hook, "around"),          # a msgspec ServerArgs
                (ENGINE + "._server_args_for_logging", engine_logging_hook, "before")]


def hooks() -> list:
    from sglang_ams.engine import sglang_compat
    return HOOKS + (ENGINE_HOOKS if sglang_compat.features().struct_server_args else INIT_HOOKS)
