"""In-place per-head compaction of K and V in SGLang's pool, all layers and all requests in one launch (Triton).

For every request n, layer l, KV head h and j < n_keep[n]:
    buffer_l[slot(n, j), h, :] = old buffer_l[slot(n, keep[n, l, h, j]), h, :]      for K and V,
with slot(n, p) = req_to_token[req_rows[n], p]. keep holds row positions, ascending per (n, l, h), so j's source
position keep[j] >= j. Afterwards positions [0, n_keep) of the row hold the kept tokens (composite slots: head h
of slot j holds head h's j-th kept token) and the row's tail can be freed.

Why it is race-free without scratch memory (extra memory: 0 bytes):
  * Programs never share bytes. One program owns (request, layer, head, K-or-V, head_dim chunk); distinct
    requests own distinct slots (a req_to_token row maps positions to distinct slots, and rows never share a
    slot past a pinned prefix, which keeps keep[j] == j and so is never written), and layers, K/V buffers, heads
    and dim chunks are disjoint byte ranges of a slot.
  * Inside a program, j is walked in ascending blocks of BLOCK_J. Block b writes positions [b*BJ, (b+1)*BJ)
    and reads positions keep[j] >= j >= b*BJ. So the reads of a later block b' > b (positions >= b'*BJ) never
    touch what block b wrote (positions < (b+1)*BJ <= b'*BJ); a read of block b may hit a position that a later
    block writes, but that write happens later in program order. Within a block, a read can hit a position the
    same block writes (keep[i] = j for i < j); a barrier between the block's loads and its stores orders every
    thread's loads before any thread's stores. Loads may move earlier freely (the next block's loads are issued
    before this block's stores: they read positions >= (b+1)*BJ, which this block does not write).
  * Copies with keep[j] == j are skipped (no load, no store): pinned prefixes and untouched heads cost nothing.

HBM traffic, for M = number of (n, l, h, j) with keep[j] != j (at most N*L*H*B), s = bytes per element:
    data      2 (K and V) * M * d * s read + the same written       (the formula benchmarks/kernels.py reports)
    indices   keep (4 or 8 B) and two req_to_token entries (8 B) per (n, l, h, j), shared by the K/V and
              dim-chunk programs of a head through L2.

Paged pools (page_size > 1): destinations are positions [0, n_keep) of the request's own row, whose slots keep
SGLang's page layout, so every page holding only positions >= align_up(n_keep, page_size) can be freed whole:
see `tail_to_free`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..transfer import to_device
from .scoring import tl_kv_dtype


@triton.jit
def _block_slots(r2t_row, keep_row, keep_sj, j0, count, BLOCK_J: tl.constexpr):
    """Block [j0, j0 + BLOCK_J): source and destination slots, and which rows move (keep[j] != j)."""
    j = j0 + tl.arange(0, BLOCK_J)
    in_range = j < count
    src_pos = tl.load(keep_row + j.to(tl.int64) * keep_sj, mask=in_range, other=0)
    moving = in_range & (src_pos != j)
    src_slot = tl.load(r2t_row + src_pos, mask=moving, other=0).to(tl.int64)
    dst_slot = tl.load(r2t_row + j, mask=moving, other=0).to(tl.int64)
    return src_slot, dst_slot, moving


@triton.jit(do_not_specialize=["keep_sn", "keep_sl", "keep_sh", "keep_len", "num_layers"])   # vary per step
def _compact_kernel(
        k_ptrs, v_ptrs, req_to_token, req_rows, keep, n_keep,
        r2t_stride, keep_sn, keep_sl, keep_sh, keep_sj, keep_len, slot_stride, num_layers,
        NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr, BLOCK_J: tl.constexpr,
        KV_DTYPE: tl.constexpr):
    pid = tl.program_id(0)                       # ((n * L + l) * H + h) * 2 + kv
    is_value = pid % 2
    h = (pid // 2) % NUM_KV_HEADS
    l = (pid // (2 * NUM_KV_HEADS)) % num_layers
    n = pid // (2 * NUM_KV_HEADS * num_layers)
    d = tl.program_id(1) * D_CHUNK + tl.arange(0, D_CHUNK)
    d_mask = d < HEAD_DIM

    address = tl.where(is_value == 1, tl.load(v_ptrs + l), tl.load(k_ptrs + l))
    base = tl.multiple_of(address.to(tl.pointer_type(KV_DTYPE)), 16)    # 16-byte vector loads and stores
    head = base + h * HEAD_DIM + d[None, :]
    r2t_row = req_to_token + tl.load(req_rows + n).to(tl.int64) * r2t_stride
    keep_row = keep + n.to(tl.int64) * keep_sn + l.to(tl.int64) * keep_sl + h.to(tl.int64) * keep_sh
    count = tl.minimum(tl.load(n_keep + n), keep_len)

    # Software pipeline: slots two blocks ahead, data one block ahead (index reads never alias the KV).
    src, dst, moving = _block_slots(r2t_row, keep_row, keep_sj, 0, count, BLOCK_J)
    data = tl.load(head + src[:, None] * slot_stride, mask=moving[:, None] & d_mask[None, :])
    next_src, next_dst, next_moving = _block_slots(r2t_row, keep_row, keep_sj, BLOCK_J, count, BLOCK_J)
    for j0 in range(0, count, BLOCK_J):
        # The next block reads positions >= j0 + BLOCK_J, which this block does not write: safe to load now.
        next_data = tl.load(head + next_src[:, None] * slot_stride, mask=next_moving[:, None] & d_mask[None, :])
        later_src, later_dst, later_moving = _block_slots(r2t_row, keep_row, keep_sj, j0 + 2 * BLOCK_J, count,
                                                          BLOCK_J)
        tl.debug_barrier()                       # every thread's loads of this block before any thread's stores
        tl.store(head + dst[:, None] * slot_stride, data, mask=moving[:, None] & d_mask[None, :])
        data, dst, moving = next_data, next_dst, next_moving
        next_src, next_dst, next_moving = later_src, later_dst, later_moving


@dataclasses.dataclass(frozen=True)
class CompactionConfig:
    block_j: int
    d_chunk: int
    num_warps: int


def compaction_config(head_dim: int, elem_size: int) -> CompactionConfig:
    """Fixed config picked on an H100 (bf16, d = 128): whole head rows (256 B) in blocks of 128 rows, 4 warps.
    Rows of up to 256 bytes per program; wider heads (or fp32) are split into chunks along d."""
    d_chunk = min(triton.next_power_of_2(head_dim), max(256 // elem_size, 16))
    return CompactionConfig(block_j=128, d_chunk=d_chunk, num_warps=4)


def check_keep(keep: torch.Tensor, n_keep: torch.Tensor) -> None:
    """Host-side check of the kernel's precondition (syncs; for tests and debugging)."""
    k = keep.shape[-1]
    j = torch.arange(k, device=keep.device)
    live = j[None, None, None, :] < n_keep.to(keep.device)[:, None, None, None]
    if (n_keep > k).any():
        raise ValueError(f"n_keep {n_keep.tolist()} exceeds keep's last dimension {k}")
    if ((keep < j) & live).any():
        raise ValueError("keep[n, l, h, j] < j: positions must be ascending and unique")
    ascending = keep[..., 1:] > keep[..., :-1]
    if (~ascending & live[..., 1:]).any():
        raise ValueError("keep must be strictly ascending per (request, layer, head)")


