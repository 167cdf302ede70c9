"""Tensor parallelism (TP=2) through the compaction step, simulated on the CPU with real SGLang pools, allocators,
radix caches, requests and batches (harness.py).

Three "processes" are driven in lockstep: one holding every KV head (TP=1) and two TP ranks holding half each,
given the same host state (prompts, radix prefixes, per-request overrides, output tokens), the same K/V split by
KV head and the same queries split by query-head group, as SGLang's TP workers would be. The ranks' compaction
steps run as threads of a simulated TP group (tests/tp_group.py), so a scorer that needs every head (TOVA) does
its all-reduce. After every step:
  * decisions are identical on both ranks and equal TP=1's: the report (groups, chunks, layer ranges, requests
    with length / keep / pinned / freed), req_to_token, the allocator's free slots, SGLang's lengths, each
    request's offset, ring row and compaction count, the counters;
  * each rank's KV pool is, slot for slot, the head slice of TP=1's pool (kept tokens per head and where they
    moved), its selection the head slice of TP=1's, and its carried AMS credit the head slice of TP=1's.
For the topk and ams policies with every built-in scorer, TriAttention also with calibrated statistics.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sglang_ams.config import SCORERS
from sglang_ams.engine import request_state
from sglang_ams.engine import runtime as ams_runtime
from sglang_ams.engine import sglang_compat as compat
from sglang_ams.engine.compactor import group_key
from sglang_ams.engine.settings import EngineSettings
from sglang_ams.heads import HeadRange

from .checks import free_slots
from .harness import (CFG, HEAD_DIM, KV_HEADS, LAYERS, MARKS, POOL_TOKENS, Q_HEADS, SHARED, Env, add_request,
                      cache_prefix, cfg_override, forward, make_batch, make_env)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tp_group import FakeTPGroup  # noqa: E402

pytestmark = MARKS
TP = 2
STEPS = 27          # two compactions of `long` and `pinned` (as in test_bookkeeping)


@dataclasses.dataclass
class Cluster:
    full: Env
    ranks: list
    group: FakeTPGroup
    batches: list = dataclasses.field(default_factory=list)     # full's, then each rank's
    heads_differ: bool = False      # some selection kept other tokens in rank 0's heads than in rank 1's
    main_chunks: int = 0            # chunks run for the server policy's group

    @property
    def envs(self) -> list:
        return [self.full, *self.ranks]


def _kv(env: Env) -> slice:
    h = env.rt.heads
    return slice(h.kv_start, h.kv_start + h.kv_count)


def _q(env: Env) -> slice:
    h = env.rt.heads
    return slice(h.q_start, h.q_start + h.q_count)


def copy_kv(c: Cluster, slots=None) -> None:
    """Give the ranks the TP=1 process's K/V of `slots` (default all), split by KV head."""
    for env in c.ranks:
        for src, dst in zip(c.full.kv_pool.k_buffer + c.full.kv_pool.v_buffer,
                            env.kv_pool.k_buffer + env.kv_pool.v_buffer):
            if slots is None:
                dst.copy_(src[:, _kv(env)])
            else:
                dst[slots] = src[slots][:, _kv(env)]


def make_cluster(policy, requests) -> Cluster:
    group = FakeTPGroup(TP)
    # (a query-free server collects no queries, so its decode attention is asked for no LSE)
    kw = dict(policy=policy, scoring_lse="decode" if policy.needs_queries else "recompute")
    full = make_env(**kw)
    ranks = [make_env(heads=group.heads(r, KV_HEADS, Q_HEADS), **kw) for r in range(TP)]
    c = Cluster(full, ranks, group)
    for env in c.envs:
        cache_prefix(env, SHARED)
        reqs = [add_request(env, rid, tokens, pinned=pinned, override=override)
                for rid, tokens, pinned, override in requests]
        c.batches.append(make_batch(env, reqs))
    copy_kv(c)
    return c


def decisions(report) -> tuple:
    return tuple((group_key(ch.cfg), ch.layers, ch.requests, ch.committed, ch.ring_lse, ch.decode_lse)
                 for ch in report.chunks)


def host_state(env: Env, batch) -> tuple:
    states = [request_state.existing_state(r) for r in batch.reqs]
    ring = env.rt.ring
    return (env.r2t.clone(), free_slots(env), batch.seq_lens_cpu.tolist(), batch.seq_lens.tolist(),
            [(compat.committed_len(r), compat.allocated_len(r), compat.protected_len(r)) for r in batch.reqs],
            [None if st is None else (st.pos_offset, st.compactions, st.compacted, st.ring_row, st.ring_start)
             for st in states],
            env.rt.pos_offsets.tolist(), None if ring is None else (ring.row_of.tolist(), ring.free_rows),
            (env.rt.counters.compactions, env.rt.counters.tokens_freed, env.rt.counters.ring_waits))


