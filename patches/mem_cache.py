"""Hooks on sglang.srt.mem_cache (radix cache, KV release, KV sizing) and on the model runner that builds the
pools.

* The prefix a request matched in the radix tree (cache_protected_len) is pinned: compaction starts after it.
* With --ams-prompt-cache private (default), a policy request's prompt is not inserted into the tree after
  prefill (ChunkCache semantics), so it stays compressible; with "cached" SGLang inserts it and it is pinned.
* A compacted request's KV no longer matches its tokens: it is never inserted into the tree when it finishes.
* The query ring is reserved out of the KV budget before SGLang sizes the pool, and allocated with the pool,
  before CUDA-graph capture.
"""
from __future__ import annotations

import logging

from sglang_ams.engine import request_state
from sglang_ams.engine import ring as ams_ring
from sglang_ams.engine import runtime as ams_runtime
from sglang_ams.engine import settings as ams_settings
from sglang_ams.engine import sglang_compat as compat
from sglang_ams.engine import workspace as ams_workspace
from sglang_ams.heads import HeadRange

logger = logging.getLogger("sglang_ams")
RADIX = "sglang.srt.mem_cache.radix_cache.RadixCache"
_RESERVED: dict = {}        # what the profiling hook reserved (KVCacheConfigurator has __slots__)


def cache_unfinished_req_hook(orig, self, req, *args, **kwargs):
    rt, st = request_state.lookup(req)
    if st is None or rt.settings.prompt_cache == "cached" or self.disable:
        return orig(self, req, *args, **kwargs)
    # Private prompt: keep the request's own KV out of the tree (what ChunkCache does).
    compat.keep_extend_private(req, self.req_to_token_pool.req_to_token)


def checkpoint_kv_cache_hook(orig, req, tree_cache, *args, **kwargs):
    """SGLang with checkpoint(): the same for common.checkpoint_kv_cache (it runs after every prefill chunk)."""
    rt, st = request_state.lookup(req)
    if st is None or rt.settings.prompt_cache == "cached" or tree_cache.disable:
        return orig(req, tree_cache, *args, **kwargs)
    compat.keep_extend_private(req, tree_cache.req_to_token_pool.req_to_token)


def cache_finished_req_hook(orig, self, req, is_insert: bool = True, **kwargs):
    st = request_state.existing_state(req)
    if st is not None and st.compacted:
        is_insert = False
    return orig(self, req, is_insert, **kwargs)


def release_kv_cache_hook(result, req, *args, **kwargs):
    """Finish, abort and retraction all release here: return the ring row, clear the position offset."""
    rt = ams_runtime.get()
    st = request_state.existing_state(req)
    if rt is None or st is None:
        return result
    idx = getattr(req, "_ams_pool_idx", None)
    st.release_ring_row(rt.ring, idx)
    if idx is not None and st.pos_offset:
        rt.pos_offsets[idx] = 0
    return result


def release_kv_cache_before(req, *args, **kwargs):
    # release_kv_cache clears req.req_pool_idx; remember it for the AFTER hook.
    req._ams_pool_idx = compat.pool_idx(req)
    st = request_state.existing_state(req)
    if not compat.features().finished_req and st is not None and st.compacted \
            and compat.release_inserts((req,) + args, kwargs):
        return compat.release_without_insert((req,) + args, kwargs)     # (no cache_finished_req to hook there)
    return None


def _kv_dims(model_config, kv_dtype, tp_size: int = 1) -> dict:
    """Per-rank KV shape numbers the reservations are computed from: a TP rank holds its share of the heads
    (SGLang's rule, sglang_ams/heads.py: at least one KV head, replicated when there are more ranks)."""
    heads = HeadRange.of_rank(0, tp_size, max(1, model_config.num_key_value_heads), model_config.num_attention_heads)
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    return dict(num_kv_heads=heads.kv_count, group=heads.q_count // heads.kv_count, head_dim=head_dim,
                elem_size=kv_dtype.itemsize)


