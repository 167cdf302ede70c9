"""The engine tests' SGLang world: pools, allocator, radix cache, requests and batches as SGLang builds them,
the Runtime as our pool hook builds it, and the model's part of a decode or prefill step (see __init__.py)."""
from __future__ import annotations

import dataclasses
import math
from array import array
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

from sglang_ams.config import PolicyConfig
from sglang_ams.engine import compactor as compactor_mod
from sglang_ams.engine import request_state
from sglang_ams.engine import runtime as ams_runtime
from sglang_ams.engine import sglang_compat as compat
from sglang_ams.engine.compactor import Compactor
from sglang_ams.engine.settings import EngineSettings
from sglang_ams.patches import flashinfer_decode as fi_hooks
from sglang_ams.patches import forward_batch as fb_hooks
from sglang_ams.patches import prefill_window as pw_hooks
from sglang_ams.patches import radix_attention as attn_hooks
from sglang_ams.rope import RopeSpec, inv_freq_from_config

# The interpreter converts 1-element arrays to ints in range() bounds (a numpy deprecation, not ours).
MARKS = [pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
         pytest.mark.sglang_api]

LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM = 2, 2, 4, 32          # GQA group 2
POOL_TOKENS = 1024
# Small numbers so a few dozen decode steps reach two compactions: cap = prefix + 40 + 16, ring from cap - 8.
CFG = PolicyConfig(policy="ams", scorer="snapkv", budget=40, interval=16, window=8, sink=4, keep_lastn=8,
                   delta=0.1, lmin=4, lmax=32, qmin=2, pool_kernel=3)
SHARED = list(range(1000, 1032))     # a 32-token prompt prefix that sits in the radix tree (two 16-token pages)

@dataclasses.dataclass
class Env:
    rt: ams_runtime.Runtime
    compactor: Compactor
    kv_pool: MHATokenToKVPool
    req_pool: ReqToTokenPool
    allocator: object
    tree: object                # the default tree cache of this SGLang (RadixCache, or UnifiedRadixCache)
    gen: torch.Generator
    tree_slots: set = dataclasses.field(default_factory=set)
    queries: dict = dataclasses.field(default_factory=dict)  # rid -> {logical position: [L, Hq, d]}
    dropped: dict = dataclasses.field(default_factory=dict)  # rid -> tokens dropped so far
    freed: list = dataclasses.field(default_factory=list)    # slots freed by each compaction step
    lse_chunks: int = 0         # chunks so far that could score with the decode attention's LSE
    lse_chunks_before_step: int = 0     # ... before the current step

    @property
    def page_size(self) -> int:
        return self.allocator.page_size

    @property
    def r2t(self) -> torch.Tensor:
        return self.req_pool.req_to_token



def make_env(*, trace=True, page_size=1, dtype=torch.bfloat16, policy=CFG, ring_rows=0, seed=0, batch_slack=0.0,
             scoring_lse="decode", debug_checks=True, heads=None, step_requests=0, ring_store="torch",
             selection="torch", pool_tokens=POOL_TOKENS, req_slots=8, max_context=256) -> Env:
    """Pools, allocator and radix cache as SGLang builds them, and the Runtime as our alloc_memory_pool hook does.
    `trace`: the compactor keeps what each selection got in its report (checks.check_selection reads it).
    `heads`: a tensor-parallel rank's HeadRange (its pool holds heads.kv_count heads); default all heads.
    `pool_tokens`, `req_slots`, `max_context`: pool sizes (benchmarks/scheduler_host.py holds hundreds of requests)."""
    gen = torch.Generator().manual_seed(seed)
    kv_heads, q_heads = (KV_HEADS, Q_HEADS) if heads is None else (heads.kv_count, heads.q_count)
    kv_pool = MHATokenToKVPool(pool_tokens, page_size, dtype, kv_heads, HEAD_DIM, LAYERS, device="cpu",
                               enable_memory_saver=False)
    for buf in kv_pool.k_buffer + kv_pool.v_buffer:     # free slots hold data too: a stray read shows
        buf.copy_(torch.randn(buf.shape, generator=gen))
    req_pool = ReqToTokenPool(size=req_slots, max_context_len=max_context, device="cpu", enable_memory_saver=False)
    if page_size == 1:
        allocator = TokenToKVPoolAllocator(pool_tokens, dtype, "cpu", kv_pool, need_sort=False)
    else:
        allocator = PagedTokenToKVPoolAllocator(pool_tokens, page_size, dtype, "cpu", kv_pool, need_sort=False)
    tree = compat.make_radix_cache(req_pool, allocator, page_size)
    settings = EngineSettings(policy=policy, ring_rows=ring_rows, debug_checks=debug_checks, batch_slack=batch_slack,
                              scoring_lse=scoring_lse, step_requests=step_requests, ring_store=ring_store,
                              selection=selection)
    shape = ams_runtime.ModelShape(num_layers=LAYERS, start_layer=0, num_kv_heads=kv_heads, num_q_heads=q_heads,
                                   head_dim=HEAD_DIM, dtype=dtype, scale=HEAD_DIM ** -0.5, heads=heads)
    rt = ams_runtime.Runtime(settings, shape, kv_pool, req_pool, allocator, tiny_rope(),
                             ams_runtime.ring_rows_for(settings, pool_tokens))
    ams_runtime.install(rt)
    return Env(rt, Compactor(rt, trace=trace), kv_pool, req_pool, allocator, tree, gen)


