"""The compaction step's bookkeeping against real SGLang 0.5.17 objects on CPU (Triton under TRITON_INTERPRET).

Real SGLang objects: MHATokenToKVPool, ReqToTokenPool, TokenToKVPoolAllocator / PagedTokenToKVPoolAllocator,
RadixCache (holds the pinned prefixes), Req, ScheduleBatch, and SGLang's own `prepare_for_decode` (allocates the
next decode slot and bumps every length) and `release_kv_cache`. Stand-ins, only where SGLang needs a model:
`model_config` / `sampling_info` on the batch (prepare_for_decode reads one flag of each), the ForwardBatch and
attention layer handed to our forward / ring hooks, and the model itself (random K/V and queries, never zeros).

The loop each test drives is the scheduler's: Compactor.step (what our update_running_batch hook runs), then
prepare_for_decode, then a "forward" that writes the new token's K/V, records its query in the ring through the
RadixAttention hook (positions through the ForwardBatch hook) and appends an output token. Every compaction is
checked the same way (`check_compaction`): moved data, untouched bytes, freed slots, lengths, offsets.
"""
from __future__ import annotations

import dataclasses
import math
from array import array
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch

pytest.importorskip("sglang.srt.mem_cache.memory_pool")

from sglang.srt.managers.schedule_batch import Req, ScheduleBatch  # noqa: E402
from sglang.srt.mem_cache import common as sgl_common  # noqa: E402
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixCache  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm  # noqa: E402

from sglang_ams.compaction import gather_kept, plan, scorer_for  # noqa: E402
from sglang_ams.config import PolicyConfig  # noqa: E402
from sglang_ams.engine import admission, request_state, workspace  # noqa: E402
from sglang_ams.engine import compactor as compactor_mod  # noqa: E402
from sglang_ams.engine import runtime as ams_runtime  # noqa: E402
from sglang_ams.engine import sglang_compat as compat  # noqa: E402
from sglang_ams.engine.compactor import Compactor  # noqa: E402
from sglang_ams.engine.settings import ENV_VAR, EngineSettings  # noqa: E402
from sglang_ams.patches import flashinfer_decode as fi_hooks  # noqa: E402
from sglang_ams.patches import forward_batch as fb_hooks  # noqa: E402
from sglang_ams.patches import mem_cache as mem_hooks  # noqa: E402
from sglang_ams.patches import prefill_window as pw_hooks  # noqa: E402
from sglang_ams.patches import radix_attention as attn_hooks  # noqa: E402
from sglang_ams.patches import schedule_batch as batch_hooks  # noqa: E402
from sglang_ams.patches import schedule_policy as policy_hooks  # noqa: E402
from sglang_ams.rope import RopeSpec, inv_freq_from_config  # noqa: E402
from sglang_ams.scorers.base import ScoreInputs  # noqa: E402
from sglang_ams.window_attention import window_attention  # noqa: E402

# The interpreter converts 1-element arrays to ints in range() bounds (a numpy deprecation, not ours).
pytestmark = [pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
              pytest.mark.sglang_api]

LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM = 2, 2, 4, 32          # GQA group 2
POOL_TOKENS = 1024
# Small numbers so a few dozen decode steps reach two compactions: cap = prefix + 40 + 16, ring from cap - 8.
CFG = PolicyConfig(policy="ams", scorer="snapkv", budget=40, interval=16, window=8, sink=4, keep_lastn=8,
                   delta=0.1, lmin=4, lmax=32, qmin=2, pool_kernel=3)
SHARED = list(range(1000, 1032))     # a 32-token prompt prefix that sits in the radix tree (two 16-token pages)


# ---------------------------------------------------------------------------------------------- environment

class Item(NamedTuple):
    """A request of a compaction group, as the compactor saw it."""
    rid: str
    row: int               # req_pool_idx
    length: int            # physical length before compaction
    prefix: int            # cache_protected_len
    keep: int              # tokens kept per (layer, head)
    pinned: int            # max(prefix, sink)


@dataclasses.dataclass
class Group:
    """One `_compact_group` call: its requests as they were, and what `plan` got and returned."""
    items: list[Item]
    cfg: PolicyConfig
    inputs: ScoreInputs
    n_pinned: torch.Tensor
    n_keep: torch.Tensor
    credit: torch.Tensor | None
    sel: object
    decode_lse: bool = False       # the scoring took the window queries' LSE from the decode attention
    ring_lse: bool = True          # every window query of the group came with its decode LSE (no prefill rows)


@dataclasses.dataclass
class Env:
    rt: ams_runtime.Runtime
    compactor: Compactor
    kv_pool: MHATokenToKVPool
    req_pool: ReqToTokenPool
    allocator: object
    tree: object                # the default tree cache of this SGLang (RadixCache, or UnifiedRadixCache)
    gen: torch.Generator
    groups: list                                             # filled by the recording fixture
    tree_slots: set = dataclasses.field(default_factory=set)
    queries: dict = dataclasses.field(default_factory=dict)  # rid -> {logical position: [L, Hq, d]}
    dropped: dict = dataclasses.field(default_factory=dict)  # rid -> tokens dropped so far
    freed: list = dataclasses.field(default_factory=list)    # slots freed by each compaction step

    @property
    def page_size(self) -> int:
        return self.allocator.page_size

    @property
    def r2t(self) -> torch.Tensor:
        return self.req_pool.req_to_token


@pytest.fixture(autouse=True)
def _published_server_args(sglang_context):
    """Every test here runs under conftest's sglang_context."""
    yield


@pytest.fixture
def recorded(monkeypatch):
    """Record every compaction group and the selection `plan` made for it (the real plan still runs)."""
    groups: list = []
    pending: list = []
    real_plan, real_group = compactor_mod.plan, Compactor._compact_group

    def recording_plan(cfg, scorer, inputs, n_pinned, n_keep, credit=None, k_max=None):
        sel = real_plan(cfg, scorer, inputs, n_pinned, n_keep, credit, k_max=k_max)
        pending.append((cfg, inputs, n_pinned.clone(), n_keep.clone(), None if credit is None else credit.clone(), sel))
        return sel

    def recording_group(self, items, layers=None):
        snap = [Item(d.req.rid, compat.pool_idx(d.req), d.length, d.prefix, d.keep, d.pinned) for d in items]
        before = self.rt.counters.decode_lse_launches
        ring_lse = all(d.state.ring_lse for d in items)
        real_group(self, items, layers)
        cfg, inputs, n_pinned, n_keep, credit, sel = pending.pop()
        used = self.rt.counters.decode_lse_launches > before
        groups.append(Group(snap, cfg, inputs, n_pinned, n_keep, credit, sel, used, ring_lse))

    monkeypatch.setattr(compactor_mod, "plan", recording_plan)
    monkeypatch.setattr(Compactor, "_compact_group", recording_group)
    return groups