def check_same_decisions(c: Cluster, reports: list) -> None:
    want = host_state(c.full, c.batches[0])
    for env, batch, report in zip(c.ranks, c.batches[1:], reports[1:]):
        assert decisions(report) == decisions(reports[0])
        got = host_state(env, batch)
        assert torch.equal(got[0], want[0]), "req_to_token differs"
        assert got[1:] == want[1:]


def check_head_slices(c: Cluster, reports: list) -> None:
    full_report = reports[0]
    for env, batch, report in zip(c.ranks, c.batches[1:], reports[1:]):
        kv = _kv(env)
        for got, want in zip(env.kv_pool.k_buffer + env.kv_pool.v_buffer,
                             c.full.kv_pool.k_buffer + c.full.kv_pool.v_buffer):
            assert torch.equal(got, want[:, kv]), "a rank's pool is not the head slice of TP=1's"
        for mine, theirs in zip(report.chunks, full_report.chunks):
            assert torch.equal(mine.trace.selection.indices, theirs.trace.selection.indices[:, :, kv]), \
                "a rank's selection is not the head slice of TP=1's"
        for r, r_full in zip(batch.reqs, c.batches[0].reqs):
            st, st_full = request_state.existing_state(r), request_state.existing_state(r_full)
            if st is not None and st.credit is not None:
                assert torch.equal(st.credit, st_full.credit[:, kv])


def run_step(c: Cluster):
    """One scheduler iteration in every process: the compaction step (the ranks together), the checks, then
    SGLang's prepare_for_decode and the model's decode step with the same tokens and sliced data."""
    reports = [c.full.compactor.step(c.batches[0])]
    reports += c.group.run([lambda env=env, b=b: env.compactor.step(b) for env, b in zip(c.ranks, c.batches[1:])])
    check_same_decisions(c, reports)
    check_head_slices(c, reports)
    for b in c.batches:
        b.prepare_for_decode()
    slots = c.batches[0].out_cache_loc
    assert all(torch.equal(b.out_cache_loc, slots) for b in c.batches[1:])
    q, tokens = forward(c.full, c.batches[0])
    copy_kv(c, slots)
    for env, b in zip(c.ranks, c.batches[1:]):
        share = q.view(LAYERS, len(b.reqs), Q_HEADS, HEAD_DIM)[:, :, _q(env)].reshape(LAYERS, len(b.reqs), -1)
        forward(env, b, q=share.contiguous(), tokens=tokens, write_kv=False)
    return reports[0]


def _requests():
    """As test_bookkeeping (one below its cap, one without and one behind a radix prefix, compacting twice),
    and one under another policy (a second group in the same steps)."""
    return [("short", SHARED[:16] + list(range(3000, 3014)), 16, None),
            ("long", list(range(2000, 2046)), 0, None),
            ("pinned", SHARED + list(range(4000, 4052)), 32, None),
            ("other", list(range(6000, 6046)), 0, cfg_override(CFG.replace(policy="streaming")))]


def _stats_file(path: Path) -> str:
    from sglang_ams.scorers.triattention_calib import TriAttentionStats, save_stats
    gen = torch.Generator().manual_seed(3)
    f = HEAD_DIM // 2
    q_mean = torch.complex(torch.randn(LAYERS, Q_HEADS, f, generator=gen),
                           torch.randn(LAYERS, Q_HEADS, f, generator=gen))
    save_stats(TriAttentionStats(q_mean, q_mean.abs() + torch.rand(LAYERS, Q_HEADS, f, generator=gen), 10, "neox"),
               str(path))
    return str(path)


CASES = [(p, s, False) for p in ("topk", "ams") for s in SCORERS] + [("ams", "triattention", True)]


def _run(policy, scorer, stats, tmp_path, break_offset=False, bound_tokens=None) -> Cluster:
    cfg = CFG.replace(policy=policy, scorer=scorer,
                      triattention_stats=_stats_file(tmp_path / "stats.pt") if stats else "")
    c = make_cluster(cfg, _requests())
    if bound_tokens:        # a workspace bound of one layer of one `bound_tokens` request, in every process
        for env in c.envs:
            env.rt.set_workspace(env.compactor.chunk_cost(cfg).bytes(1, 1, bound_tokens))
    if break_offset:        # rank 1 indexing the model's heads by its local ids
        rt = c.ranks[1].rt
        rt.heads = dataclasses.replace(rt.heads, kv_start=0, q_start=0)
    compacted = []
    for _ in range(STEPS):
        report = run_step(c)
        compacted.append({it.rid: (it.length, it.keep) for it in report.requests})
        c.main_chunks += sum(ch.cfg.policy == policy for ch in report.chunks)
        for ch in report.chunks:
            idx = ch.trace.selection.indices
            c.heads_differ |= ch.cfg.policy == policy and not torch.equal(idx[:, :, :2], idx[:, :, 2:])
    when = {rid: [i for i, h in enumerate(compacted) if rid in h] for rid in ("short", "long", "pinned", "other")}
    # (a query-free pinned request compacts at its cap, 88; one reading queries waits for its window, at 94)
    assert when == {"short": [], "long": [10, 26], "other": [10, 26],
                    "pinned": [10, 26] if cfg.needs_queries else [4, 20]}, compacted
    return c


