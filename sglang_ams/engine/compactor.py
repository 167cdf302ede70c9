"""The compaction step, run by the scheduler between decode steps (before `prepare_for_decode`).

For the requests of the running batch whose physical KV reached prefix + budget + interval (and that have a full
window of queries when their policy needs one), joined by those within the batch slack of that trigger: score
every token of every layer and KV head (Triton window attention + the scorer), select keep indices
(selection.py), move the kept K/V to the front of each request's row per head (Triton compaction, in place),
free the tail slots or pages, and fix SGLang's lengths. Lengths stay physical; the request's position offset
grows by what was dropped, and the decode step adds it to positions. Each chunk of a step runs inputs -> select ->
move -> commit; the step returns a StepReport (report.py) that the counters, debug mode (checks.py) and tests read.

Decisions (who compacts, how many tokens stay) come only from host state that every TP rank shares: lengths,
prefix lengths and budgets. Nothing here reads a GPU value back on the host, except the one check of the
decode-attention LSE per server (every launch in debug mode).
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from ..compaction import plan, scorer_for
from ..config import PolicyConfig
from ..kernels.compaction import compact_kv, tail_pages, tail_slots
from ..kernels.gather import gather_dense
from ..kernels.scoring import window_attention_pool
from ..scorers.base import Inputs, ScoreInputs
from ..transfer import to_device
from ..window_attention import WindowAttention
from . import pacing, step_profile, workspace
from .checks import (check_invariants, check_pinned_in_place, free_before, settle_lse_check, verify_decode_lse,
                     workspace_peak_end, workspace_peak_start)
from .counters import Timer, now
from .report import NOTHING, ChunkReport, RequestReport, StepReport, Trace
from .request_state import RequestState, release_ring_rows, state_of
from .runtime import Runtime
from .sglang_compat import pool_idx, protected_len, shrink_kv

NOT, JOIN, DUE = 0, 1, 2          # readiness of a request to compact in this step


def trigger_points(rt: Runtime, req, cfg: PolicyConfig) -> tuple[int, int]:
    """(cap, early): the length at which a request must compact, and the earliest at which it may (batch slack)."""
    cap = cfg.trigger_len(protected_len(req))
    return cap, cap - rt.settings.slack_tokens(cfg.interval)


def take_prefill_rows(rt: Runtime, batch) -> int:
    """Prefill window: before a prefill batch runs, give a ring row to each request whose whole prompt reaches the
    point where it would take one in decode; the attention-backend hook (patches/prefill_window.py) then writes the
    prompt's last W queries into it, so the request may compact PolicyConfig.MIN_DECODE_STEPS decode steps later.
    Returns the rows taken."""
    if rt.ring is None or not rt.settings.policy.prefill_window or rt.settings.prompt_cache == "cached":
        return 0                                        # (a cached prompt is pinned: nothing to compact early)
    taken = 0
    lengths = batch.seq_lens_cpu.tolist()
    for i, req in enumerate(batch.reqs):
        st = state_of(req, rt.settings.policy)
        if st is None or not st.cfg.needs_queries or st.ring_row or st.compacted:
            continue
        length, extend = lengths[i], batch.extend_lens[i]
        if length < len(req.origin_input_ids) + len(req.output_ids):
            continue                                    # a chunk before the last: its tail is not the prompt's
        _, early = trigger_points(rt, req, st.cfg)
        if length < early - st.cfg.window:
            continue
        st.ring_row, st.wake = rt.ring.acquire(pool_idx(req)), 0
        if st.ring_row:
            # Positions length - min(W, extend) .. length - 1 get their queries in this forward, without LSE.
            st.ring_start, st.ring_lse = length - min(st.cfg.window, extend), False
            taken += 1
    return taken


def group_key(cfg: PolicyConfig) -> PolicyConfig:
    """Requests whose configs differ only in budget/interval are compacted in one launch."""
    return cfg.replace(budget=PolicyConfig.budget, interval=PolicyConfig.interval)


@dataclasses.dataclass
class Due:
    index: int               # position in the batch
    req: object
    state: RequestState
    length: int              # physical KV length L
    prefix: int              # radix-owned prefix P (never touched)
    credit_parts: list = dataclasses.field(default_factory=list)    # [Lc, H, keep] per layer chunk, in order

    @property
    def keep(self) -> int:
        return self.state.cfg.kept_len(self.prefix)

    @property
    def pinned(self) -> int:
        return self.state.cfg.pinned_len(self.prefix)

    def report(self, freed: int = 0) -> RequestReport:
        return RequestReport(self.req.rid, pool_idx(self.req), self.length, self.prefix, self.keep, self.pinned, freed)


@dataclasses.dataclass
class Launch:
    """The index tensors one chunk's kernels share (host values copied to the device once)."""
    layers: range
    k_ptrs: torch.Tensor
    v_ptrs: torch.Tensor
    rows: torch.Tensor       # req_pool_idx per request
    lengths: torch.Tensor    # int32 physical lengths
    n_keep: torch.Tensor
    n_pinned: torch.Tensor
    t_max: int
    k_max: int