def compact_kv(k_ptrs: torch.Tensor, v_ptrs: torch.Tensor, req_to_token: torch.Tensor, req_rows: torch.Tensor,
               keep: torch.Tensor, n_keep: torch.Tensor, *, kv_dtype: torch.dtype, num_kv_heads: int, head_dim: int,
               slot_stride: int, validate: bool = False, config: CompactionConfig | None = None) -> None:
    """Move head h's kept tokens of every layer and request to positions [0, n_keep) of the request's row, in place.

    k_ptrs / v_ptrs [L] int64 per-layer buffer addresses (MHATokenToKVPool.k_data_ptrs / v_data_ptrs);
    keep [N, L, H, K] int32/int64 row positions, strictly ascending over j < n_keep[n] (entries past n_keep are
    ignored, e.g. -1); n_keep [N]. One launch; no host sync unless validate=True.
    """
    tl_dtype = tl_kv_dtype(kv_dtype, "compact_kv")
    n, num_layers, heads, keep_len = keep.shape
    if heads != num_kv_heads or k_ptrs.numel() != num_layers or v_ptrs.numel() != num_layers:
        raise ValueError(f"keep {tuple(keep.shape)} does not match num_kv_heads={num_kv_heads} and "
                         f"{k_ptrs.numel()} / {v_ptrs.numel()} layer pointers")
    if keep.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"keep must be int32 or int64, got {keep.dtype}")
    if req_to_token.stride(1) != 1:
        raise ValueError("req_to_token rows must be contiguous")
    if validate:
        check_keep(keep, n_keep)
    if n == 0 or keep_len == 0:
        return
    elem_size = torch.empty((), dtype=kv_dtype).element_size()
    cfg = config or compaction_config(head_dim, elem_size)
    grid = (n * num_layers * num_kv_heads * 2, triton.cdiv(head_dim, cfg.d_chunk))
    device = keep.device
    _compact_kernel[grid](
        k_ptrs, v_ptrs, req_to_token, req_rows.to(device=device, dtype=torch.int32),
        keep, n_keep.to(device=device, dtype=torch.int32),
        req_to_token.stride(0), *keep.stride(), keep_len, slot_stride, num_layers,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, D_CHUNK=cfg.d_chunk, BLOCK_J=cfg.block_j,
        KV_DTYPE=tl_dtype, num_warps=cfg.num_warps, num_stages=1)