def tiny_rope() -> RopeSpec:
    from transformers import LlamaConfig
    config = LlamaConfig(hidden_size=Q_HEADS * HEAD_DIM, num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS,
                         num_hidden_layers=LAYERS)
    return RopeSpec(inv_freq=inv_freq_from_config(config))


def random_kv(env: Env, slots: torch.Tensor) -> None:
    for buf in env.kv_pool.k_buffer + env.kv_pool.v_buffer:
        buf[slots] = torch.randn(len(slots), *buf.shape[1:], generator=env.gen).to(buf.dtype)


def alloc_slots(env: Env, n: int) -> torch.Tensor:
    """n slots for row positions starting at a page boundary: whole pages from the paged allocator."""
    ps = env.page_size
    slots = env.allocator.alloc(-(-n // ps) * ps)
    assert slots is not None
    return slots[:n]


def cache_prefix(env: Env, tokens: list) -> None:
    """Put a prompt prefix into the radix tree (what an earlier request's prefill would have left there)."""
    slots = alloc_slots(env, len(tokens))
    random_kv(env, slots)
    compat.insert_prefix(env.tree, tokens, slots)
    env.tree_slots |= set(slots.tolist())


def add_request(env: Env, rid: str, tokens: list, *, pinned: int = 0, override=None) -> Req:
    """A request right after prefill: `pinned` tokens matched (and locked) in the tree, the rest private."""
    custom = None if override is None else {request_state.REQUEST_KEY: override}
    req = Req(rid, "", array("q", tokens), SamplingParams(max_new_tokens=4096, custom_params=custom))
    env.req_pool.alloc([req])
    row = compat.pool_idx(req)
    if pinned:
        indices = compat.lock_prefix(env.tree, req, tokens)
        assert len(indices) == pinned
        env.r2t[row, :pinned] = indices.to(torch.int32)
    own = alloc_slots(env, len(tokens) - pinned)
    random_kv(env, own)
    env.r2t[row, pinned:len(tokens)] = own.to(torch.int32)
    compat.set_kv_lengths(req, len(tokens))
    env.queries[rid] = {}
    env.dropped[rid] = 0
    return req


def make_batch(env: Env, reqs: list) -> ScheduleBatch:
    lens = [compat.committed_len(r) for r in reqs]
    return ScheduleBatch(
        reqs=reqs, req_to_token_pool=env.req_pool, token_to_kv_pool_allocator=env.allocator, tree_cache=env.tree,
        device="cpu", spec_algorithm=SpeculativeAlgorithm.NONE,
        # prepare_for_decode reads model_config.is_encoder_decoder and the penalizer flag only.
        model_config=SimpleNamespace(is_encoder_decoder=False),
        sampling_info=SimpleNamespace(penalizer_orchestrator=SimpleNamespace(is_required=False)),
        req_pool_indices=torch.tensor([compat.pool_idx(r) for r in reqs], dtype=torch.int64),
        seq_lens=torch.tensor(lens, dtype=torch.int64), seq_lens_cpu=torch.tensor(lens, dtype=torch.int64),
        orig_seq_lens=torch.tensor(lens, dtype=torch.int32))


def forward(env: Env, batch: ScheduleBatch, q: torch.Tensor | None = None, tokens: list | None = None,
            write_kv: bool = True):
    """The model's part of a decode step: new K/V at out_cache_loc, queries into the ring, one output token.
    `q` [L, B, Hq * d] and `tokens` [B]: given (a TP rank's share of another process's step), else drawn;
    write_kv=False: the caller wrote the new K/V. Returns (q, tokens)."""
    ams_runtime.install(env.rt)         # (the hooks read the process's runtime)
    if write_kv:
        random_kv(env, batch.out_cache_loc)
    fb = SimpleNamespace(forward_mode=ForwardMode.DECODE, req_pool_indices=batch.req_pool_indices,
                         positions=(batch.seq_lens - 1).clamp(min=0))       # what ForwardBatch.init_new computes
    fb = fb_hooks.init_new_hook(fb, None, batch, None)
    for i, req in enumerate(batch.reqs):    # positions are logical: the token's index in prompt + output
        assert int(fb.positions[i]) == len(req.origin_input_ids) + len(req.output_ids), req.rid
    hq = env.rt.shape.num_q_heads
    if q is None:
        q = torch.randn(LAYERS, len(batch.reqs), hq * HEAD_DIM, generator=env.gen).to(env.rt.shape.dtype)
    for layer in range(LAYERS):
        wrapper = DecodeAttention(env, batch, layer)

        def attend(*_args, **_kwargs):      # SGLang's FlashInfer backend calls the wrapper's (deprecated) forward
            return fi_hooks.forward_hook(wrapper.forward_without_lse, wrapper, q[layer].view(-1, hq, HEAD_DIM),
                                         None, sm_scale=env.rt.shape.scale)
        attn_hooks.forward_hook(attend, SimpleNamespace(layer_id=layer), q[layer], None, None, fb)
        assert env.rt.ring is None or env.rt.ring.pending is None
    if tokens is None:
        tokens = [int(torch.randint(0, 999, (1,), generator=env.gen)) for _ in batch.reqs]
    for i, req in enumerate(batch.reqs):
        env.queries[req.rid][int(fb.positions[i])] = q[:, i].view(LAYERS, hq, HEAD_DIM)
        req.output_ids.append(tokens[i])
    return q, tokens


class DecodeAttention:
    """Stand-in for FlashInfer's decode wrapper of one layer: only the LSE matters here, computed the way
    FlashInfer reports it (log2 units) over each request's keys at this step."""

    def __init__(self, env: Env, batch: ScheduleBatch, layer: int):
        self.env, self.batch, self.layer = env, batch, layer
        self.calls_without_lse = 0

    def forward_without_lse(self, *args, **kwargs):
        self.calls_without_lse += 1
        ring = self.env.rt.ring
        assert ring is None or self.env.rt.settings.scoring_lse == "recompute" or ring.free_rows == ring.rows, \
            "the hook skipped the LSE while a request holds a ring row"

    def run(self, q, paged_kv_cache, *, q_scale=None, k_scale=None, v_scale=None, return_lse=False):
        assert return_lse and self._sm_scale == self.env.rt.shape.scale
        lses = []
        for i, req in enumerate(self.batch.reqs):
            slots = self.env.r2t[compat.pool_idx(req), : int(self.batch.seq_lens[i])].long()
            keys = self.env.kv_pool.k_buffer[self.layer][slots].float()                  # [T, H, d]
            shape = self.env.rt.shape
            qi = q[i].float().view(shape.num_kv_heads, shape.group_size, HEAD_DIM)
            logits = torch.einsum("hgd,thd->hgt", qi, keys) * self._sm_scale
            lses.append(torch.logsumexp(logits, -1).reshape(-1) / math.log(2.0))
        return torch.zeros_like(q), torch.stack(lses)



def prefill(env: Env, reqs: list) -> int:
    """What a prefill batch does for the query ring: our prepare_for_extend hook on the batch, then the extend
    forward's attention-backend hook over each request's uncached tokens (its pinned prefix was cached)."""
    lengths = [compat.committed_len(r) for r in reqs]
    extend = [n - compat.protected_len(r) for r, n in zip(reqs, lengths)]
    batch = SimpleNamespace(reqs=reqs, seq_lens_cpu=torch.tensor(lengths), extend_lens=extend)
    taken = compactor_mod.take_prefill_rows(env.rt, batch)
    starts = torch.tensor([0] + extend[:-1]).cumsum(0)
    positions = torch.cat([torch.arange(compat.protected_len(r), n) for r, n in zip(reqs, lengths)])
    fb = SimpleNamespace(forward_mode=ForwardMode.EXTEND, extend_start_loc=starts.to(torch.int32),
                         extend_seq_lens=torch.tensor(extend, dtype=torch.int32), positions=positions,
                         req_pool_indices=torch.tensor([compat.pool_idx(r) for r in reqs]))
    q = torch.randn(LAYERS, len(positions), Q_HEADS * HEAD_DIM, generator=env.gen).to(env.rt.shape.dtype)
    for layer in range(LAYERS):     # the RadixAttention hook leaves extends alone; the backend hook writes
        assert attn_hooks.forward_hook(lambda *a, **k: "attended", SimpleNamespace(layer_id=layer), q[layer],
                                       None, None, fb) == "attended"
        assert pw_hooks.forward_extend_before(None, q[layer], None, None, SimpleNamespace(layer_id=layer), fb) is None
    owner = torch.repeat_interleave(torch.arange(len(reqs)), torch.tensor(extend))
    for t, pos in enumerate(positions.tolist()):
        env.queries[reqs[int(owner[t])].rid][pos] = q[:, t].view(LAYERS, Q_HEADS, HEAD_DIM)
    return taken



def cfg_override(cfg: PolicyConfig) -> dict:
    return {"policy": cfg.policy, "scorer": cfg.scorer}


