"""Gather a batch of requests' K or V from SGLang's per-layer pool into a dense [N, L, H, T, d] tensor.

Scorers that read keys or values themselves (KeyDiff, R-KV, Expected Attention, TriAttention) work on dense
tensors; this builds them in one launch for all layers instead of a Python loop over layers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# The group's layer count and padded length vary from step to step: not specialised, so one compilation
# (at the server's warm-up) serves every step.
@triton.jit(do_not_specialize=["num_layers", "T_OUT"])
def _gather_kernel(ptrs, req_to_token, rows, lengths, out, r2t_stride, slot_stride, num_layers, T_OUT,
                   NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    n = tl.program_id(0)
    lh = tl.program_id(1)
    tb = tl.program_id(2)
    layer = lh // NUM_HEADS
    head = lh % NUM_HEADS
    length = tl.load(lengths + n)
    row = tl.load(rows + n).to(tl.int64)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = t < length
    slot = tl.load(req_to_token + row * r2t_stride + t, mask=valid, other=0).to(tl.int64)
    base = tl.load(ptrs + layer).to(tl.pointer_type(out.dtype.element_ty))
    d = tl.arange(0, HEAD_DIM)
    x = tl.load(base + slot[:, None] * slot_stride + head * HEAD_DIM + d[None, :], mask=valid[:, None], other=0.0)
    dst = ((n * num_layers + layer) * NUM_HEADS + head).to(tl.int64) * T_OUT + t
    tl.store(out + dst[:, None] * HEAD_DIM + d[None, :], x, mask=(t < T_OUT)[:, None])


def gather_dense(ptrs: torch.Tensor, req_to_token: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor,
                 num_tokens: int, *, num_layers: int, num_heads: int, head_dim: int, slot_stride: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """[N, L, H, num_tokens, d]: token t of request n is pool slot req_to_token[rows[n], t]; zeros past lengths[n]."""
    if head_dim & (head_dim - 1):
        raise ValueError(f"gather_dense: head_dim {head_dim} must be a power of two")
    n = rows.shape[0]
    out = torch.empty(n, num_layers, num_heads, num_tokens, head_dim, dtype=dtype, device=req_to_token.device)
    block_t = 64
    grid = (n, num_layers * num_heads, triton.cdiv(num_tokens, block_t))
    _gather_kernel[grid](ptrs, req_to_token, rows, lengths, out, req_to_token.stride(0), slot_stride, num_layers,
                         num_tokens, NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_T=block_t)
    return out


def pointer_table(buffers: list[torch.Tensor]) -> torch.Tensor:
    """int64 addresses of per-layer buffers (SGLang keeps them uint64; Triton wants int64)."""
    return torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64, device=buffers[0].device)
