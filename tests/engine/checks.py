"""What every compaction step must leave behind (DESIGN.md section 4), checked against torch on a snapshot of
the pool taken before the step, and the scheduler loop that runs these checks on every step."""
from __future__ import annotations

import dataclasses

import torch
from sglang.srt.managers.schedule_batch import ScheduleBatch

from sglang_ams.compaction import gather_kept, plan, scorer_for
from sglang_ams.engine import request_state
from sglang_ams.engine import sglang_compat as compat
from sglang_ams.engine.report import ChunkReport, StepReport
from sglang_ams.scorers.base import ScoreInputs
from sglang_ams.window_attention import window_attention

from .harness import KV_HEADS, LAYERS, POOL_TOKENS, Env, forward


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


def check_selection(env: Env, c: ChunkReport, snap: Snap) -> None:
    """What plan got (keys, queries, positions, attention) and chose, against torch on the pre-compaction pool
    (from the chunk's trace)."""
    cfg, w, g = c.cfg, c.cfg.window, c.trace
    keys = [dense(snap.k, snap.r2t, it.row, it.length) for it in c.requests]
    values = [dense(snap.v, snap.r2t, it.row, it.length) for it in c.requests]
    lengths = torch.tensor([it.length for it in c.requests])
    for j, it in enumerate(c.requests):
        assert int(g.n_keep[j]) == it.keep == it.prefix + cfg.budget
        assert int(g.n_pinned[j]) == it.pinned == max(it.prefix, cfg.sink)
        if cfg.inputs.keys:             # the Triton gather read the same keys (and values) where declared
            assert torch.equal(g.inputs.keys[j, :, :, :it.length], keys[j])
        if cfg.inputs.values:
            assert torch.equal(g.inputs.values[j, :, :, :it.length], values[j])
    queries = query_pos = None
    if cfg.needs_queries:
        newest = [it.length - 1 + env.dropped[it.rid] for it in c.requests]     # logical position of "now"
        queries = torch.stack([window_queries(env, it.rid, n, w) for it, n in zip(c.requests, newest)])
        query_pos = torch.tensor([list(range(n - w + 1, n + 1)) for n in newest])
        assert torch.equal(g.inputs.queries, queries), "the ring returned other queries (or another order)"
        assert torch.equal(g.inputs.query_pos, query_pos)
    reference = ScoreInputs(keys=padded(keys), values=padded(values), lengths=lengths, queries=queries,
                            query_pos=query_pos, rope=env.rt.rope, scale=env.rt.shape.scale)
    could = (cfg.inputs.runs_attention and env.rt.settings.scoring_lse == "decode"
             and env.rt.decode_lse_ok is not False and c.ring_lse)
    # Outside debug mode the first step with such chunks uses the recomputed rows in all of them: its comparison
    # settles at the next step (checks.PendingLseCheck).
    trusted = env.rt.settings.debug_checks or env.lse_chunks_before_step > 0
    assert c.decode_lse == (could and trusted)
    env.lse_chunks += could
    if cfg.inputs.runs_attention:        # Triton window attention over the pool == torch over dense tensors
        ref = window_attention(reference.keys, queries, lengths, reference.scale)
        for name in ("mean_rows", "last_row") if cfg.inputs.last_row else ("mean_rows",):
            got = getattr(g.inputs.attn, name)
            torch.testing.assert_close(got, getattr(ref, name), atol=2e-5, rtol=1e-4)
    expected = plan(cfg, scorer_for(cfg), reference, g.n_pinned, g.n_keep, g.credit, k_max=int(g.n_keep.max()))
    for j, it in enumerate(c.requests):
        assert torch.equal(expected.indices[j, ..., :it.keep], g.selection.indices[j, ..., :it.keep]), it.rid


def check_compaction(env: Env, batch: ScheduleBatch, snap: Snap, report: StepReport) -> None:
    """Everything one compaction step must leave behind (DESIGN.md §4), for every chunk it ran."""
    rt, ps = env.rt, env.page_size
    dst_slots, expected_free, delta = set(), set(), {}
    for c in report.chunks:
        assert c.committed and c.layers == range(LAYERS)         # (no workspace bound here: one chunk per group)
        check_selection(env, c, snap)
        for j, it in enumerate(c.requests):
            rid, row, length, prefix, keep, pinned = it.rid, it.row, it.length, it.prefix, it.keep, it.pinned
            idx = c.trace.selection.indices[j, ..., :keep]       # [L, H, keep]
            # Kept indices: row positions, strictly ascending, pinned prefix and last keep_lastn always in.
            assert (idx[..., 1:] > idx[..., :-1]).all() and int(idx.max()) < length
            must = torch.cat([torch.arange(pinned), torch.arange(length - c.cfg.keep_lastn, length)])
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
            tail_slots = page_slots(env, snap.r2t[row, tail:length].tolist()) if tail < length else set()
            assert it.freed == len(tail_slots), (rid, it.freed, len(tail_slots))      # the report says so
            expected_free |= tail_slots
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
    assert env.allocator.available_size() - len(snap.free) == len(expected_free) == report.freed
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
            assert st.compacted and st.ring_row == 0 and (rt.ring is None or int(rt.ring.row_of[compat.pool_idx(r)]) == 0)
    for c in report.chunks:     # carried credit: one value per kept token of every (layer, head)
        for j, it in enumerate(c.requests):
            st = request_state.existing_state(next(r for r in batch.reqs if r.rid == it.rid))
            if c.cfg.selector.uses_credit:
                assert st.credit is not None and st.credit.shape == (LAYERS, KV_HEADS, it.keep)
                old = snap.credit[it.rid]      # the previous compaction's credit came back in, new tokens at 0
                k_old = 0 if old is None else old.shape[-1]
                if old is not None:
                    assert torch.equal(c.trace.credit[j, :, :, :k_old], old)
                assert (c.trace.credit[j, :, :, k_old:] == 0).all()
            else:
                assert st.credit is None
    assert rt.counters.compactions - snap.counters[0] == len(delta)
    assert rt.counters.tokens_freed - snap.counters[1] == sum(delta.values())


def step(env: Env, batch: ScheduleBatch) -> StepReport:
    """One scheduler iteration; returns the compaction step's report (every chunk of it already checked)."""
    snap = snapshot(env, batch)
    env.lse_chunks_before_step = env.lse_chunks
    report = env.compactor.step(batch)
    assert len(report.requests) == sum(len(c.requests) for c in report.chunks)
    if report:
        check_compaction(env, batch, snap, report)
    check_no_leak(env, batch.reqs)
    batch.prepare_for_decode()          # SGLang: next slot at row position seq_len, every length + 1
    forward(env, batch)
    check_no_leak(env, batch.reqs)
    return report


def compacted(report: StepReport) -> dict:
    """rid -> (length, keep) of the requests compacted in a step."""
    return {it.rid: (it.length, it.keep) for it in report.requests}