def compaction_bytes(kept_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int, elem_size: int) -> int:
    """HBM bytes when every kept token moves: K and V, read and written."""
    return 2 * kept_tokens * num_layers * num_kv_heads * head_dim * elem_size * 2


def tail_pages(keeps: Sequence[int], lengths: Sequence[int], page_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Host arithmetic of the tails: per request, the first position to free, align_up(keep, page_size), and how
    many pages from there the row reaches below its length (CPU int64 [N] each)."""
    keep = torch.as_tensor(keeps, dtype=torch.int64).reshape(-1)
    length = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1)
    if bool((keep > length).any()):
        raise ValueError(f"kept {keep.tolist()} > lengths {length.tolist()}")
    start = (keep + page_size - 1) // page_size * page_size
    return start, ((length - start).clamp(min=0) + page_size - 1) // page_size


def tail_to_free(req_to_token: torch.Tensor, rows: Sequence[int], keeps: Sequence[int], lengths: Sequence[int],
                 page_size: int = 1) -> torch.Tensor:
    """The slots the allocator can take back after compaction (int64): every page of each request's row that
    holds only positions >= align_up(keep, page_size), below its length (page size 1: positions [keep, length)).
    Positions [keep, align_up(keep)) stay with the request, so the next decode token lands in its last page as
    SGLang expects. Pages come out whole and in row order, each as its page-aligned first slot and the slots
    after it (the paged allocator's layout): SGLang's `free_segment(slots, start_pos=0)` then reads one slot per
    page, with no `torch.unique` (a device sync). Lengths are host integers: one index build on the host and one
    gather on the device for all requests, no host sync."""
    return tail_slots(req_to_token, rows, *tail_pages(keeps, lengths, page_size), page_size)


def tail_slots(req_to_token: torch.Tensor, rows: Sequence[int], start: torch.Tensor, pages: torch.Tensor,
               page_size: int = 1) -> torch.Tensor:
    """tail_to_free from tail_pages' (start, pages)."""
    owner = torch.repeat_interleave(torch.arange(len(pages)), pages)
    index_in_tail = torch.arange(len(owner)) - (pages.cumsum(0) - pages)[owner]
    first_pos = start[owner] + index_in_tail * page_size            # row position of each freed page's first token
    row = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)[owner]
    device = req_to_token.device
    first_slot = req_to_token[to_device(row, torch.int64, device), to_device(first_pos, torch.int64, device)]
    first_slot = first_slot.to(torch.int64)
    return (first_slot[:, None] + torch.arange(page_size, device=device)).reshape(-1)


__all__ = ["compact_kv", "tail_pages", "tail_slots", "tail_to_free", "compaction_bytes", "check_keep",
           "compaction_config"]
