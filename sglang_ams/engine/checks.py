"""Debug mode (--ams-debug-checks) and the workspace statistics of the compaction step: host-side checks of what
a step did, some of which read GPU values back (and so sync)."""
from __future__ import annotations

import dataclasses
import logging

import torch

from .report import StepReport
from .runtime import Runtime
from .sglang_compat import allocated_len, committed_len, in_free_group, pool_idx, protected_len

logger = logging.getLogger("sglang_ams")


ATOL, RTOL = 2e-4, 2e-2        # torch.allclose's rule: |got - recomputed| <= ATOL + RTOL * |recomputed|
MATCHED = ("sglang-ams: window attention from the decode attention's LSE matches the recomputed one; scoring reads "
           "each key once")


def lse_stats(got: torch.Tensor, recomputed: torch.Tensor) -> torch.Tensor:
    """[close, max abs error, max value] of the decode-LSE window attention against the recomputed one, on the
    tensors' device (NaN compares false: not close)."""
    diff = (got - recomputed).abs()
    close = (diff <= ATOL + RTOL * recomputed.abs()).all()
    return torch.stack([close.float(), diff.max().float(), recomputed.abs().max().float()])


def check_decode_lse(got: torch.Tensor, recomputed: torch.Tensor, items) -> None:
    """Debug mode: window attention from the decode attention's LSE equals the kernel's own two-pass result
    (catches a wrong LSE convention or a query/LSE mismatch in the ring)."""
    close, err, scale = lse_stats(got, recomputed).tolist()
    logger.debug("sglang-ams: decode-LSE window attention max abs error %.3g (max value %.3g)", err, scale)
    if not close:
        raise AssertionError(f"window attention from the decode LSE differs from the recomputed one by {err:.3g} "
                             f"(max value {scale:.3g}) for requests {[d.req.rid for d in items]}")


@dataclasses.dataclass
class PendingLseCheck:
    """The first decode-LSE comparison, queued on the GPU: `values` (close, max error, max value) are valid on
    the host once `done` has passed (None: at once, off a GPU)."""
    values: torch.Tensor
    done: object
    rids: list


def start_lse_check(got: torch.Tensor, recomputed: torch.Tensor, items) -> PendingLseCheck:
    """Queue the comparison and its copy to pinned host memory behind an event: no host sync, so the first
    compaction step does not wait for the GPU (with that sync the first step took 50-78 ms of scheduler time on
    the H100 and H200 serving runs, later ones at most 8-25 ms)."""
    stats = lse_stats(got, recomputed)
    rids = [d.req.rid for d in items]
    if stats.device.type != "cuda":
        return PendingLseCheck(stats, None, rids)
    host = torch.empty(3, dtype=torch.float32, pin_memory=True)
    host.copy_(stats, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return PendingLseCheck(host, done, rids)


def settle_lse_check(rt: Runtime) -> None:
    """At the start of the step after the comparison was queued: on a match scoring takes the decode LSE from
    then on; on a mismatch (an attention kernel with another LSE convention) it recomputes it. Settling at a
    fixed step keeps selections independent of GPU timing; the comparison ran at least a decode step earlier,
    so waiting for its event costs nothing in practice."""
    check = rt.decode_lse_check
    if check is None:
        return
    if check.done is not None and not check.done.query():
        check.done.synchronize()
    rt.decode_lse_check = None
    close, err, scale = check.values.tolist()
    logger.debug("sglang-ams: decode-LSE window attention max abs error %.3g (max value %.3g)", err, scale)
    if close:
        rt.decode_lse_ok = True
        logger.info(MATCHED)
    else:
        rt.decode_lse_ok = False
        logger.warning("sglang-ams: window attention from the decode LSE differs from the recomputed one by "
                       "%.3g (max value %.3g) for requests %s; scoring recomputes the LSE from now on",
                       err, scale, check.rids)


def verify_decode_lse(rt: Runtime, attention, mean_rows, last_row, items):
    """Until the decode attention's LSE is known to match, scoring that took it is recomputed by the kernel's
    own two passes. Debug mode compares every time, on the host, and raises on a mismatch. Otherwise the first
    such chunk queues one comparison (start_lse_check) and uses the recomputed rows, as do the other chunks of
    its step; the next step settles it (settle_lse_check). Returns the rows to use and whether they are the
    decode-LSE ones."""
    check_mean, check_last = attention()
    if rt.settings.debug_checks:
        check_decode_lse(mean_rows, check_mean, items)
        if rt.decode_lse_ok is None:
            logger.info(MATCHED)
        rt.decode_lse_ok = True
        return mean_rows, last_row, True
    rt.decode_lse_check = start_lse_check(mean_rows, check_mean, items)
    return check_mean, check_last, False


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


def check_pinned_in_place(indices: torch.Tensor, items) -> None:
    """Debug mode: slot j < pinned keeps token j, so the move never writes a tree-owned (or sink) slot."""
    for j, d in enumerate(items):
        head = indices[j, ..., : d.pinned]
        want = torch.arange(d.pinned, device=indices.device).expand_as(head)
        if not torch.equal(head, want):
            raise AssertionError(f"request {d.req.rid}: the selection moves pinned tokens (pinned {d.pinned}); "
                                 "compaction would write slots the radix tree owns")


def free_before(rt: Runtime):
    """The allocator's free size before a step, when debug mode will compare it with the report (else None)."""
    return rt.allocator.available_size() if rt.settings.debug_checks else None


def check_invariants(rt: Runtime, batch, report: StepReport, available_before=None) -> None:
    """Debug mode: SGLang's lengths agree with each other and with the report, the pinned prefix is page-aligned,
    and the allocator got back exactly the slots the report says."""
    lengths = batch.seq_lens_cpu.tolist()
    for i, req in enumerate(batch.reqs):
        assert committed_len(req) == allocated_len(req) == lengths[i], \
            (req.rid, committed_len(req), allocated_len(req), lengths[i])
        assert protected_len(req) % rt.page_size == 0, (req.rid, protected_len(req))
        assert protected_len(req) <= lengths[i]
    rows = {pool_idx(req): (req, lengths[i]) for i, req in enumerate(batch.reqs)}
    for r in report.requests:
        req, length = rows[r.row]
        assert req.rid == r.rid and length == r.keep, (r, length)
    # (inside a free group the allocator only stages frees; the scheduler runs the step outside one)
    if available_before is not None and not in_free_group(rt.allocator):
        grown = rt.allocator.available_size() - available_before
        assert grown == report.freed, f"the allocator got {grown} slots back, the report says {report.freed}"
    logger.debug("sglang-ams: compaction step: %s", report.summary())