class Compactor:
    def __init__(self, rt: Runtime, trace: bool = False):
        self.rt = rt
        self.trace = trace          # keep each chunk's selection inputs in its report (tests; holds memory)
        self._scorers: dict = {}
        self._timer = Timer(rt.device)

    def _scorer(self, cfg: PolicyConfig):
        key = group_key(cfg)
        if key not in self._scorers:
            self._scorers[key] = scorer_for(cfg)
        return self._scorers[key]

    # --- which requests --------------------------------------------------------------------------------------
    def _readiness(self, req, st: RequestState, length: int) -> int:
        """DUE at its trigger (prefix + budget + interval), JOIN within the batch slack before it, else NOT.

        A policy that reads queries is ready only with a full window of them: it takes a ring row W tokens
        before the earliest point it may compact (or at prefill: take_prefill_rows).

        A NOT that only growth can end records the length it waits for (st.wake): due_requests skips the request
        until then, so a step of hundreds of requests far from their triggers costs one comparison each. Losing a
        row (compaction, release) clears it."""
        cfg = st.cfg
        cap, early = trigger_points(self.rt, req, cfg)
        st.wake = 0
        if req.decode_batch_idx < cfg.MIN_DECODE_STEPS:
            return NOT
        if cfg.needs_queries:
            ring = self.rt.ring
            if not st.ring_row:
                if length < early - cfg.window:
                    st.wake = early - cfg.window
                    return NOT
                st.ring_row = ring.acquire(pool_idx(req))
                if st.ring_row:
                    st.ring_start = length      # the query of this position is written by the coming step
                    st.wake = length + cfg.window
                elif length >= cap:
                    self.rt.counters.ring_waits += 1
                return NOT
            if length - st.ring_start < cfg.window:
                st.wake = st.ring_start + cfg.window
                return NOT
        if length < early:
            st.wake = early
            return NOT
        return DUE if length >= cap else JOIN

    def due_requests(self, batch) -> list[Due]:
        """Requests at their trigger, plus those within the slack (only when at least one is at its trigger:
        one compaction step serves them all, and the per-step launch cost is paid once). Under
        --ams-step-requests, the most urgent of them that pacing.paced_count lets through."""
        server_cfg = self.rt.settings.policy
        lengths = batch.seq_lens_cpu.tolist()
        due, join = [], []
        for i, req in enumerate(batch.reqs):
            st = state_of(req, server_cfg)
            if st is None or lengths[i] < st.wake:
                continue
            ready = self._readiness(req, st, lengths[i])
            if ready != NOT:
                (due if ready == DUE else join).append(Due(i, req, st, lengths[i], protected_len(req)))
        candidates = due + join
        limit = self.rt.settings.step_requests
        if not limit:
            return candidates if due else []
        # Most urgent first (a stable sort: ties in batch order, the same on every TP rank).
        urgent = sorted(((self._deadline(d) - d.length, d) for d in candidates), key=lambda pair: pair[0])
        return [d for _, d in urgent[:pacing.paced_count([left for left, _ in urgent], limit)]]

    def _deadline(self, d: Due) -> int:
        """The length by which a ready request must compact under pacing: its trigger, or, for one that became
        ready already past it (a long prompt, or a wait for a ring row), that length plus the overdue wait
        admission reserved (EngineSettings.overdue_wait). Records that length on the request the first time."""
        st = d.state
        cap = trigger_points(self.rt, d.req, st.cfg)[0]
        if d.length > cap and not st.overdue_since:
            st.overdue_since = d.length
        return st.overdue_since + self.rt.settings.overdue_wait(st.cfg.interval) if st.overdue_since else cap

    # --- the step --------------------------------------------------------------------------------------
    def step(self, batch) -> StepReport:
        """Compact every due request of a decode batch; returns what was done."""
        if not batch.reqs:
            return NOTHING
        due = self.due_requests(batch)
        if not due:
            return NOTHING
        rt = self.rt
        with step_profile.scope(rt.settings.profile_steps, rt.counters.launches, len(due), rt.device):
            return self._step(batch, due)

    def _step(self, batch, due: list[Due]) -> StepReport:
        start = now()
        rt = self.rt
        if rt.overlap and rt.forward_stream is not None:
            # The previous forward may still read these KV slots and write the newest K/V and queries.
            torch.cuda.current_stream().wait_stream(rt.forward_stream)
        available = free_before(rt)
        settle_lse_check(rt)
        groups: dict = {}
        for d in due:
            groups.setdefault(group_key(d.state.cfg), []).append(d)
        chunks = []
        for items in groups.values():
            for chunk in self.chunks(items):
                # Per chunk: what earlier chunks committed (credit) is state, not this chunk's workspace.
                peak = workspace_peak_start(rt.device)
                done = self._compact_chunk([items[i] for i in chunk.members], chunk.layers)
                chunks.append(dataclasses.replace(done, workspace_peak=workspace_peak_end(rt.device, peak)))
        self._shrink_batch(batch, due)
        report = StepReport(tuple(chunks), now() - start)
        rt.counters.step_done(report)
        if rt.settings.debug_checks:
            check_invariants(rt, batch, report, available)
        return report

    def chunk_cost(self, cfg: PolicyConfig) -> workspace.ChunkCost:
        shape = self.rt.shape
        return workspace.chunk_cost(cfg, self._scorer(cfg), num_kv_heads=shape.num_kv_heads,
                                    group=shape.group_size, head_dim=shape.head_dim,
                                    elem_size=shape.dtype.itemsize)

    def chunks(self, items: list[Due]) -> list[workspace.Chunk]:
        """The group cut so that no chunk's temporaries pass the bound reserved at startup (host arithmetic)."""
        cost = self.chunk_cost(items[0].state.cfg)
        return workspace.plan_chunks([d.length for d in items], self.rt.shape.num_layers, cost,
                                     self.rt.workspace_bytes)

    def _compact_chunk(self, items: list[Due], layers: range | None = None) -> ChunkReport:
        """Inputs, selection and move of the KV of `items` over `layers` (default: all); after a request's last
        layer chunk, commit it (free its tail, fix lengths and offsets)."""
        shape = self.rt.shape
        launch = self._launch(items, layers if layers is not None else range(shape.num_layers))
        cfg = items[0].state.cfg
        ring_lse = all(d.state.ring_lse for d in items)
        t0 = self._timer.mark()
        inputs, credit, decode_lse = self._inputs(items, launch)
        sel = self._select(items, launch, inputs, credit)
        trace = Trace(inputs, launch.n_pinned.clone(), launch.n_keep.clone(),
                      None if credit is None else credit.clone(), sel) if self.trace else None
        del inputs, credit                              # (their memory is free for the move)
        t1 = self._timer.mark()
        self._move(launch, sel)
        t2 = self._timer.mark()
        if sel.credit is not None:
            for j, d in enumerate(items):
                d.credit_parts.append(sel.credit[j, :, :, : d.keep])
        committed = launch.layers.stop == shape.num_layers
        freed = self._commit(items, launch.rows) if committed else [0] * len(items)
        return ChunkReport(cfg, launch.layers, tuple(d.report(f) for d, f in zip(items, freed)), committed,
                           ring_lse, decode_lse, gpu_marks=(t0, t1, t2), trace=trace)

    def _launch(self, items: list[Due], layers: range) -> Launch:
        rt, dev = self.rt, self.rt.device
        return Launch(
            layers, rt.k_ptrs[layers.start:layers.stop], rt.v_ptrs[layers.start:layers.stop],
            rows=to_device([pool_idx(d.req) for d in items], torch.int64, dev),
            lengths=to_device([d.length for d in items], torch.int32, dev),
            n_keep=to_device([d.keep for d in items], torch.int64, dev),
            n_pinned=to_device([d.pinned for d in items], torch.int64, dev),
            t_max=max(d.length for d in items), k_max=max(d.keep for d in items))

    def _inputs(self, items: list[Due], launch: Launch):
        """What the scorer reads (window queries, attention, dense K/V) and the carried credit; and whether the
        window attention took the decode attention's LSE."""
        rt, shape = self.rt, self.rt.shape
        cfg = items[0].state.cfg
        dev = rt.device
        r2t = rt.req_to_token_pool.req_to_token
        layers, rows, lengths, t_max = launch.layers, launch.rows, launch.lengths, launch.t_max
        n, nl = len(items), len(layers)
        k_ptrs, v_ptrs = launch.k_ptrs, launch.v_ptrs
        need = cfg.inputs
        queries = query_pos = attn = row_lse = None
        decode_lse = False
        if need.reads_window or need.positions:      # logical position of each request's newest query
            newest = to_device([d.length - 1 + d.state.pos_offset for d in items], torch.int64, dev)
        if need.reads_window:
            ring_rows = to_device([d.state.ring_row for d in items], torch.int64, dev)
            queries, query_pos = rt.ring.window_queries(ring_rows, newest, layers)
        elif need.positions:        # (the ring's positions without its queries: the last W logical positions)
            query_pos = newest[:, None] - (cfg.window - 1) + torch.arange(cfg.window, device=dev)[None, :]
        if need.runs_attention:
            attention = functools.partial(
                window_attention_pool, k_ptrs, r2t, rows, lengths, queries, kv_dtype=shape.dtype,
                num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim, slot_stride=rt.slot_stride,
                scale=shape.scale, want_last_row=need.last_row, max_len=t_max)
            if rt.settings.scoring_lse == "decode" and rt.ring.has_lse and rt.decode_lse_ok is not False \
                    and rt.decode_lse_check is None and all(d.state.ring_lse for d in items):
                row_lse = rt.ring.window_lse(ring_rows, newest, layers)     # keys are then read once
            mean_rows, last_row = attention(row_lse=row_lse)
            if row_lse is not None and (rt.decode_lse_ok is None or rt.settings.debug_checks):
                mean_rows, last_row, decode_lse = verify_decode_lse(rt, attention, mean_rows, last_row, items)
            else:
                decode_lse = row_lse is not None
            attn = WindowAttention(mean_rows=mean_rows, last_row=last_row)
        keys, values = self._dense_kv(need, k_ptrs, v_ptrs, rows, lengths, n, nl, t_max)
        inputs = ScoreInputs(keys=keys, values=values, lengths=lengths.long(), queries=queries,
                             query_pos=query_pos, rope=rt.rope if need.rope else None, scale=shape.scale, attn=attn,
                             layer_start=layers.start, model_layers=shape.num_layers, heads=rt.heads)
        credit = self._credit(items, t_max, layers) if cfg.selector.uses_credit else None
        return inputs, credit, decode_lse

    def _select(self, items: list[Due], launch: Launch, inputs: ScoreInputs, credit):
        cfg = items[0].state.cfg
        sel = plan(cfg, self._scorer(cfg), inputs, launch.n_pinned, launch.n_keep, credit, k_max=launch.k_max,
                   kernel=self.rt.settings.selection == "triton")
        if self.rt.settings.debug_checks:
            check_pinned_in_place(sel.indices, items)
        return sel

    def _move(self, launch: Launch, sel) -> None:
        rt, shape = self.rt, self.rt.shape
        compact_kv(launch.k_ptrs, launch.v_ptrs, rt.req_to_token_pool.req_to_token, launch.rows, sel.indices,
                   launch.n_keep, kv_dtype=shape.dtype, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                   slot_stride=rt.slot_stride)

    def _commit(self, items: list[Due], rows: torch.Tensor) -> list[int]:
        """A request's KV is compacted on every layer: free its tail, shorten its lengths, grow its offset.
        Returns the slots freed per request."""
        rt = self.rt
        freed = free_tails(rt.allocator, rt.req_to_token_pool.req_to_token, [pool_idx(d.req) for d in items],
                           [d.keep for d in items], [d.length for d in items])
        offsets = []
        for d in items:
            dropped = d.length - d.keep
            shrink_kv(d.req, dropped)
            st = d.state
            st.pos_offset += dropped
            st.compacted = True
            st.compactions += 1
            st.overdue_since = 0
            if d.credit_parts:
                # (cat copies: the chunk's selection tensors are not kept alive by views into them)
                st.credit = torch.cat(d.credit_parts, dim=0)
                d.credit_parts.clear()
            offsets.append(st.pos_offset)
        release_ring_rows(rt.ring, [d.state for d in items], [pool_idx(d.req) for d in items])
        rt.pos_offsets[rows] = to_device(offsets, torch.int64, rt.device)
        return freed

    def _dense_kv(self, need: Inputs, k_ptrs, v_ptrs, rows, lengths, n, nl, t_max):
        """Keys and values gathered from the pool where declared; else a shape-only stand-in (no memory)."""
        shape, rt = self.rt.shape, self.rt
        dims = (n, nl, shape.num_kv_heads, t_max, shape.head_dim)
        r2t = rt.req_to_token_pool.req_to_token
        kw = dict(num_layers=nl, num_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                  slot_stride=rt.slot_stride, dtype=shape.dtype)

        def dense(ptrs, wanted):
            if not wanted:
                return torch.empty((), dtype=shape.dtype, device=rt.device).expand(*dims)
            return gather_dense(ptrs, r2t, rows, lengths, t_max, **kw)
        return dense(k_ptrs, need.keys), dense(v_ptrs, need.values)

    def _credit(self, items: list[Due], t_max: int, layers: range) -> torch.Tensor:
        """Carried credit aligned with the current tokens; tokens added since the last compaction start at 0."""
        shape = self.rt.shape
        carried = [d.state.credit for d in items]
        if all(c is not None for c in carried) and len({c.shape for c in carried}) == 1:
            # The usual case (every request compacted before, to the same budget): one stack and one pad, not a
            # copy per request; each dispatched op costs host time in a step that is host-bound.
            kept = torch.stack(carried)[:, layers.start:layers.stop]
            return torch.nn.functional.pad(kept, (0, t_max - kept.shape[-1]))
        credit = torch.zeros(len(items), len(layers), shape.num_kv_heads, t_max, device=self.rt.device)
        for j, c in enumerate(carried):
            if c is not None:
                c = c[layers.start:layers.stop]
                credit[j, :, :, : c.shape[-1]] = c
        return credit

    def _shrink_batch(self, batch, due: list[Due]) -> None:
        """New length tensors (the in-flight forward and batch copies still hold the old ones)."""
        delta = [0] * len(batch.reqs)
        for d in due:
            delta[d.index] = d.length - d.keep
        delta_cpu = torch.tensor(delta, dtype=batch.seq_lens_cpu.dtype)
        batch.seq_lens_cpu = batch.seq_lens_cpu - delta_cpu
        delta_dev = to_device(delta_cpu, delta_cpu.dtype, batch.seq_lens.device)
        batch.seq_lens = batch.seq_lens - delta_dev.to(batch.seq_lens.dtype)
        if getattr(batch, "orig_seq_lens", None) is not None:
            batch.orig_seq_lens = batch.orig_seq_lens - delta_dev.to(batch.orig_seq_lens.dtype)
        batch.seq_lens_sum = None
        batch.batch_is_full = False


def free_tails(allocator, req_to_token: torch.Tensor, rows: list, keeps: list, lengths: list) -> list[int]:
    """Give SGLang's allocator what lies past each request's kept tokens: slots (page size 1) or the whole pages
    past the last partly kept one. One call for all requests; returns the slots freed per request."""
    ps = allocator.page_size
    start, pages = tail_pages(keeps, lengths, ps)
    # Whole pages, page-aligned: free_segment takes one slot per page (no torch.unique, so no device sync).
    allocator.free_segment(tail_slots(req_to_token, rows, start, pages, ps), start_pos=0)
    return (pages * ps).tolist()