def make_env(groups, *, page_size=1, dtype=torch.bfloat16, policy=CFG, ring_rows=0, seed=0, batch_slack=0.0,
             scoring_lse="decode", debug_checks=True) -> Env:
    """Pools, allocator and radix cache as SGLang builds them, and the Runtime as our alloc_memory_pool hook does."""
    gen = torch.Generator().manual_seed(seed)
    kv_pool = MHATokenToKVPool(POOL_TOKENS, page_size, dtype, KV_HEADS, HEAD_DIM, LAYERS, device="cpu",
                               enable_memory_saver=False)
    for buf in kv_pool.k_buffer + kv_pool.v_buffer:     # free slots hold data too: a stray read shows
        buf.copy_(torch.randn(buf.shape, generator=gen))
    req_pool = ReqToTokenPool(size=8, max_context_len=256, device="cpu", enable_memory_saver=False)
    if page_size == 1:
        allocator = TokenToKVPoolAllocator(POOL_TOKENS, dtype, "cpu", kv_pool, need_sort=False)
    else:
        allocator = PagedTokenToKVPoolAllocator(POOL_TOKENS, page_size, dtype, "cpu", kv_pool, need_sort=False)
    tree = compat.make_radix_cache(req_pool, allocator, page_size)
    settings = EngineSettings(policy=policy, ring_rows=ring_rows, debug_checks=debug_checks, batch_slack=batch_slack,
                              scoring_lse=scoring_lse)
    shape = ams_runtime.ModelShape(num_layers=LAYERS, start_layer=0, num_kv_heads=KV_HEADS, num_q_heads=Q_HEADS,
                                   head_dim=HEAD_DIM, dtype=dtype, scale=HEAD_DIM ** -0.5)
    rt = ams_runtime.Runtime(settings, shape, kv_pool, req_pool, allocator, tiny_rope(),
                             ams_runtime.ring_rows_for(settings, POOL_TOKENS))
    ams_runtime.install(rt)
    return Env(rt, Compactor(rt), kv_pool, req_pool, allocator, tree, gen, groups)


def tiny_rope() -> RopeSpec:
    from transformers import LlamaConfig
    config = LlamaConfig(hidden_size=Q_HEADS * HEAD_DIM, num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS,
                         num_hidden_layers=LAYERS)
    return RopeSpec(inv_freq=inv_freq_from_config(config))


def random_kv(env: Env, slots: torch.Tensor) -> None:
    for buf in env.kv_pool.k_buffer + env.kv_pool.v_buffer:
        buf[slots] = torch.randn(len(slots), KV_HEADS, HEAD_DIM, generator=env.gen).to(buf.dtype)


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


def forward(env: Env, batch: ScheduleBatch) -> None:
    """The model's part of a decode step: new K/V at out_cache_loc, queries into the ring, one output token."""
    random_kv(env, batch.out_cache_loc)
    fb = SimpleNamespace(forward_mode=ForwardMode.DECODE, req_pool_indices=batch.req_pool_indices,
                         positions=(batch.seq_lens - 1).clamp(min=0))       # what ForwardBatch.init_new computes
    fb = fb_hooks.init_new_hook(fb, None, batch, None)
    for i, req in enumerate(batch.reqs):    # positions are logical: the token's index in prompt + output
        assert int(fb.positions[i]) == len(req.origin_input_ids) + len(req.output_ids), req.rid
    q = torch.randn(LAYERS, len(batch.reqs), Q_HEADS * HEAD_DIM, generator=env.gen).to(env.rt.shape.dtype)
    for layer in range(LAYERS):
        wrapper = DecodeAttention(env, batch, layer)

        def attend(*_args, **_kwargs):      # SGLang's FlashInfer backend calls the wrapper's (deprecated) forward
            return fi_hooks.forward_hook(wrapper.forward_without_lse, wrapper, q[layer].view(-1, Q_HEADS, HEAD_DIM),
                                         None, sm_scale=env.rt.shape.scale)
        attn_hooks.forward_hook(attend, SimpleNamespace(layer_id=layer), q[layer], None, None, fb)
        assert env.rt.ring is None or env.rt.ring.pending is None
    for i, req in enumerate(batch.reqs):
        env.queries[req.rid][int(fb.positions[i])] = q[:, i].view(LAYERS, Q_HEADS, HEAD_DIM)
        req.output_ids.append(int(torch.randint(0, 999, (1,), generator=env.gen)))


