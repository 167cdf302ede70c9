"""Release after compaction through SGLang's release_kv_cache, and the Runtime from the pool hook."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sglang.srt.mem_cache import common as sgl_common
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache

from sglang_ams.engine import request_state
from sglang_ams.engine import runtime as ams_runtime
from sglang_ams.engine import sglang_compat as compat
from sglang_ams.engine.settings import ENV_VAR, EngineSettings
from sglang_ams.patches import mem_cache as mem_hooks
from sglang_ams.patches import schedule_batch as batch_hooks

from .checks import free_slots, step
from .harness import (CFG, HEAD_DIM, KV_HEADS, LAYERS, MARKS, POOL_TOKENS, Q_HEADS, SHARED, add_request,
                      cache_prefix, make_batch, make_env)

pytestmark = MARKS


@pytest.fixture
def wired_release(monkeypatch):
    """SGLang's release_kv_cache with our hooks applied as HookRegistry would (scoped to the test): the hooks
    this SGLang's tables hold, called with the keyword its release_kv_cache takes."""
    f = compat.features()
    if f.finished_req:
        real_finished = RadixCache.cache_finished_req

        def cache_finished_req(self, req, is_insert=True, **kwargs):
            return mem_hooks.cache_finished_req_hook(real_finished, self, req, is_insert, **kwargs)
        monkeypatch.setattr(RadixCache, "cache_finished_req", cache_finished_req)

    def release(req, tree, insert=True):
        args, kwargs = (req, tree), {f.release_flag: insert}
        changed = mem_hooks.release_kv_cache_before(*args, **kwargs)
        if changed is not None:
            args, kwargs = changed
        return mem_hooks.release_kv_cache_hook(sgl_common.release_kv_cache(*args, **kwargs), *args, **kwargs)
    return release


def test_release_after_compaction(wired_release):
    """Finish, retraction and finish-uncompacted through SGLang's release_kv_cache (paged pool, radix tree):
    ring rows and offsets come back, compacted KV never enters the tree, and nothing leaks."""
    env = make_env(page_size=16)
    cache_prefix(env, SHARED)
    short = add_request(env, "short", SHARED[:16] + list(range(3000, 3014)), pinned=16)
    long = add_request(env, "long", list(range(2000, 2046)))
    pinned = add_request(env, "pinned", SHARED + list(range(4000, 4052)), pinned=32)
    batch = make_batch(env, [short, long, pinned])
    for _ in range(19):           # long compacts at step 11 and holds a fresh ring row from step 19
        step(env, batch)
    st = request_state.existing_state(long)
    assert st.compacted and st.ring_row and st.pos_offset == 16
    rows_free = env.rt.ring.free_rows
    long_tokens = list(long.origin_input_ids) + list(long.output_ids)

    # Finish: compacted KV must not enter the tree; ring row and offset are returned.
    idx = compat.pool_idx(long)
    wired_release(long, env.tree)
    assert compat.pool_idx(long) is None and idx in env.req_pool.free_slots
    assert st.ring_row == 0 and env.rt.ring.free_rows == rows_free + 1 and int(env.rt.ring.row_of[idx]) == 0
    assert int(env.rt.pos_offsets[idx]) == 0
    assert len(compat.match_prefix(env.tree, long_tokens)[0]) == 0
    # Retraction of the compacted pinned request: nothing inserted, state starts over (re-prefill).
    idx = compat.pool_idx(pinned)
    wired_release(pinned, env.tree, insert=False)
    pinned.reset_for_retract()
    batch_hooks.reset_for_retract_hook(None, pinned)
    fresh = request_state.existing_state(pinned)
    assert fresh.pos_offset == 0 and not fresh.compacted and fresh.ring_row == 0 and fresh.cfg == CFG
    assert int(env.rt.pos_offsets[idx]) == 0
    # A request that was never compacted is cached as usual (its KV still matches its tokens).
    short_tokens = list(short.origin_input_ids) + list(short.output_ids)
    wired_release(short, env.tree)
    cached = compat.match_prefix(env.tree, short_tokens)[0]
    assert len(cached) == len(short_tokens) // 16 * 16
    # Idle: SGLang's own leak rule, available + tree == pool, every ring row back, no lock left.
    assert env.tree.protected_size() == 0
    assert env.allocator.available_size() + env.tree.evictable_size() == POOL_TOKENS
    assert env.rt.ring.free_rows == env.rt.ring.rows
    free_slots(env)                   # and no page is free twice


def test_runtime_from_the_pool_hook(monkeypatch):
    """The alloc_memory_pool hook builds the Runtime from SGLang's real pool and allocator, and refuses a pool
    it cannot compact."""
    from sglang.srt.layers.radix_attention import RadixAttention
    from transformers import LlamaConfig
    settings = EngineSettings(policy=CFG)
    monkeypatch.setenv(ENV_VAR, settings.to_json())
    pool = MHATokenToKVPool(POOL_TOKENS, 16, torch.bfloat16, KV_HEADS, HEAD_DIM, LAYERS, device="cpu",
                            enable_memory_saver=False)
    hf = LlamaConfig(hidden_size=Q_HEADS * HEAD_DIM, num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS,
                     num_hidden_layers=LAYERS)
    runner = SimpleNamespace(
        is_draft_worker=False, token_to_kv_pool=pool, device="cpu", max_total_num_tokens=POOL_TOKENS,
        token_to_kv_pool_allocator=PagedTokenToKVPoolAllocator(POOL_TOKENS, 16, torch.bfloat16, "cpu", pool, False),
        req_to_token_pool=ReqToTokenPool(size=8, max_context_len=256, device="cpu", enable_memory_saver=False),
        model_config=SimpleNamespace(hf_config=hf, is_multimodal=False, is_encoder_decoder=False),
        model=torch.nn.ModuleList([RadixAttention(Q_HEADS, HEAD_DIM, HEAD_DIM ** -0.5, KV_HEADS, i)
                                   for i in range(LAYERS)]))
    mem_hooks.alloc_memory_pool_hook(None, runner)
    rt = ams_runtime.get()
    assert rt is not None and rt.page_size == 16 and rt.shape.num_q_heads == Q_HEADS
    assert rt.slot_stride == KV_HEADS * HEAD_DIM and rt.ring.rows == ams_runtime.ring_rows_for(settings, POOL_TOKENS)
    assert rt.k_ptrs.tolist() == [b.data_ptr() for b in pool.k_buffer]
    # The compaction workspace is bounded (here: no profiling ran, so from the pool bytes and the context of
    # req_to_token, 256 tokens) and never below one layer of one request at that length.
    assert 0 < rt.workspace_bytes < 1 << 40 and rt.counters.workspace_bound_bytes == rt.workspace_bytes
    fp32 = MHATokenToKVPool(64, 1, torch.float32, KV_HEADS, HEAD_DIM, LAYERS, device="cpu", enable_memory_saver=False)
    with pytest.raises(ams_runtime.Unsupported, match="dtype"):
        ams_runtime.check_pool(fp32, TokenToKVPoolAllocator(64, torch.float32, "cpu", fp32, False))