@pytest.mark.parametrize("policy, scorer, stats", CASES,
                         ids=[f"{p}-{s}" + ("-stats" if st else "") for p, s, st in CASES])
def test_ranks_decide_alike_and_keep_their_heads_slice(policy, scorer, stats, tmp_path):
    c = _run(policy, scorer, stats, tmp_path)
    assert c.full.rt.counters.compactions == 6
    # The two ranks' heads kept different tokens (the slices compare something that varies), except where the
    # scores are shared by every head (recency; TOVA under top-k).
    assert c.heads_differ or scorer == "streaming" or (scorer, policy) == ("tova", "topk")
    if scorer == "tova":
        assert c.group.shapes, "TOVA summed its query heads over the TP group"


@pytest.mark.parametrize("scorer", ["tova", "random"])
def test_layer_chunked_steps_stay_in_lockstep(scorer, tmp_path):
    """A workspace bound that runs every request alone, one layer at a time (the same plan in every process: the
    cost scales with the heads): the ranks still decide alike and keep their slices, TOVA does one all-reduce per
    chunk on every rank, the random scorer draws one base per chunk on every rank."""
    c = _run("ams", scorer, False, tmp_path, bound_tokens=100)
    assert c.main_chunks == 2 * 2 * LAYERS                  # long and pinned, twice each, per layer
    assert len(c.group.shapes) == (c.main_chunks if scorer == "tova" else 0)
    assert {shape for _, shape in c.group.shapes} <= {(1, 1, 1, 56), (1, 1, 1, 94), (1, 1, 1, 88)}


def test_a_rank_without_its_head_offset_diverges(tmp_path):
    """TriAttention with calibrated statistics: rank 1 reading rank 0's statistics keeps other tokens than the
    slice of TP=1 (so the test above can fail), while every decision stays the same."""
    with pytest.raises(AssertionError, match="head slice"):
        _run("ams", "triattention", True, tmp_path, break_offset=True)


def test_runtime_takes_its_heads_from_sglang(monkeypatch):
    """The pool hook's Runtime on TP rank 1 of 2: the pool SGLang built holds that rank's heads, the range comes
    from ParallelState and the model config by SGLang's rule; a pool of another size is refused."""
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from transformers import LlamaConfig
    settings = EngineSettings(policy=CFG)
    hf = LlamaConfig(hidden_size=Q_HEADS * HEAD_DIM, num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS,
                     num_hidden_layers=LAYERS)

    def runner(kv_heads, q_heads):
        pool = MHATokenToKVPool(POOL_TOKENS, 1, torch.bfloat16, kv_heads, HEAD_DIM, LAYERS, device="cpu",
                                enable_memory_saver=False)
        return SimpleNamespace(
            is_draft_worker=False, token_to_kv_pool=pool, device="cpu", max_total_num_tokens=POOL_TOKENS,
            token_to_kv_pool_allocator=TokenToKVPoolAllocator(POOL_TOKENS, torch.bfloat16, "cpu", pool, False),
            req_to_token_pool=ReqToTokenPool(size=8, max_context_len=256, device="cpu", enable_memory_saver=False),
            ps=SimpleNamespace(tp_rank=1, tp_size=TP),
            model_config=SimpleNamespace(hf_config=hf, is_multimodal=False, is_encoder_decoder=False,
                                         num_attention_heads=Q_HEADS, get_total_num_kv_heads=lambda: KV_HEADS),
            model=torch.nn.ModuleList([RadixAttention(q_heads, HEAD_DIM, HEAD_DIM ** -0.5, kv_heads, i)
                                       for i in range(LAYERS)]))
    rt = ams_runtime.Runtime.from_model_runner(settings, runner(KV_HEADS // TP, Q_HEADS // TP))
    assert rt.heads == HeadRange(1, 1, KV_HEADS, 2, 2, Q_HEADS)
    assert rt.heads.all_reduce is ams_runtime.tp_all_reduce
    assert rt.ring.buf.shape[3] == Q_HEADS // TP and rt.slot_stride == HEAD_DIM        # the rank's heads only
    with pytest.raises(ams_runtime.Unsupported, match="sharding"):
        ams_runtime.Runtime.from_model_runner(settings, runner(KV_HEADS, Q_HEADS))
