"""Compile the compaction kernels when the server starts, not in its first compaction step.

Triton compiles a kernel on first use, once per constexpr variant (arguments that vary between steps are
unspecialised, see kernels/). Left to the first real compaction, that stalls every running request for a second
or more. Here each reachable variant runs once on the pool's dummy slot 0 (SGLang reserves it for padded
tokens, so its contents mean nothing): window attention with the decode LSE and with every split count the
planner can choose (recomputed LSE), with and without the last row (TOVA); the dense gather; the compaction
kernel with nothing to move; the torch selection ops once on the device (lazy CUDA module loading); with
`--ams-selection triton` (the default) the selection kernel for every block a row can get, with and without
carried credit; and one pinned host-to-device copy.
"""
from __future__ import annotations

import time

import torch

from ..config import PolicyConfig
from ..kernels.compaction import compact_kv
from ..kernels import select_ams as ams_kernel
from ..kernels.gather import gather_dense
from ..kernels.scoring import default_num_splits, window_attention_pool
from ..selection import select_ams, select_topk
from ..transfer import to_device
from .runtime import Runtime
from .workspace import reachable_configs

TOKENS = 256        # length of the scratch request (all of it on slot 0)


def warm_up(rt: Runtime) -> float:
    """Run every kernel variant once; returns the seconds it took (compilations included)."""
    start = time.perf_counter()
    shape, dev = rt.shape, rt.device
    width = rt.req_to_token_pool.req_to_token.shape[1]
    r2t = torch.zeros((1, width), dtype=torch.int32, device=dev)          # every position -> dummy slot 0
    rows = torch.zeros(1, dtype=torch.int64, device=dev)
    tokens = min(TOKENS, width)
    lengths = torch.full((1,), tokens, dtype=torch.int32, device=dev)
    k_ptrs, v_ptrs = rt.k_ptrs[:1], rt.v_ptrs[:1]
    kw = dict(kv_dtype=shape.dtype, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
              slot_stride=rt.slot_stride)
    if rt.ring is not None:
        w = rt.ring.window
        queries = torch.zeros(1, 1, shape.num_q_heads, w, shape.head_dim, dtype=shape.dtype, device=dev)
        lse = torch.zeros(1, 1, shape.num_q_heads, w, dtype=torch.float32, device=dev)
        # The most splits the planner's smallest chunk (one request, one layer, the context length) can get.
        most = default_num_splits(shape.num_kv_heads, width, dev)
        for last in (False, True):
            window_attention_pool(k_ptrs, r2t, rows, lengths, queries, want_last_row=last, max_len=tokens,
                                  row_lse=lse, num_splits=1, **kw)
            splits = 1
            while splits <= most:
                window_attention_pool(k_ptrs, r2t, rows, lengths, queries, want_last_row=last, max_len=tokens,
                                      num_splits=splits, **kw)
                splits *= 2
    gather_dense(k_ptrs, r2t, rows, lengths, tokens, num_layers=1, num_heads=shape.num_kv_heads,
                 head_dim=shape.head_dim, slot_stride=rt.slot_stride, dtype=shape.dtype)
    keep = torch.arange(tokens, device=dev).expand(1, 1, shape.num_kv_heads, tokens)   # keep[j] = j: no move
    compact_kv(k_ptrs, v_ptrs, r2t, rows, keep, torch.full((1,), tokens, device=dev), **kw)
    _warm_selection(rt, tokens)
    to_device([0], torch.int64, dev)        # the pinned-memory cache's first block (cudaHostAlloc) is taken now
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - start


def _warm_selection(rt: Runtime, tokens: int) -> None:
    dev, h = rt.device, rt.shape.num_kv_heads
    g = torch.Generator(device=dev).manual_seed(0)
    scores = torch.rand(1, 1, h, tokens, generator=g, device=dev)
    lengths = torch.full((1,), tokens, dtype=torch.long, device=dev)
    pinned, keep = torch.full((1,), 4, device=dev), torch.full((1,), tokens // 2, device=dev)
    cfg = PolicyConfig(policy="ams", budget=tokens // 2 - 4, interval=16, lmin=8, qmin=2)
    select_ams(scores, scores, lengths, pinned, keep, cfg, credit=scores, k_max=tokens // 2)
    select_topk(scores, lengths, pinned, keep, 8, k_max=tokens // 2)
    if rt.settings.selection == "triton":
        _warm_selection_kernel(rt)


def _warm_selection_kernel(rt: Runtime) -> None:
    """The AMS settings a request can run under (the server's: an override can turn AMS on, not change them) on one
    row of each block size; evidence exactly when the mass is used, as the selector passes it. Nothing where no
    request can run AMS (a query-free server)."""
    dev, h = rt.device, rt.shape.num_kv_heads
    ams = [c for c in reachable_configs(rt.settings.policy) if c.policy == "ams"]
    if not ams:
        return
    cfg = ams[0].selector
    block = ams_kernel.block_for(1, dev)
    while block <= ams_kernel.MAX_TOKENS:
        scores = torch.rand(1, 1, h, block, device=dev)
        lengths = torch.full((1,), block, dtype=torch.long, device=dev)
        pinned, keep = torch.zeros(1, dtype=torch.long, device=dev), torch.full((1,), block // 2, device=dev)
        for credit in ((None, scores) if cfg.use_credit else (None,)):
            select_ams(scores, scores if cfg.use_mass else None, lengths, pinned, keep, cfg, credit,
                       k_max=block // 2, kernel=True)
        block *= 2
