"""Store one layer's decode queries (and their LSE) into the query ring, in one launch (Triton).

For every batch entry b with row = row_of[req_pool_indices[b]] != 0 and slot = positions[b] % W:
    buf[layer, row, slot] = q[b]          (cast to buf's dtype)
    lse_buf[layer, row, slot] = lse[b]    (float32; skipped when lse is None)
Entries without a ring row (row 0, padded graph entries included) load and store nothing.

Why: QueryRing.write / write_lse are two indexed stores per decoder layer per decode step, plus the row and slot
lookups, and every request without a row writes the trash row. Here the lookup, both stores and the skip are one
kernel of B programs, with int arguments only, so it is captured into the decode CUDA graph like any other launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .scoring import interpreting


# The layer's offset changes every call: not specialised, so one compilation serves every layer.
@triton.jit(do_not_specialize=["buf_layer_off", "lse_layer_off"])
def _store_kernel(buf, lse_buf, row_of, q, lse, req_pool_indices, positions,
                  buf_layer_off, lse_layer_off, window, q_sb, q_sh, q_sd, lse_sb, lse_sh,
                  HQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_H: tl.constexpr,
                  HAS_LSE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    row = tl.load(row_of + tl.load(req_pool_indices + b).to(tl.int64))
    if row != 0:                                                 # no row: nothing loaded, nothing stored
        slot = tl.load(positions + b).to(tl.int64) % window
        cell = row * window + slot                               # (row, slot) of a contiguous [rows+1, W] grid
        dst = buf + buf_layer_off + cell * (HQ * HEAD_DIM)
        src = q + b * q_sb
        for i0 in range(0, HQ * HEAD_DIM, BLOCK):                # the row [Hq * d] in BLOCK-sized pieces
            i = i0 + tl.arange(0, BLOCK)
            mask = i < HQ * HEAD_DIM
            x = tl.load(src + (i // HEAD_DIM) * q_sh + (i % HEAD_DIM) * q_sd, mask=mask)
            tl.store(dst + i, x.to(buf.dtype.element_ty), mask=mask)
        if HAS_LSE:
            h = tl.arange(0, BLOCK_H)
            x = tl.load(lse + b * lse_sb + h * lse_sh, mask=h < HQ)
            tl.store(lse_buf + lse_layer_off + cell * HQ + h, x.to(tl.float32), mask=h < HQ)


def store_queries(buf: torch.Tensor, lse_buf: torch.Tensor | None, row_of: torch.Tensor, layer: int,
                  q: torch.Tensor, lse: torch.Tensor | None, req_pool_indices: torch.Tensor,
                  positions: torch.Tensor) -> None:
    """QueryRing.write (and write_lse when lse is given) for one layer, skipping entries whose row is 0.

    buf [L, rows+1, W, Hq, d] and lse_buf [L, rows+1, W, Hq] float32, both contiguous; q [B, Hq*d] or [B, Hq, d]
    of any float dtype and any strides; lse [B, Hq] of any strides; req_pool_indices and positions [B] int32 or
    int64 (positions >= 0); row_of int64. One launch (none when B == 0), no host sync: graph-capturable.
    """
    _, _, window, heads, dim = buf.shape
    n = req_pool_indices.shape[0]
    has_lse = lse is not None
    if not buf.is_contiguous() or (has_lse and not lse_buf.is_contiguous()):
        raise ValueError("store_queries: buf and lse_buf must be contiguous (as QueryRing allocates them)")
    if q.shape[0] != n or tuple(q.shape[1:]) not in ((heads * dim,), (heads, dim)):
        raise ValueError(f"store_queries: q {tuple(q.shape)} is not [{n}, {heads * dim}] or [{n}, {heads}, {dim}]")
    if has_lse and tuple(lse.shape) != (n, heads):
        raise ValueError(f"store_queries: lse {tuple(lse.shape)} is not [{n}, {heads}]")
    if n == 0:
        return
    if interpreting() and q.dtype != buf.dtype:    # tests only: the interpreter's in-kernel cast truncates
        q = q.to(buf.dtype)
    # Element (b, h, i) of q sits at b * q_sb + h * q_sh + i * q_sd; [B, Hq*d] is the same seen as [B, Hq, d].
    q_strides = q.stride() if q.dim() == 3 else (q.stride(0), dim * q.stride(1), q.stride(1))
    lse_arg, lse_out = (lse, lse_buf) if has_lse else (q, buf)     # unused pointers when there is no LSE
    _store_kernel[(n,)](
        buf, lse_out, row_of, q, lse_arg, req_pool_indices, positions,
        layer * buf.stride(0), layer * lse_buf.stride(0) if has_lse else 0, window, *q_strides,
        *(lse.stride() if has_lse else (0, 0)),
        HQ=heads, HEAD_DIM=dim, BLOCK=min(triton.next_power_of_2(heads * dim), 4096),
        BLOCK_H=triton.next_power_of_2(heads), HAS_LSE=has_lse, num_warps=4)