class DecodeAttention:
    """Stand-in for FlashInfer's decode wrapper of one layer: only the LSE matters here, computed the way
    FlashInfer reports it (log2 units) over each request's keys at this step."""

    def __init__(self, env: Env, batch: ScheduleBatch, layer: int):
        self.env, self.batch, self.layer = env, batch, layer
        self.calls_without_lse = 0

    def forward_without_lse(self, *args, **kwargs):
        self.calls_without_lse += 1
        assert self.env.rt.settings.scoring_lse == "recompute", "the hook skipped the LSE"

    def run(self, q, paged_kv_cache, *, q_scale=None, k_scale=None, v_scale=None, return_lse=False):
        assert return_lse and self._sm_scale == self.env.rt.shape.scale
        lses = []
        for i, req in enumerate(self.batch.reqs):
            slots = self.env.r2t[compat.pool_idx(req), : int(self.batch.seq_lens[i])].long()
            keys = self.env.kv_pool.k_buffer[self.layer][slots].float()                  # [T, H, d]
            qi = q[i].float().view(KV_HEADS, Q_HEADS // KV_HEADS, HEAD_DIM)
            logits = torch.einsum("hgd,thd->hgt", qi, keys) * self._sm_scale
            lses.append(torch.logsumexp(logits, -1).reshape(-1) / math.log(2.0))
        return torch.zeros_like(q), torch.stack(lses)


# ---------------------------------------------------------------------------------------------- checks

@dataclasses.dataclass
class Snap:
    k: list
    v: list
    r2t: torch.Tensor
    free: set
    seq_lens: torch.Tensor
    seq_lens_cpu: torch.Tensor
    orig_seq_lens: torch.Tensor
    committed: dict
    allocated: dict
    credit: dict
    counters: tuple


def snapshot(env: Env, batch: ScheduleBatch) -> Snap:
    states = {r.rid: request_state.existing_state(r) for r in batch.reqs}
    c = env.rt.counters
    return Snap([b.clone() for b in env.kv_pool.k_buffer], [b.clone() for b in env.kv_pool.v_buffer], env.r2t.clone(),
                free_slots(env), batch.seq_lens.clone(), batch.seq_lens_cpu.clone(), batch.orig_seq_lens.clone(),
                {r.rid: compat.committed_len(r) for r in batch.reqs},
                {r.rid: compat.allocated_len(r) for r in batch.reqs},
                {rid: None if st is None or st.credit is None else st.credit.clone() for rid, st in states.items()},
                (c.compactions, c.tokens_freed))


def free_slots(env: Env) -> set:
    """Every slot the allocator holds; fails on a page or slot held twice (a double free)."""
    a = env.allocator
    ids = compat.free_page_ids(a)
    assert ids.unique().numel() == ids.numel(), "the allocator holds a slot or page twice (double free)"
    if a.page_size > 1:
        ids = (ids[:, None] * a.page_size + torch.arange(a.page_size)).reshape(-1)
    return set(ids.tolist())


def page_slots(env: Env, slots) -> set:
    """The slots of every page that `slots` touch (page size 1: the slots themselves)."""
    ps = env.page_size
    return {p * ps + i for p in {int(s) // ps for s in slots} for i in range(ps)}


def check_no_leak(env: Env, reqs: list) -> None:
    """Every slot is either free or referenced (by a live row or the tree), never both, never neither."""
    live = set(env.tree_slots)
    for r in reqs:
        live |= page_slots(env, env.r2t[compat.pool_idx(r), :compat.allocated_len(r)].tolist())
    free = free_slots(env)
    assert not free & live, "slots both free and in use"
    assert len(free) == env.allocator.available_size()
    assert len(free) + len(live) == POOL_TOKENS, "leaked slots"


def dense(buffers: list, r2t: torch.Tensor, row: int, length: int) -> torch.Tensor:
    """[L, H, T, d] of one request, position order, read with plain torch indexing."""
    slots = r2t[row, :length].long()
    return torch.stack([b[slots].transpose(0, 1) for b in buffers])


def padded(xs: list) -> torch.Tensor:
    t = max(x.shape[2] for x in xs)
    return torch.stack([torch.nn.functional.pad(x, (0, 0, 0, t - x.shape[2])) for x in xs])


def window_queries(env: Env, rid: str, newest: int, window: int) -> torch.Tensor:
    """[L, Hq, W, d]: the queries the forward wrote for the last `window` logical positions, oldest first."""
    return torch.stack([env.queries[rid][p] for p in range(newest - window + 1, newest + 1)], dim=2)


def check_selection(env: Env, g: Group, snap: Snap) -> None:
    """What plan got (keys, queries, positions, attention) and chose, against torch on the pre-compaction pool."""
    cfg, w = g.cfg, g.cfg.window
    keys = [dense(snap.k, snap.r2t, it.row, it.length) for it in g.items]
    values = [dense(snap.v, snap.r2t, it.row, it.length) for it in g.items]
    lengths = torch.tensor([it.length for it in g.items])
    for j, it in enumerate(g.items):
        assert int(g.n_keep[j]) == it.keep == it.prefix + cfg.budget
        assert int(g.n_pinned[j]) == it.pinned == max(it.prefix, cfg.sink)
        if cfg.inputs.keys:             # the Triton gather read the same keys (and values) where declared
            assert torch.equal(g.inputs.keys[j, :, :, :it.length], keys[j])
        if cfg.inputs.values:
            assert torch.equal(g.inputs.values[j, :, :, :it.length], values[j])
    queries = query_pos = None
    if cfg.needs_queries:
        newest = [it.length - 1 + env.dropped[it.rid] for it in g.items]     # logical position of "now"
        queries = torch.stack([window_queries(env, it.rid, n, w) for it, n in zip(g.items, newest)])
        query_pos = torch.tensor([list(range(n - w + 1, n + 1)) for n in newest])
        assert torch.equal(g.inputs.queries, queries), "the ring returned other queries (or another order)"
        assert torch.equal(g.inputs.query_pos, query_pos)
    reference = ScoreInputs(keys=padded(keys), values=padded(values), lengths=lengths, queries=queries,
                            query_pos=query_pos, rope=env.rt.rope, scale=env.rt.shape.scale)
    assert g.decode_lse == (cfg.inputs.runs_attention and env.rt.settings.scoring_lse == "decode"
                            and env.rt.decode_lse_ok is not False and g.ring_lse)
    if cfg.inputs.runs_attention:        # Triton window attention over the pool == torch over dense tensors
        ref = window_attention(reference.keys, queries, lengths, reference.scale)
        for name in ("mean_rows", "last_row") if cfg.inputs.last_row else ("mean_rows",):
            got = getattr(g.inputs.attn, name)
            torch.testing.assert_close(got, getattr(ref, name), atol=2e-5, rtol=1e-4)
    expected = plan(cfg, scorer_for(cfg), reference, g.n_pinned, g.n_keep, g.credit, k_max=int(g.n_keep.max()))
    for j, it in enumerate(g.items):
        assert torch.equal(expected.indices[j, ..., :it.keep], g.sel.indices[j, ..., :it.keep]), it.rid


def check_compaction(env: Env, batch: ScheduleBatch, snap: Snap, groups: list) -> None:
    """Everything one compaction step must leave behind (DESIGN.md §4), for every group it ran."""
    rt, ps = env.rt, env.page_size
    dst_slots, expected_free, delta = set(), set(), {}
    for g in groups:
        check_selection(env, g, snap)
        for j, (rid, row, length, prefix, keep, pinned) in enumerate(g.items):
            idx = g.sel.indices[j, ..., :keep]                  # [L, H, keep]
            # Kept indices: row positions, strictly ascending, pinned prefix and last keep_lastn always in.
            assert (idx[..., 1:] > idx[..., :-1]).all() and int(idx.max()) < length
            must = torch.cat([torch.arange(pinned), torch.arange(length - g.cfg.keep_lastn, length)])
            assert all(torch.isin(must, r).all() for r in idx.reshape(-1, keep)), rid
            # Slot j of head h now holds head h's j-th kept token, K and V (composite slots).
            for which, bufs in (("k", snap.k), ("v", snap.v)):
                before = dense(bufs, snap.r2t, row, length)
                now = dense(getattr(env.kv_pool, f"{which}_buffer"), env.r2t, row, keep)
                assert torch.equal(now, gather_kept(before[None], idx[None])[0]), (rid, which)
            # The row's slots stay where they were; only the data moved.
            assert torch.equal(env.r2t[row, :keep], snap.r2t[row, :keep])
            dst_slots |= set(snap.r2t[row, prefix:keep].tolist())
            tail = -(-keep // ps) * ps
            expected_free |= page_slots(env, snap.r2t[row, tail:length].tolist()) if tail < length else set()
            delta[rid] = length - keep
    # No byte outside the compacted rows' [prefix, keep) slots changed: pinned prefixes, other requests, tails.
    others = torch.ones(env.kv_pool.k_buffer[0].shape[0], dtype=torch.bool)
    others[list(dst_slots)] = False
    for before, now in zip(snap.k + snap.v, env.kv_pool.k_buffer + env.kv_pool.v_buffer):
        assert torch.equal(before[others], now[others])
    # Exactly the tails (whole pages past align_up(keep)) went back to the allocator, nothing else.
    free = free_slots(env)
    assert snap.free <= free, "a free slot was taken"
    assert free - snap.free == expected_free, "freed slots are not exactly the tails"
    assert env.allocator.available_size() - len(snap.free) == len(expected_free)
    env.freed.append(len(expected_free))
    # Lengths shrink by the dropped count; offsets grow by it; ring rows go back.
    d = torch.tensor([delta.get(r.rid, 0) for r in batch.reqs])
    assert torch.equal(batch.seq_lens, snap.seq_lens - d) and torch.equal(batch.seq_lens_cpu, snap.seq_lens_cpu - d)
    assert torch.equal(batch.orig_seq_lens, snap.orig_seq_lens - d.to(torch.int32))
    for r in batch.reqs:
        dropped = delta.get(r.rid, 0)
        assert compat.committed_len(r) == snap.committed[r.rid] - dropped
        assert compat.allocated_len(r) == snap.allocated[r.rid] - dropped
        env.dropped[r.rid] += dropped
        st = request_state.existing_state(r)
        assert int(rt.pos_offsets[compat.pool_idx(r)]) == env.dropped[r.rid] == (st.pos_offset if st else 0)
        if dropped:
            assert st.compacted and st.ring_row == 0 and int(rt.ring.row_of[compat.pool_idx(r)]) == 0
    for g in groups:     # carried credit: one value per kept token of every (layer, head)
        for j, it in enumerate(g.items):
            st = request_state.existing_state(next(r for r in batch.reqs if r.rid == it.rid))
            if g.cfg.policy == "ams":
                assert st.credit is not None and st.credit.shape == (LAYERS, KV_HEADS, it.keep)
                old = snap.credit[it.rid]      # the previous compaction's credit came back in, new tokens at 0
                k_old = 0 if old is None else old.shape[-1]
                if old is not None:
                    assert torch.equal(g.credit[j, :, :, :k_old], old)
                assert (g.credit[j, :, :, k_old:] == 0).all()
            else:
                assert st.credit is None
    assert rt.counters.compactions - snap.counters[0] == len(delta)
    assert rt.counters.tokens_freed - snap.counters[1] == sum(delta.values())


def step(env: Env, batch: ScheduleBatch) -> list:
    """One scheduler iteration; returns the compaction groups it ran (each already checked)."""
    snap = snapshot(env, batch)
    env.groups.clear()
    n = env.compactor.step(batch)
    assert n == sum(len(g.items) for g in env.groups)
    groups = list(env.groups)
    if groups:
        check_compaction(env, batch, snap, groups)
    check_no_leak(env, batch.reqs)
    batch.prepare_for_decode()          # SGLang: next slot at row position seq_len, every length + 1
    forward(env, batch)
    check_no_leak(env, batch.reqs)
    return groups


def compacted(groups: list) -> dict:
    """rid -> (length, keep) of the requests compacted in a step."""
    return {it.rid: (it.length, it.keep) for g in groups for it in g.items}


# ---------------------------------------------------------------------------------------------- 1. bookkeeping

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_compaction_bookkeeping(recorded, page_size, dtype):
    """Three requests (below the cap, above it, above it behind a pinned radix prefix) decoded through two
    compactions; `step` checks every compaction, this test pins down when they happen and what they free."""
    env = make_env(recorded, page_size=page_size, dtype=dtype)
    cache_prefix(env, SHARED)
    # short: 16-token prefix shared with `pinned` (tree), stays below its trigger (cap 72, ring from 64).
    short = add_request(env, "short", SHARED[:16] + list(range(3000, 3014)), pinned=16)
    # long: no prefix, cap 56; ring from length 48, so it compacts at exactly 56 (drops 16).
    long = add_request(env, "long", list(range(2000, 2046)))
    # pinned: 32-token page-aligned prefix, cap 88, already past cap - window when it may first take a ring
    # row (length 86), so it compacts 8 queries later at 94 (drops 22); keep = 72 is not page-aligned.
    pinned = add_request(env, "pinned", SHARED + list(range(4000, 4052)), pinned=32)
    batch = make_batch(env, [short, long, pinned])
    prefix_before = {r.rid: env.r2t[compat.pool_idx(r), :compat.protected_len(r)].clone() for r in (short, pinned)}
    short_row = env.r2t[compat.pool_idx(short)].clone()

    history = []
    for _ in range(27):
        history.append(compacted(step(env, batch)))
        if len(history) in (3, 9):      # rings: long takes its row at 48, pinned at 86 (both at step 3)
            st = request_state.existing_state(long)
            assert st.ring_row and st.ring_start == 48 and int(env.rt.ring.row_of[compat.pool_idx(long)]) == st.ring_row
            assert request_state.existing_state(pinned).ring_start == 86
    first, second = history[10], history[26]
    assert all(not h for i, h in enumerate(history) if i not in (10, 26)), history
    assert first == {"long": (56, 40), "pinned": (94, 72)}
    assert second == {"long": (56, 40), "pinned": (88, 72)}      # the second one from the ring at cap - window
    assert len(env.groups) == 1                                  # both requests in one launch
    # (c) freed: page 1 every dropped slot (16 + 22, then 16 + 16); page 16 only whole pages past
    # align_up(keep): 56 -> 40 frees [48, 64), 94 -> 72 frees [80, 96); then [48, 64) and [80, 96) again.
    assert env.freed == ([38, 32] if page_size == 1 else [32, 32])

    # (d, e) offsets accumulate over the two compactions.
    assert env.dropped == {"short": 0, "long": 32, "pinned": 38}
    for r in (long, pinned):
        assert request_state.existing_state(r).compactions == 2
    # (b) the pinned prefixes never moved, (f) the request below its cap is untouched, row and state.
    for r in (short, pinned):
        assert torch.equal(env.r2t[compat.pool_idx(r), :compat.protected_len(r)], prefix_before[r.rid])
    assert torch.equal(env.r2t[compat.pool_idx(short), :30], short_row[:30])
    st = request_state.existing_state(short)
    assert st.pos_offset == 0 and not st.compacted and st.ring_row == 0
    assert compat.committed_len(short) == 30 + 27
    # After compaction the next decode token lands right after the kept tokens, in the kept last page.
    if page_size > 1:
        row = compat.pool_idx(long)       # keep = 40: positions 40.. share the page of position 39
        assert int(env.r2t[row, 40]) == int(env.r2t[row, 39]) + 1


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


def test_prefill_window_compacts_two_steps_after_prefill(recorded):
    """Prompts already past their trigger take a ring row at prefill and compact after MIN_DECODE_STEPS decode
    steps on the prompt's last queries (`step` checks the window against the queries the prefill wrote; scoring
    recomputes the LSE: the prefill gave none); the second compaction is an ordinary one (decode window, decode
    LSE). A prompt below its trigger and a request without a policy take no row (the latter's prompt tail goes to
    the trash row)."""
    env = make_env(recorded, policy=CFG.replace(prefill_window=True))
    cache_prefix(env, SHARED)
    long = add_request(env, "long", list(range(2000, 2080)))                     # 80 >= cap 56 - W
    pinned = add_request(env, "pinned", SHARED + list(range(4000, 4060)), pinned=32)   # 92 >= 88 - W
    short = add_request(env, "short", list(range(3000, 3020)))                   # 20 < 48: decode rows later
    off = add_request(env, "off", list(range(5000, 5090)), override="none")
    trash_before = env.rt.ring.buf[:, 0].clone()
    assert prefill(env, [long, pinned, short, off]) == 2
    st = {r.rid: request_state.state_of(r, env.rt.settings.policy) for r in (long, pinned, short, off)}
    assert (st["long"].ring_start, st["pinned"].ring_start) == (72, 84) and not st["long"].ring_lse
    assert st["short"].ring_row == 0 and st["off"] is None
    assert not torch.equal(env.rt.ring.buf[:, 0], trash_before)          # the other prompts' tails went there
    for r in (long, pinned):                                            # the prompt's last W queries, by slot
        for pos in range(compat.committed_len(r) - CFG.window, compat.committed_len(r)):
            assert torch.equal(env.rt.ring.buf[:, st[r.rid].ring_row, pos % CFG.window], env.queries[r.rid][pos])

    batch = make_batch(env, [long, pinned, short, off])
    runs = [step(env, batch) for _ in range(20)]
    history = [compacted(groups) for groups in runs]
    assert history[2] == {"long": (82, 40), "pinned": (94, 72)}, history    # decode steps 2: 80 + 2, 92 + 2
    assert not any(history[:2])
    assert [(g.ring_lse, g.decode_lse) for g in runs[2]] == [(False, False)]    # no LSE from the prefill
    later = [groups for groups in runs[3:] if groups]
    assert later and all(g.ring_lse and g.decode_lse for groups in later for g in groups)
    assert history[18] == {"long": (56, 40), "pinned": (88, 72)}    # the second: decode windows at the trigger


# ---------------------------------------------------------------------------------------------- 2. overrides

def test_mixed_overrides_compact_in_one_step(recorded):
    """Streaming (no queries), top-k KeyDiff (keys, no queries), AMS+TOVA and the server default in one batch.
    Regression: a streaming override on a server whose scorer reads attention used to run the attention
    kernel with no queries (fixed by the policy's declared inputs, PolicyConfig.inputs)."""
    env = make_env(recorded)
    overrides = {"stream": "streaming", "keydiff": {"policy": "topk", "scorer": "keydiff"},
                 "tova": {"policy": "ams", "scorer": "tova"}, "default": None, "off": "none"}
    reqs = [add_request(env, rid, list(range(2000 + 100 * i, 2046 + 100 * i)), override=o)
            for i, (rid, o) in enumerate(overrides.items())]
    batch = make_batch(env, reqs)
    off_row = env.r2t[compat.pool_idx(reqs[-1])].clone()
    seen = {}
    for _ in range(12):
        for g in step(env, batch):
            seen.setdefault((g.cfg.policy, g.cfg.scorer), []).extend(it.rid for it in g.items)
    assert seen == {("streaming", "snapkv"): ["stream"], ("topk", "keydiff"): ["keydiff"],
                    ("ams", "tova"): ["tova"], ("ams", "snapkv"): ["default"]}
    off = reqs[-1]
    assert request_state.existing_state(off) is None and compat.committed_len(off) == 46 + 12
    assert torch.equal(env.r2t[compat.pool_idx(off), :46], off_row[:46])
    assert int(env.rt.pos_offsets[compat.pool_idx(off)]) == 0


def test_needs_attention():
    def needs_attention(cfg):
        return cfg.inputs.runs_attention
    server = PolicyConfig(policy="ams", scorer="tova")
    assert needs_attention(server) and server.inputs.last_row
    assert not needs_attention(server.replace(policy="streaming"))
    assert not needs_attention(server.replace(policy="topk", scorer="keydiff"))
    assert needs_attention(server.replace(policy="topk", scorer="snapkv"))
    assert not needs_attention(server.replace(policy="topk", scorer="expected_attention"))
    assert needs_attention(server.replace(scorer="expected_attention"))     # AMS mass reads attention
    assert not needs_attention(server.replace(scorer="keydiff", use_mass=False))


@pytest.mark.parametrize("slack", [0.0, 0.5])
def test_batch_slack_joins_a_due_request(recorded, slack):
    """With slack 0.5 (8 of 16 interval tokens) a request 4 tokens short of its trigger, with a full window,
    compacts in the same step as a request at its trigger; alone it never compacts early. With slack 0 each
    compacts at its own trigger."""
    env = make_env(recorded, batch_slack=slack)
    a = add_request(env, "a", list(range(2000, 2030)))      # 30 tokens: trigger 56 at step 27
    b = add_request(env, "b", list(range(3000, 3034)))      # 34 tokens: trigger 56 at step 23
    batch = make_batch(env, [a, b])
    history = {n: compacted(step(env, batch)) for n in range(1, 28)}
    done = {n: c for n, c in history.items() if c}
    if slack:
        assert request_state.existing_state(a).compactions == 1
        assert done == {23: {"b": (56, 40), "a": (52, 40)}}        # a joined 4 tokens early
        assert env.rt.counters.launches == 1
    else:
        assert done == {23: {"b": (56, 40)}, 27: {"a": (56, 40)}}
        assert env.rt.counters.launches == 2


@pytest.mark.parametrize("debug", [False, True])
def test_decode_lse_in_another_convention_is_caught(recorded, monkeypatch, debug):
    """An attention kernel reporting its LSE in natural-log units: the first scoring's check catches it; the
    server logs it and recomputes from then on (debug mode raises instead). Selections stay right."""
    real_run = DecodeAttention.run

    def natural_log_run(self, *args, **kwargs):
        out, lse = real_run(self, *args, **kwargs)
        return out, lse * math.log(2.0)
    monkeypatch.setattr(DecodeAttention, "run", natural_log_run)
    env = make_env(recorded, debug_checks=debug)
    reqs = [add_request(env, "a", list(range(2000, 2046))), add_request(env, "b", list(range(3000, 3049)))]
    batch = make_batch(env, reqs)
    if debug:
        with pytest.raises(AssertionError, match="differs from the recomputed one"):
            for _ in range(12):
                step(env, batch)
        return
    groups = [g for _ in range(12) for g in step(env, batch)]       # check_selection: attention == reference
    assert groups and env.rt.decode_lse_ok is False and env.rt.counters.decode_lse_launches == 0


def test_scoring_lse_recompute(recorded):
    """--ams-scoring-lse recompute: the kernel's own LSE pass, no LSE taken from the decode attention."""
    env = make_env(recorded, scoring_lse="recompute")
    reqs = [add_request(env, "a", list(range(2000, 2046))), add_request(env, "b", list(range(3000, 3049)))]
    batch = make_batch(env, reqs)
    groups = [g for _ in range(12) for g in step(env, batch)]
    assert groups and not any(g.decode_lse for g in groups) and env.rt.counters.decode_lse_launches == 0
    assert not env.rt.ring.has_lse


# ---------------------------------------------------------------------------------------------- 3. ring

def test_ring_rows_wait_and_release(recorded):
    """One ring row for two requests: the second waits (ring_waits grows), then compacts `window` queries
    after it finally gets the row, never earlier."""
    env = make_env(recorded, ring_rows=1)
    ring = env.rt.ring
    a = add_request(env, "a", list(range(2000, 2046)))    # cap 56, reaches cap - window (48) at step 3
    b = add_request(env, "b", list(range(3000, 3047)))    # one token ahead: finds the ring taken
    batch = make_batch(env, [a, b])
    sa, sb = (lambda: request_state.existing_state(a)), (lambda: request_state.existing_state(b))
    history = []
    for n in range(1, 21):
        done = compacted(step(env, batch))
        history.append(done)
        if n == 2:
            assert sa().ring_row == 0 and ring.free_rows == 1          # below cap - window: no row yet
        if n == 3:
            assert sa().ring_row and sa().ring_start == 48 and sb().ring_row == 0 and ring.free_rows == 0
        if n == 9:
            assert env.rt.counters.ring_waits == 0                     # b not at its cap yet: not a wait
        if n == 10:
            assert env.rt.counters.ring_waits == 1                     # b at 56 with no row
        if n == 11:
            assert done == {"a": (56, 40)} and sa().ring_row == 0 and env.rt.counters.ring_waits == 2
            assert ring.free_rows == 1 and int(ring.row_of[compat.pool_idx(a)]) == 0
        if n == 12:
            assert sb().ring_row and sb().ring_start == 58             # b took the released row at 58
        if 12 <= n < 20:
            assert sb().compactions == 0                               # past cap, but fewer than 8 queries
    assert history[19] == {"b": (66, 40)}
    assert sb().ring_row == 0 and sb().pos_offset == 26
    assert env.rt.counters.ring_waits == 2


def test_prompt_tail_of_short_and_long_extends():
    """The last min(W, extend) tokens of each request go to its row at position % W; the rest to the trash row."""
    ring = ams_runtime.ring_mod.QueryRing(num_layers=1, rows=2, window=4, num_q_heads=1, head_dim=1, req_slots=4,
                                          dtype=torch.float32, device="cpu")
    r3, r1 = ring.acquire(3), ring.acquire(1)
    # Request 3 extends positions 5..7 (3 tokens < W), request 1 positions 0..9.
    positions = torch.cat([torch.arange(5, 8), torch.arange(0, 10)])
    fb = SimpleNamespace(extend_start_loc=torch.tensor([0, 3], dtype=torch.int32),
                         extend_seq_lens=torch.tensor([3, 10], dtype=torch.int32), req_pool_indices=torch.tensor([3, 1]))
    idx, owners, valid = pw_hooks.prompt_tail(fb, 4)
    assert idx.tolist() == [[0, 0, 1, 2], [9, 10, 11, 12]] and valid.tolist() == [[False, True, True, True], [True] * 4]
    assert pw_hooks.prompt_tail(fb, 4) is pw_hooks.prompt_tail(fb, 4)            # once per forward batch
    q = (100 + positions).float().view(-1, 1)          # a query's value tells its position
    ring.write_tail(0, q, idx, owners, valid, positions)
    got = ring.buf[0, :, :, 0, 0]
    assert got[r3].tolist() == [0.0, 105.0, 106.0, 107.0]                            # slot 0 never written
    assert got[r1].tolist() == [108.0, 109.0, 106.0, 107.0]                          # positions 6..9 by slot
    assert int(ring.row_of[3]) == r3 and int(ring.row_of[1]) == r1


def test_ring_rows_are_located_once_per_forward_and_again_at_layer_0():
    """Layers after the first reuse the rows found at layer 0 for the same batch tensors; layer 0 looks them up
    again even for the same tensors (a CUDA-graph warm-up and its capture share them)."""
    ring = ams_runtime.ring_mod.QueryRing(num_layers=2, rows=2, window=4, num_q_heads=1, head_dim=1, req_slots=4,
                                          dtype=torch.float32, device="cpu")
    reqs, pos = torch.tensor([3]), torch.tensor([5])
    row = ring.acquire(3)
    for layer in (0, 1):
        ring.write(layer, torch.tensor([[1.0]]), reqs, pos)
        ring.write_lse(layer, torch.tensor([[2.0]]), reqs, pos)
    assert ring.buf[:, row, 1, 0, 0].tolist() == [1.0, 1.0] and ring.lse[:, row, 1, 0].tolist() == [2.0, 2.0]
    ring.release(3, row)                             # the scheduler took the row back between two forwards
    for layer in (0, 1):
        ring.write(layer, torch.tensor([[7.0]]), reqs, pos)
    assert ring.buf[:, row, 1, 0, 0].tolist() == [1.0, 1.0] and ring.buf[:, 0, 1, 0, 0].tolist() == [7.0, 7.0]


def test_ring_window_order():
    """Queries come back oldest first whatever slot the window starts at; row 0 is the trash row."""
    ring = ams_runtime.ring_mod.QueryRing(num_layers=1, rows=2, window=4, num_q_heads=1, head_dim=2, req_slots=4,
                                          dtype=torch.float32, device="cpu")
    row = ring.acquire(3)
    for pos in range(10, 17):     # 7 writes into 4 slots: the last four survive
        ring.write(0, torch.full((2, 2), float(pos)), torch.tensor([3, 1]), torch.tensor([pos, pos]))
    q, pos = ring.window_queries(torch.tensor([row]), torch.tensor([16]))
    assert pos.tolist() == [[13, 14, 15, 16]]
    assert q[0, 0, 0, :, 0].tolist() == [13.0, 14.0, 15.0, 16.0]
    unused = 3 - row                  # rows are 1 and 2
    assert int(ring.row_of[1]) == 0 and ring.buf[0, 0].ne(0).all()    # req 1 has no row: the trash row
    assert ring.buf[0, row].ne(0).all() and ring.buf[0, unused].eq(0).all()
    ring.release(3, row)
    assert ring.free_rows == 2 and int(ring.row_of[3]) == 0


# ---------------------------------------------------------------------------------------------- 4. release

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


def test_release_after_compaction(recorded, wired_release):
    """Finish, retraction and finish-uncompacted through SGLang's release_kv_cache (paged pool, radix tree):
    ring rows and offsets come back, compacted KV never enters the tree, and nothing leaks."""
    env = make_env(recorded, page_size=16)
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


# ---------------------------------------------------------------------------------------------- 5. admission

def test_admission_arithmetic():
    ams = PolicyConfig(policy="ams", budget=1024, interval=512, window=8)
    stream = PolicyConfig(policy="streaming", budget=1024, interval=512)
    assert ams.trigger_len(0) == 1536 and ams.trigger_len(256) == 1792
    assert ams.kept_len(256) == 1280 and ams.pinned_len(0) == ams.sink and ams.pinned_len(256) == 256
    # Lead past the trigger: MIN_DECODE_STEPS before the first ring row, then a full window of queries.
    assert ams.lead_tokens == 8 + 2 and stream.lead_tokens == 2 == PolicyConfig.MIN_DECODE_STEPS
    assert admission.admission_new_tokens(1000, 0, 4000, ams) == 536           # grows to the cap
    assert admission.admission_new_tokens(1000, 256, 4000, ams) == 792         # pinned prefix is extra
    assert admission.admission_new_tokens(1000, 0, 100, ams) == 100            # finishes first
    assert admission.admission_new_tokens(2000, 0, 4000, ams) == 10            # prompt past the cap: the lead
    assert admission.admission_new_tokens(2000, 0, 4000, stream) == 2
    assert admission.admission_new_tokens(2000, 0, 0, ams) == 0
    assert admission.running_reservation(1500, 0, ams) == 36
    assert admission.running_reservation(1530, 0, ams) == 10
    assert admission.running_reservation(1600, 0, stream) == 2


@pytest.mark.parametrize("policy", ["ams", "streaming"])
@pytest.mark.parametrize("prompt", [30, 50, 60])    # below cap - window, between, past the cap (cap 56)
def test_admission_bounds_what_requests_hold(recorded, policy, prompt):
    """Drive the real loop: the most KV a request holds before its first compaction is exactly its prompt plus
    what admission reserves, and the running reservation bounds what is left at every step."""
    cfg = CFG.replace(policy=policy)
    env = make_env(recorded, policy=CFG)       # server ams (query ring); the request overrides the policy
    req = add_request(env, "r", list(range(2000, 2000 + prompt)), override={"policy": policy})
    batch = make_batch(env, [req])
    lengths = []
    while not env.compactor.due_requests(batch):     # the trigger Compactor.step acts on (no kernels needed)
        lengths.append(compat.committed_len(req))
        batch.prepare_for_decode()
        forward(env, batch)
    peak = compat.committed_len(req)
    assert peak - prompt == admission.admission_new_tokens(prompt, 0, 4096, cfg)
    for length in lengths:
        assert peak - length <= admission.running_reservation(length, 0, cfg)


def test_admission_hooks():
    """PrefillAdder (real) counts a policy request's cap, not its max_new_tokens; add_one_req sees the clamp."""
    from sglang.srt.managers.schedule_policy import PrefillAdder
    env = make_env([], policy=CFG)
    cache_prefix(env, SHARED)
    running = add_request(env, "running", list(range(2000, 2040)))           # committed 40, cap 56
    pinned = add_request(env, "pinned", SHARED + list(range(5000, 5032)), pinned=32)   # 64 of cap 32 + 56
    off = add_request(env, "off", list(range(3000, 3040)), override="none")
    batch = ScheduleBatch(reqs=[running, pinned, off])
    real = PrefillAdder._get_running_request_total_token_offset
    try:
        PrefillAdder._get_running_request_total_token_offset = \
            lambda self, req: policy_hooks.running_offset_hook(real, self, req)
        adder = PrefillAdder(1, env.tree, env.allocator, batch, 1.0, 10_000, None)
    finally:
        PrefillAdder._get_running_request_total_token_offset = real
    assert compat.reserved_for_running(adder) == (56 - 40) + (88 - 64) + 4096     # policy off: upstream's count

    seen = []
    waiting = add_request(env, "waiting", list(range(4000, 4030)))
    assert compat.prefix_len(waiting) == 0
    policy_hooks.add_one_req_hook(lambda self, req: seen.append(req.sampling_params.max_new_tokens), None, waiting)
    assert seen == [56 - 30] and waiting.sampling_params.max_new_tokens == 4096    # restored afterwards
    # --ams-prompt-cache cached: the prompt will be tree-owned (pinned), so the cap starts after it.
    env.rt.settings = dataclasses.replace(env.rt.settings, prompt_cache="cached")
    policy_hooks.add_chunked_req_hook(lambda self, req: seen.append(req.sampling_params.max_new_tokens), None, waiting)
    assert seen[-1] == 30 + 56 - 30

    scheduler = SimpleNamespace(max_new_tokens_limit=None, max_req_len=1000)
    waiting.sampling_params.max_new_tokens = 5000
    policy_hooks.init_req_max_new_tokens_hook(lambda self, req: setattr(req.sampling_params, "max_new_tokens", 10),
                                              scheduler, waiting)
    assert waiting.sampling_params.max_new_tokens == 1000 - 30 - 1     # context length bounds it, not the pool


# ---------------------------------------------------------------------------------------------- 7. workspace

def _three_due(env: Env, override=None) -> ScheduleBatch:
    """Three requests of different lengths that all reach their trigger within a few steps (cap 56)."""
    reqs = [add_request(env, f"r{i}", list(range(5000 + 100 * i, 5000 + 100 * i + n)), override=override)
            for i, n in enumerate((47, 80, 120))]
    return make_batch(env, reqs)


def _until_compacted(env: Env, batch: ScheduleBatch, steps: int = 14) -> int:
    """The scheduler loop without the per-group checks (a request split by layers runs several chunks)."""
    done = 0
    for _ in range(steps):
        done += env.compactor.step(batch)
        batch.prepare_for_decode()
        forward(env, batch)
    return done


@pytest.mark.parametrize("policy, scorer", [("ams", "snapkv"), ("topk", "keydiff"), ("ams", "tova")])
def test_chunked_compaction_equals_one_launch(policy, scorer):
    """A bound so small that every request runs alone, one layer at a time, leaves the pool, the rows, the
    lengths and the request states exactly as one launch over the whole group does."""
    cfg = CFG.replace(policy=policy, scorer=scorer)
    envs = []
    for bound in (None, "one-layer"):
        env = make_env([], policy=CFG.replace(delta=0.02), seed=5)
        batch = _three_due(env, cfg_override(cfg))
        cfg = CFG.replace(delta=0.02, policy=policy, scorer=scorer)         # what the requests run under
        if bound:
            cost = env.compactor.chunk_cost(cfg)
            env.rt.set_workspace(cost.bytes(1, 1, 130))         # the longest request compacts at ~130 tokens
            assert len(workspace.plan_chunks([100, 120], LAYERS, cost, env.rt.workspace_bytes)) == 2 * LAYERS
        assert _until_compacted(env, batch) >= 3
        envs.append((env, batch))
    (a, ba), (b, bb) = envs
    for x, y in zip(a.kv_pool.k_buffer + a.kv_pool.v_buffer, b.kv_pool.k_buffer + b.kv_pool.v_buffer):
        assert torch.equal(x, y)
    assert torch.equal(a.r2t, b.r2t) and torch.equal(ba.seq_lens, bb.seq_lens)
    for ra, rb in zip(ba.reqs, bb.reqs):
        sa, sb = request_state.existing_state(ra), request_state.existing_state(rb)
        assert (sa.pos_offset, sa.compactions) == (sb.pos_offset, sb.compactions)
        assert (sa.credit is None) == (sb.credit is None)
        if sa.credit is not None:
            assert torch.equal(sa.credit, sb.credit)


@pytest.mark.parametrize("policy, scorer", [("ams", "snapkv"), ("ams", "keydiff"), ("topk", "expected_attention"),
                                            ("topk", "triattention"), ("streaming", "streaming"), ("ams", "random")])
def test_step_peak_stays_inside_the_bound(live_bytes, policy, scorer):
    """The memory a compaction step really allocates (every tensor it creates, counted at the ATen level) stays
    under the bound the planner cut the group for, here one request with all layers."""
    cfg = CFG.replace(policy=policy, scorer=scorer)
    env = make_env([], policy=CFG, seed=2)
    reqs = [add_request(env, f"r{i}", list(range(6000 + 300 * i, 6000 + 300 * i + n)), override=cfg_override(cfg))
            for i, n in enumerate((150, 200, 230))]
    batch = make_batch(env, reqs)
    cost = env.compactor.chunk_cost(cfg)
    env.rt.set_workspace(cost.bytes(1, LAYERS, 240))
    peaks = []
    for _ in range(14):
        due = env.compactor.due_requests(batch)
        with live_bytes() as mem:
            done = env.compactor.step(batch)
        if done:
            chunks = env.compactor.chunks(due)
            assert len(chunks) == done                      # one request per chunk under this bound
            peaks.append(mem.peak)
        batch.prepare_for_decode()
        forward(env, batch)
    assert peaks and max(peaks) <= env.rt.workspace_bytes, (peaks, env.rt.workspace_bytes)
    assert max(peaks) > env.rt.workspace_bytes / 20          # the model is not absurdly loose either


def cfg_override(cfg: PolicyConfig) -> dict:
    return {"policy": cfg.policy, "scorer": cfg.scorer}


def test_warm_up_runs_every_variant_and_touches_only_the_dummy_slot(monkeypatch):
    from sglang_ams.engine import warmup
    env = make_env([])
    before = [b.clone() for b in env.kv_pool.k_buffer + env.kv_pool.v_buffer]
    free = free_slots(env)
    calls = []
    real = warmup.window_attention_pool

    def recording(*args, **kwargs):
        calls.append((kwargs["want_last_row"], kwargs.get("row_lse") is not None, kwargs["num_splits"]))
        return real(*args, **kwargs)
    monkeypatch.setattr(warmup, "window_attention_pool", recording)
    assert warmup.warm_up(env.rt) > 0
    most = warmup.default_num_splits(KV_HEADS, env.r2t.shape[1], env.rt.device)
    splits = [1 << i for i in range(most.bit_length())]
    assert sorted(calls) == sorted([(last, True, 1) for last in (False, True)]
                                   + [(last, False, s) for last in (False, True) for s in splits])
    for b, old in zip(env.kv_pool.k_buffer + env.kv_pool.v_buffer, before):
        assert torch.equal(b[1:], old[1:]), "warm-up wrote a slot other than the dummy slot 0"
    assert free_slots(env) == free


def test_triattention_with_stats_runs_without_a_ring(tmp_path, monkeypatch):
    """Top-k TriAttention with a stats file declares positions but no queries: the server keeps no query ring, and
    the compactor gives the scorer the window's logical positions from the host lengths (it used to give none, and
    the scorer raised inside the scheduler)."""
    from sglang_ams.scorers.triattention_calib import TriAttentionStats, save_stats
    g = torch.Generator().manual_seed(0)
    freqs = tiny_rope().inv_freq.numel()
    q_mean = torch.complex(*torch.randn(2, LAYERS, Q_HEADS, freqs, generator=g))
    path = str(tmp_path / "stats.pt")
    save_stats(TriAttentionStats(q_mean, q_mean.abs() + 0.1, 1, "neox"), path)
    cfg = CFG.replace(policy="topk", scorer="triattention", triattention_stats=path)
    env = make_env([], policy=cfg, scoring_lse="recompute")         # (no ring: the decode LSE is not kept)
    assert env.rt.ring is None and not cfg.needs_queries
    seen = []
    real_plan = compactor_mod.plan
    monkeypatch.setattr(compactor_mod, "plan", lambda c, s, inputs, *a, **k: seen.append(inputs) or
                        real_plan(c, s, inputs, *a, **k))
    batch = make_batch(env, [add_request(env, "r0", list(range(2000, 2050)))])
    assert _until_compacted(env, batch) == 1
    (inputs,) = seen
    assert inputs.queries is None and inputs.rope is env.rt.rope
    assert inputs.query_pos.tolist() == [list(range(56 - cfg.window, 56))]      # compacts at its cap, length 56