def workspace_bound(settings, dims: dict, context_len: int, kv_bytes: int) -> int:
    """Bytes reserved for a compaction step's temporaries: the operator's --ams-workspace-mib or automatic; never
    below the smallest chunk the planner may have to run (refused at startup if the operator's value is)."""
    smallest = ams_workspace.smallest_chunk(settings.policy, context_len=context_len, **dims)
    if not settings.workspace_mib:
        return ams_workspace.auto_bound(smallest, kv_bytes)
    bound = settings.workspace_mib << 20
    if bound < smallest:
        raise ams_runtime.Unsupported(
            f"--ams-workspace-mib {settings.workspace_mib} is below the smallest compaction step this server may "
            f"run ({-(-smallest >> 20)} MiB: one layer of a {context_len}-token request under its costliest "
            "scorer); raise it, set 0 (automatic) or lower --context-length")
    return bound


def profile_available_bytes_hook(orig, self, *args, **kwargs):
    available = orig(self, *args, **kwargs)
    settings = ams_settings.current()
    if settings is None or not settings.enabled or getattr(self, "is_draft_worker", False):
        return available
    p = settings.policy
    dims = _kv_dims(self.model_config, self.kv_cache_dtype, getattr(getattr(self, "server_args", None), "tp_size", 1))
    bound = workspace_bound(settings, dims, self.model_config.context_len, available)
    _RESERVED["workspace"] = bound     # alloc_memory_pool_hook (same process, next) hands it to the runtime
    ring = 0.0
    if p.needs_queries:
        interval = p.interval - settings.slack_tokens(p.interval)     # rows are lent from trigger - slack - window
        ring = ams_ring.kv_fraction(p.window, dims["group"], p.budget, interval, head_dim=dims["head_dim"])
    credit = credit_fraction(dims) if p.use_credit else 0.0
    kept = int((available - bound) / (1.0 + ring + credit))
    logger.info("sglang-ams: reserving %.1f MiB of the KV budget: query ring %.2f%%, AMS credit %.2f%% of the "
                "pool, compaction workspace %.1f MiB", (available - kept) / 2**20, 100.0 * ring, 100.0 * credit,
                bound / 2**20)
    return kept


def credit_fraction(dims: dict) -> float:
    """AMS keeps an fp32 credit per kept token, layer and KV head (any request may ask for AMS): per pool token
    4 bytes against its K and V, 2 * head_dim * elem_size bytes, layers and heads alike."""
    return 4.0 / (2.0 * dims["head_dim"] * dims["elem_size"])


def alloc_memory_pool_hook(result, self, *args, **kwargs):
    if getattr(self, "is_draft_worker", False):
        return result
    settings = ams_settings.current()
    if settings is None or not settings.enabled:
        return result
    rt = ams_runtime.Runtime.from_model_runner(settings, self)
    bound = _RESERVED.pop("workspace", None)
    if bound is None:       # the profiling hook did not run (a fixed --max-total-tokens path): same rule, pool bytes
        context = getattr(self.model_config, "context_len", None) or self.req_to_token_pool.req_to_token.shape[1]
        bound = workspace_bound(settings, rt.shape.kv_dims(), context, rt.kv_pool_bytes())
    rt.set_workspace(bound)
    ams_runtime.install(rt)
    return result


def tree_hooks() -> list:
    """The tree-cache hooks this SGLang's radix-cache API takes (sglang_compat.Features)."""
    f = compat.features()
    return ([(RADIX + ".cache_unfinished_req", cache_unfinished_req_hook, "around")] if f.unfinished_req else []) \
        + ([(RADIX + ".cache_finished_req", cache_finished_req_hook, "around")] if f.finished_req else []) \
        + ([("sglang.srt.mem_cache.common.checkpoint_kv_cache", checkpoint_kv_cache_hook, "around")]
           if f.checkpoint else [])


HOOKS = [
    ("sglang.srt.mem_cache.common.release_kv_cache", release_kv_cache_before, "before"),
    ("sglang.srt.mem_cache.common.release_kv_cache", release_kv_cache_hook, "after"),
    ("sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._profile_available_bytes",
     profile_available_bytes_hook, "around"),
    ("sglang.srt.model_executor.model_runner.ModelRunner.alloc_memory_pool", alloc_memory_pool_hook, "after"),
]
