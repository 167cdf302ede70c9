"""The compaction step, run by the scheduler between decode steps (before `prepare_for_decode`).

For the requests of the running batch whose physical KV reached prefix + budget + interval (and that have a full
window of queries when their policy needs one), joined by those within the batch slack of that trigger: score
every token of every layer and KV head (Triton window attention + the scorer), select keep indices
(selection.py), move the kept K/V to the front of each request's row per head (Triton compaction, in place),
free the tail slots or pages, and fix SGLang's lengths. Lengths stay physical; the request's position offset
grows by what was dropped, and the decode step adds it to positions.

Decisions (who compacts, how many tokens stay) come only from host state that every TP rank shares: lengths,
prefix lengths and budgets. Nothing here reads a GPU value back on the host, except the one check of the
decode-attention LSE per server (every launch in debug mode).
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import torch

from ..compaction import plan, scorer_for
from ..config import PolicyConfig
from ..kernels.compaction import compact_kv
from ..kernels.gather import gather_dense
from ..kernels.scoring import window_attention_pool
from ..scorers.base import Inputs, ScoreInputs
from ..window_attention import WindowAttention
from . import workspace
from .counters import Timer, now
from .request_state import RequestState, state_of
from .runtime import Runtime
from .sglang_compat import allocated_len, committed_len, pool_idx, protected_len, shrink_kv

logger = logging.getLogger("sglang_ams")

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
        st.ring_row = rt.ring.acquire(pool_idx(req))
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


class Compactor:
    def __init__(self, rt: Runtime):
        self.rt = rt
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
        before the earliest point it may compact (or at prefill: take_prefill_rows)."""
        cfg = st.cfg
        cap, early = trigger_points(self.rt, req, cfg)
        if req.decode_batch_idx < cfg.MIN_DECODE_STEPS:
            return NOT
        if cfg.needs_queries:
            ring = self.rt.ring
            if not st.ring_row:
                if length >= early - cfg.window:
                    st.ring_row = ring.acquire(pool_idx(req))
                    if st.ring_row:
                        st.ring_start = length      # the query of this position is written by the coming step
                    elif length >= cap:
                        self.rt.counters.ring_waits += 1
                return NOT
            if length - st.ring_start < cfg.window:
                return NOT
        return DUE if length >= cap else JOIN if length >= early else NOT

    def due_requests(self, batch) -> list[Due]:
        """Requests at their trigger, plus those within the slack (only when at least one is at its trigger:
        one compaction step serves them all, and the per-step launch cost is paid once)."""
        server_cfg = self.rt.settings.policy
        lengths = batch.seq_lens_cpu.tolist()
        due, join = [], []
        for i, req in enumerate(batch.reqs):
            st = state_of(req, server_cfg)
            if st is None:
                continue
            ready = self._readiness(req, st, lengths[i])
            if ready != NOT:
                (due if ready == DUE else join).append(Due(i, req, st, lengths[i], protected_len(req)))
        return due + join if due else []

    # --- the step --------------------------------------------------------------------------------------
    def step(self, batch) -> int:
        """Compact every due request of a decode batch; returns how many were compacted."""
        if not batch.reqs:
            return 0
        due = self.due_requests(batch)
        if not due:
            return 0
        start = now()
        rt = self.rt
        if rt.overlap and rt.forward_stream is not None:
            # The previous forward may still read these KV slots and write the newest K/V and queries.
            torch.cuda.current_stream().wait_stream(rt.forward_stream)
        groups: dict = {}
        for d in due:
            groups.setdefault(group_key(d.state.cfg), []).append(d)
        for items in groups.values():
            for chunk in self.chunks(items):
                # Per chunk: what earlier chunks committed (credit) is state, not this chunk's workspace.
                peak = workspace_peak_start(rt.device)
                self._compact_group([items[i] for i in chunk.members], chunk.layers)
                rt.counters.workspace_peak(workspace_peak_end(rt.device, peak))
        self._shrink_batch(batch, due)
        rt.counters.step_done(now() - start)
        if rt.settings.debug_checks:
            check_invariants(rt, batch)
        return len(due)

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

    def _compact_group(self, items: list[Due], layers: range | None = None) -> None:
        """Score, select and move the KV of `items` over `layers` (default: all); after a request's last layer
        chunk, commit it (free its tail, fix lengths and offsets)."""
        rt, shape = self.rt, self.rt.shape
        layers = layers if layers is not None else range(shape.num_layers)
        cfg = items[0].state.cfg
        dev = rt.device
        r2t = rt.req_to_token_pool.req_to_token
        n, nl = len(items), len(layers)
        k_ptrs, v_ptrs = rt.k_ptrs[layers.start:layers.stop], rt.v_ptrs[layers.start:layers.stop]
        t_max = max(d.length for d in items)
        k_max = max(d.keep for d in items)
        rows = torch.tensor([pool_idx(d.req) for d in items], dtype=torch.int64, device=dev)
        lengths = torch.tensor([d.length for d in items], dtype=torch.int32, device=dev)
        n_keep = torch.tensor([d.keep for d in items], dtype=torch.int64, device=dev)
        n_pinned = torch.tensor([d.pinned for d in items], dtype=torch.int64, device=dev)

        t0 = self._timer.mark()
        scorer = self._scorer(cfg)
        need = cfg.inputs
        queries = query_pos = attn = row_lse = None
        if need.reads_window or need.positions:      # logical position of each request's newest query
            newest = torch.tensor([d.length - 1 + d.state.pos_offset for d in items], dtype=torch.int64, device=dev)
        if need.reads_window:
            ring_rows = torch.tensor([d.state.ring_row for d in items], dtype=torch.int64, device=dev)
            queries, query_pos = rt.ring.window_queries(ring_rows, newest, layers)
        elif need.positions:        # (the ring's positions without its queries: the last W logical positions)
            query_pos = newest[:, None] - (cfg.window - 1) + torch.arange(cfg.window, device=dev)[None, :]
        if need.runs_attention:
            attention = functools.partial(
                window_attention_pool, k_ptrs, r2t, rows, lengths, queries, kv_dtype=shape.dtype,
                num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim, slot_stride=rt.slot_stride,
                scale=shape.scale, want_last_row=need.last_row, max_len=t_max)
            if rt.settings.scoring_lse == "decode" and rt.ring.has_lse and rt.decode_lse_ok is not False \
                    and all(d.state.ring_lse for d in items):
                row_lse = rt.ring.window_lse(ring_rows, newest, layers)     # keys are then read once
            mean_rows, last_row = attention(row_lse=row_lse)
            if row_lse is not None and (rt.decode_lse_ok is None or rt.settings.debug_checks):
                mean_rows, last_row = self._verify_decode_lse(attention, mean_rows, last_row, items)
            if row_lse is not None and rt.decode_lse_ok:
                rt.counters.decode_lse_launches += 1
            attn = WindowAttention(mean_rows=mean_rows, last_row=last_row)
        keys, values = self._dense_kv(need, k_ptrs, v_ptrs, rows, lengths, n, nl, t_max)
        inputs = ScoreInputs(keys=keys, values=values, lengths=lengths.long(), queries=queries,
                             query_pos=query_pos, rope=rt.rope if need.rope else None, scale=shape.scale, attn=attn,
                             layer_start=layers.start, model_layers=shape.num_layers)
        credit = self._credit(items, t_max, layers) if cfg.selector.uses_credit else None
        sel = plan(cfg, scorer, inputs, n_pinned, n_keep, credit, k_max=k_max)
        del keys, values, inputs, attn, credit          # (their memory is free for the move)
        t1 = self._timer.mark()
        if rt.settings.debug_checks:
            check_pinned_in_place(sel.indices, items)
        compact_kv(k_ptrs, v_ptrs, r2t, rows, sel.indices, n_keep, kv_dtype=shape.dtype,
                   num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim, slot_stride=rt.slot_stride)
        t2 = self._timer.mark()
        rt.counters.gpu_span("score", t0, t1)
        rt.counters.gpu_span("compact", t1, t2)
        if sel.credit is not None:
            for j, d in enumerate(items):
                d.credit_parts.append(sel.credit[j, :, :, : d.keep])
        if layers.stop == shape.num_layers:
            self._commit(items, rows)

    def _commit(self, items: list[Due], rows: torch.Tensor) -> None:
        """A request's KV is compacted on every layer: free its tail, shorten its lengths, grow its offset."""
        rt = self.rt
        self._free_tails(items)
        offsets = []
        for d in items:
            dropped = d.length - d.keep
            shrink_kv(d.req, dropped)
            st = d.state
            st.pos_offset += dropped
            st.compacted = True
            st.compactions += 1
            if d.credit_parts:
                # (cat copies: the chunk's selection tensors are not kept alive by views into them)
                st.credit = torch.cat(d.credit_parts, dim=0)
                d.credit_parts.clear()
            if st.ring_row:
                rt.ring.release(pool_idx(d.req), st.ring_row)
                st.ring_row, st.ring_start, st.ring_lse = 0, -1, True
            offsets.append(st.pos_offset)
            rt.counters.record(d.length, d.keep)
        rt.pos_offsets[rows] = torch.tensor(offsets, dtype=torch.int64, device=rt.device)

    def _verify_decode_lse(self, attention, mean_rows, last_row, items):
        """The first scoring from the decode attention's LSE (every one in debug mode) is recomputed by the
        kernel's own two passes and compared: one host sync per server. On a mismatch (an attention kernel with
        another LSE convention) the server logs it and recomputes from then on; debug mode raises instead."""
        rt = self.rt
        check_mean, check_last = attention()
        try:
            check_decode_lse(mean_rows, check_mean, items)
        except AssertionError as err:
            if rt.settings.debug_checks:
                raise
            logger.warning("sglang-ams: %s; scoring recomputes the LSE from now on", err)
            rt.decode_lse_ok = False
            return check_mean, check_last
        if rt.decode_lse_ok is None:
            logger.info("sglang-ams: window attention from the decode attention's LSE matches the recomputed one; "
                        "scoring reads each key once")
        rt.decode_lse_ok = True
        return mean_rows, last_row

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
        credit = torch.zeros(len(items), len(layers), shape.num_kv_heads, t_max, device=self.rt.device)
        for j, d in enumerate(items):
            if d.state.credit is not None:
                c = d.state.credit[layers.start:layers.stop]
                credit[j, :, :, : c.shape[-1]] = c
        return credit

    def _free_tails(self, items: list[Due]) -> None:
        """Free what lies past the kept tokens: slots (page size 1) or whole pages past the last partial one."""
        rt = self.rt
        r2t = rt.req_to_token_pool.req_to_token
        ps = rt.page_size
        allocator = rt.allocator
        if ps == 1:
            tails = [r2t[pool_idx(d.req), d.keep: d.length] for d in items]
            allocator.free(torch.cat(tails).to(torch.int64))
            return
        for d in items:
            aligned = -(-d.keep // ps) * ps
            if aligned < d.length:
                allocator.free_segment(r2t[pool_idx(d.req), aligned: d.length].to(torch.int64), start_pos=aligned)

    def _shrink_batch(self, batch, due: list[Due]) -> None:
        """New length tensors (the in-flight forward and batch copies still hold the old ones)."""
        delta = [0] * len(batch.reqs)
        for d in due:
            delta[d.index] = d.length - d.keep
        delta_cpu = torch.tensor(delta, dtype=batch.seq_lens_cpu.dtype)
        batch.seq_lens_cpu = batch.seq_lens_cpu - delta_cpu
        if batch.seq_lens.is_cuda:
            delta_cpu = delta_cpu.pin_memory()
        delta_dev = delta_cpu.to(batch.seq_lens.device, non_blocking=True)
        batch.seq_lens = batch.seq_lens - delta_dev.to(batch.seq_lens.dtype)
        if getattr(batch, "orig_seq_lens", None) is not None:
            batch.orig_seq_lens = batch.orig_seq_lens - delta_dev.to(batch.orig_seq_lens.dtype)
        batch.seq_lens_sum = None
        batch.batch_is_full = False


def check_decode_lse(got: torch.Tensor, recomputed: torch.Tensor, items: list[Due]) -> None:
    """Debug mode: window attention from the decode attention's LSE equals the kernel's own two-pass result
    (catches a wrong LSE convention or a query/LSE mismatch in the ring)."""
    err = float((got - recomputed).abs().max())
    scale = float(recomputed.abs().max())
    logger.debug("sglang-ams: decode-LSE window attention max abs error %.3g (max value %.3g)", err, scale)
    if not torch.allclose(got, recomputed, atol=2e-4, rtol=2e-2):
        raise AssertionError(f"window attention from the decode LSE differs from the recomputed one by {err:.3g} "
                             f"(max value {scale:.3g}) for requests {[d.req.rid for d in items]}")


def workspace_peak_start(device: torch.device):
    """Allocated bytes before the step, with the allocator's peak reset (host-side statistics: no sync)."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def workspace_peak_end(device: torch.device, before) -> int:
    """The step's transient peak: the allocator's peak since the start, above what was allocated then."""
    if before is None:
        return 0
    return max(0, torch.cuda.max_memory_allocated(device) - before)


def check_pinned_in_place(indices: torch.Tensor, items: list[Due]) -> None:
    """Debug mode: slot j < pinned keeps token j, so the move never writes a tree-owned (or sink) slot."""
    for j, d in enumerate(items):
        head = indices[j, ..., : d.pinned]
        want = torch.arange(d.pinned, device=indices.device).expand_as(head)
        if not torch.equal(head, want):
            raise AssertionError(f"request {d.req.rid}: the selection moves pinned tokens (pinned {d.pinned}); "
                                 "compaction would write slots the radix tree owns")


def check_invariants(rt: Runtime, batch) -> None:
    """Debug mode: SGLang's lengths agree with each other and the pinned prefix is page-aligned."""
    lengths = batch.seq_lens_cpu.tolist()
    for i, req in enumerate(batch.reqs):
        assert committed_len(req) == allocated_len(req) == lengths[i], \
            (req.rid, committed_len(req), allocated_len(req), lengths[i])
        assert protected_len(req) % rt.page_size == 0, (req.rid, protected_len(req))
        assert protected_len(req) <= lengths[i]
