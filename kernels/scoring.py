"""Window-attention scoring over SGLang's KV pool (Triton).

`window_attention_pool` computes what `sglang_ams.window_attention.window_attention` computes on dense tensors,
but reads each request's keys in place: layer l's keys live in a buffer [slots, H, d] whose address is k_ptrs[l],
and position t of request n lives in slot req_to_token[req_rows[n], t].

One program owns (request n, layer l, KV head h, split s of the positions). It loads all G*W window queries of
the KV head once, as a [R_PAD, d] tile (row r = g*W_PAD + w, padded to >= 16 rows for tl.dot), and multiplies
it with blocks of BLOCK_T keys, so every key is read once per pass whatever G and W are.

Softmax needs each query row's log-sum-exp over all T keys before any probability is final, and splits of one
row run in different programs. Two passes, no inter-program waiting (the interpreter runs programs one by one):
  pass 1  per (n, l, h, split): running max and sum of exp per row over the split -> partials [NLH, S, R_PAD]
  pass 2  per (n, l, h, split): combine the S partials into the row LSE, recompute the logits of the split,
          p = exp(logit - LSE) under the causal window mask, reduce over the W rows (and the G heads)
          and write the outputs, zeros at positions >= length.
A single read of the keys would need the unnormalised [G*W, T] probabilities stored and re-read (fp32: 4*G*W
bytes per key, more than the key itself), so the second key read is the cheaper option, unless the row LSE is
already known. In the engine it is: each window query was a decode query, and FlashInfer's decode attention
returns its log-sum-exp over exactly the keys the causal window mask lets it see (no compaction happens while a
request collects its window). With `row_lse` given, pass 1 is skipped and every key is read once.

HBM traffic without row_lse (with it: one key pass, no partials; s = bytes per key element, Ln = length of request n, S = splits, R_PAD = padded G*W rows):
  keys          2 * sum_n(Ln) * L * H * d * s           (one read per pass; the dominant term)
  req_to_token  2 * sum_n(Ln) * L * H * 4               (L2-resident: one row serves every layer and head)
  queries       2 * S * N * L * Hq * W * d * s_q        (L2 hits after the first split)
  partials      N * L * H * S * R_PAD * 8 written, then read
  outputs       N * L * (Hq or H) * Tmax * 4 per output (mean_rows, and last_row if asked)
Compute per key and pass: 2*R_PAD*d FLOPs on tensor cores and R_PAD exp2; with R_PAD <= 128 and d = 128 both
stay under the key read time on an H100 (W = 32 with G = 8 pads to 256 rows and gets close to the exp limit).
"""
from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
NEG_BIG = tl.constexpr(-1.0e30)   # finite "minus infinity" for running maxima (keeps empty rows free of NaN)

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
SUPPORTED = "torch.bfloat16, torch.float16 (torch.float32 for tests)"


def tl_kv_dtype(kv_dtype: torch.dtype, who: str):
    """The Triton element type of a KV buffer; anything else (fp8, int8 ...) is refused by name."""
    if kv_dtype not in _TL_DTYPES:
        raise ValueError(f"{who}: kv_dtype {kv_dtype} is not supported; supported: {SUPPORTED}")
    return _TL_DTYPES[kv_dtype]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------- Triton side

@triton.jit
def _program_coords(pid, num_layers, NUM_KV_HEADS: tl.constexpr):
    h = pid % NUM_KV_HEADS
    l = (pid // NUM_KV_HEADS) % num_layers
    n = pid // (NUM_KV_HEADS * num_layers)
    return n, l, h


@triton.jit
def _load_query_tile(queries, n, l, h, q_sn, q_sl, q_sh, q_sw,
                     GROUP: tl.constexpr, WINDOW: tl.constexpr, G_PAD: tl.constexpr, W_PAD: tl.constexpr,
                     HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """[G_PAD * W_PAD, D_PAD] tile of the KV head's queries (already in the key dtype); padding is 0."""
    r = tl.arange(0, G_PAD * W_PAD)
    g = r // W_PAD
    w = r % W_PAD
    d = tl.arange(0, D_PAD)
    offs = (n.to(tl.int64) * q_sn + l.to(tl.int64) * q_sl + (h * GROUP + g)[:, None].to(tl.int64) * q_sh
            + w[:, None].to(tl.int64) * q_sw + d[None, :])
    mask = ((g < GROUP) & (w < WINDOW))[:, None] & (d < HEAD_DIM)[None, :]
    return tl.load(queries + offs, mask=mask, other=0.0).to(DOT_DTYPE)


@triton.jit
def _window_logits(q, key_base, r2t_row, t0, length, h, slot_stride, scale_log2,
                   GROUP: tl.constexpr, WINDOW: tl.constexpr, W_PAD: tl.constexpr, ROWS: tl.constexpr,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Logits (log2 units) of all rows against keys [t0, t0 + BLOCK_T), and the causal-window mask.

    Query w sits at key index length - WINDOW + w and sees keys up to it; padded rows see nothing."""
    t = t0 + tl.arange(0, BLOCK_T)
    in_seq = t < length
    slots = tl.load(r2t_row + t, mask=in_seq, other=0).to(tl.int64)
    d = tl.arange(0, D_PAD)
    k_offs = slots[:, None] * slot_stride + h * HEAD_DIM + d[None, :]
    keys = tl.load(key_base + k_offs, mask=in_seq[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    logits = tl.dot(q, tl.trans(keys.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * scale_log2
    r = tl.arange(0, ROWS)
    w = r % W_PAD
    real_row = (w < WINDOW) & (r // W_PAD < GROUP)
    last_seen = tl.where(real_row, length - WINDOW + w, -1)        # padded rows see nothing
    valid = (t[None, :] <= last_seen[:, None]) & in_seq[None, :]
    return tl.where(valid, logits, float("-inf")), valid


@triton.jit
def _key_base(k_ptrs, l, KV_DTYPE: tl.constexpr):
    base = tl.load(k_ptrs + l).to(tl.pointer_type(KV_DTYPE))
    return tl.multiple_of(base, 16)    # torch buffers are 256-byte aligned: lets the compiler use 16-byte loads


# Arguments that change with the group (its size, layer chunk, padded length, split count) are not
# specialised: one compilation per constexpr variant, made at the server's warm-up, serves every step.
_VARYING = ["q_sn", "q_sl", "num_layers", "split_len", "num_splits"]


@triton.jit(do_not_specialize=_VARYING)
def _lse_partials_kernel(
        k_ptrs, req_to_token, req_rows, lengths, queries, part_max, part_sum,
        r2t_stride, q_sn, q_sl, q_sh, q_sw, slot_stride, num_layers, split_len, num_splits, scale_log2,
        NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, WINDOW: tl.constexpr,
        G_PAD: tl.constexpr, W_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_T: tl.constexpr, KV_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Pass 1: per row, max and sum of exp2 of the logits over this split's keys."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n, l, h = _program_coords(pid, num_layers, NUM_KV_HEADS)
    ROWS: tl.constexpr = G_PAD * W_PAD
    length = tl.load(lengths + n)
    r2t_row = req_to_token + tl.load(req_rows + n).to(tl.int64) * r2t_stride
    key_base = _key_base(k_ptrs, l, KV_DTYPE)
    q = _load_query_tile(queries, n, l, h, q_sn, q_sl, q_sh, q_sw, GROUP, WINDOW, G_PAD, W_PAD,
                         HEAD_DIM, D_PAD, DOT_DTYPE)

    row_max = tl.full([ROWS], NEG_BIG, tl.float32)
    row_sum = tl.zeros([ROWS], tl.float32)
    start = split * split_len
    stop = tl.minimum(start + split_len, length)
    for t0 in range(start, stop, BLOCK_T):
        logits, _ = _window_logits(q, key_base, r2t_row, t0, length, h, slot_stride, scale_log2, GROUP, WINDOW,
                                   W_PAD, ROWS, HEAD_DIM, D_PAD, BLOCK_T, DOT_DTYPE, DOT_PRECISION)
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(logits - new_max[:, None]), axis=1)
        row_max = new_max
    offs = (pid.to(tl.int64) * num_splits + split) * ROWS + tl.arange(0, ROWS)
    tl.store(part_max + offs, row_max)
    tl.store(part_sum + offs, row_sum)


@triton.jit(do_not_specialize=_VARYING + ["lse_sn", "lse_sl", "out_len"])
def _probabilities_kernel(
        k_ptrs, req_to_token, req_rows, lengths, queries, part_max, part_sum, row_lse, mean_out, last_out,
        r2t_stride, q_sn, q_sl, q_sh, q_sw, lse_sn, lse_sl, lse_sh, slot_stride, num_layers, split_len, num_splits,
        out_len, scale_log2,
        NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, WINDOW: tl.constexpr,
        G_PAD: tl.constexpr, W_PAD: tl.constexpr, S_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        D_PAD: tl.constexpr, BLOCK_T: tl.constexpr, KV_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
        DOT_PRECISION: tl.constexpr, GROUP_MEAN: tl.constexpr, WANT_LAST: tl.constexpr, LSE_GIVEN: tl.constexpr):
    """Pass 2: row LSE (given, or combined from the partials), then softmax mass per key reduced over W (and G)."""
    # Reverse order: the first programs reread the keys pass 1 touched last, which may still sit in L2.
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    split = tl.num_programs(1) - 1 - tl.program_id(1)
    n, l, h = _program_coords(pid, num_layers, NUM_KV_HEADS)
    ROWS: tl.constexpr = G_PAD * W_PAD
    length = tl.load(lengths + n)

    # Row log-sum-exp (log2 units); rows that see no key get lse 0 and are masked anyway.
    r = tl.arange(0, ROWS)
    if LSE_GIVEN:       # row_lse [N, L, Hq, W]: row r is query head h*G + r // W_PAD, window slot r % W_PAD
        rg = r // W_PAD
        rw = r % W_PAD
        l_offs = (n.to(tl.int64) * lse_sn + l.to(tl.int64) * lse_sl + (h * GROUP + rg).to(tl.int64) * lse_sh + rw)
        lse = tl.load(row_lse + l_offs, mask=(rg < GROUP) & (rw < WINDOW), other=0.0)
    else:               # combine the partials of all splits
        s = tl.arange(0, S_PAD)
        p_offs = (pid.to(tl.int64) * num_splits + s[:, None]) * ROWS + r[None, :]
        p_mask = (s < num_splits)[:, None]
        maxes = tl.load(part_max + p_offs, mask=p_mask, other=NEG_BIG)
        sums = tl.load(part_sum + p_offs, mask=p_mask, other=0.0)
        big = tl.max(maxes, axis=0)
        total = tl.sum(sums * tl.exp2(maxes - big[None, :]), axis=0)
        lse = tl.where(total > 0, big + tl.log2(tl.maximum(total, 1e-30)), 0.0)

    # Output rows: one per query head (GROUP_MEAN: one per KV head); columns are positions.
    g = tl.arange(0, G_PAD)
    out_row = ((n * num_layers + l) * NUM_KV_HEADS + h).to(tl.int64) * out_len     # GROUP_MEAN: one row
    out_rows = ((n * num_layers + l) * (NUM_KV_HEADS * GROUP) + h * GROUP + g).to(tl.int64) * out_len
    row_mask = g < GROUP
    if GROUP_MEAN:      # the zero fill below writes the single row through g == 0
        out_rows = out_row + tl.zeros([G_PAD], tl.int64)
        row_mask = g == 0
    w3 = (tl.arange(0, W_PAD) == WINDOW - 1)[None, :, None]
    is_last_row = (r % W_PAD) == WINDOW - 1

    start = split * split_len
    end = tl.minimum(start + split_len, out_len)
    stop = tl.minimum(end, length)
    zero_from = start + tl.cdiv(tl.maximum(stop - start, 0), BLOCK_T) * BLOCK_T
    if stop > start:
        r2t_row = req_to_token + tl.load(req_rows + n).to(tl.int64) * r2t_stride
        key_base = _key_base(k_ptrs, l, KV_DTYPE)
        q = _load_query_tile(queries, n, l, h, q_sn, q_sl, q_sh, q_sw, GROUP, WINDOW, G_PAD, W_PAD,
                             HEAD_DIM, D_PAD, DOT_DTYPE)
        for t0 in range(start, stop, BLOCK_T):
            logits, valid = _window_logits(q, key_base, r2t_row, t0, length, h, slot_stride, scale_log2, GROUP,
                                           WINDOW, W_PAD, ROWS, HEAD_DIM, D_PAD, BLOCK_T, DOT_DTYPE, DOT_PRECISION)
            probs = tl.where(valid, tl.exp2(logits - lse[:, None]), 0.0)
            t = t0 + tl.arange(0, BLOCK_T)
            col_mask = t < out_len
            if GROUP_MEAN:      # every real row weighs 1 / (G * W): one column sum, no reshape
                mean = tl.sum(probs, axis=0) * (1.0 / (WINDOW * GROUP))
                tl.store(mean_out + out_row + t, mean, mask=col_mask)
                if WANT_LAST:
                    last = tl.sum(tl.where(is_last_row[:, None], probs, 0.0), axis=0) * (1.0 / GROUP)
                    tl.store(last_out + out_row + t, last, mask=col_mask)
            else:               # rows are g * W_PAD + w: reduce w per query head
                probs = tl.reshape(probs, (G_PAD, W_PAD, BLOCK_T))
                mask = row_mask[:, None] & col_mask[None, :]
                mean_rows = tl.sum(probs, axis=1) * (1.0 / WINDOW)                     # [G_PAD, BLOCK_T]
                tl.store(mean_out + out_rows[:, None] + t[None, :], mean_rows, mask=mask)
                if WANT_LAST:
                    last = tl.sum(tl.where(w3, probs, 0.0), axis=1)
                    tl.store(last_out + out_rows[:, None] + t[None, :], last, mask=mask)

    # Positions past the request's length (up to the padded output width) get exact zeros.
    zeros = tl.zeros([G_PAD, BLOCK_T], tl.float32)
    for t0 in range(zero_from, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = row_mask[:, None] & (t < end)[None, :]
        tl.store(mean_out + out_rows[:, None] + t[None, :], zeros, mask=mask)
        if WANT_LAST:
            tl.store(last_out + out_rows[:, None] + t[None, :], zeros, mask=mask)


# ---------------------------------------------------------------------------------------------- Python side

@dataclasses.dataclass(frozen=True)
class ScoringConfig:
    block_t: int
    num_warps: int
    num_stages: int


def scoring_config(head_dim: int, rows: int) -> ScoringConfig:
    """Fixed configs (no autotune): ~16 KB key tile per block, more warps when the query tile is tall."""
    block_t = 64 if head_dim > 64 else 128
    if rows * block_t >= 128 * 128:
        block_t //= 2                     # keep the [rows, BLOCK_T] fp32 logits within the register budget
    num_warps = 8 if rows >= 128 else 4
    return ScoringConfig(block_t=block_t, num_warps=num_warps, num_stages=3)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


PROGRAMS_PER_SM = 4


def default_num_splits(programs_per_split: int, out_len: int, device: torch.device, min_split: int = 512,
                       programs_per_sm: int = PROGRAMS_PER_SM) -> int:
    """Enough splits for ~programs_per_sm programs per SM, none shorter than min_split positions; a power of two."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    wanted = triton.cdiv(programs_per_sm * sms, max(programs_per_split, 1))
    most = max(1, triton.cdiv(out_len, min_split))
    return _next_pow2(max(1, min(wanted, most)))


def window_attention_pool(k_ptrs: torch.Tensor, req_to_token: torch.Tensor, req_rows: torch.Tensor,
                          lengths: torch.Tensor, queries: torch.Tensor, *, kv_dtype: torch.dtype,
                          num_kv_heads: int, head_dim: int, slot_stride: int, scale: float | None = None,
                          group_reduce: str = "none", want_last_row: bool = False, max_len: int | None = None,
                          num_splits: int | None = None, block_t: int | None = None,
                          config: ScoringConfig | None = None, out_mean: torch.Tensor | None = None,
                          out_last: torch.Tensor | None = None, row_lse: torch.Tensor | None = None):
    """Window attention of each request's last W queries over its keys in SGLang's pool.

    k_ptrs [L] int64 key-buffer addresses (MHATokenToKVPool.k_data_ptrs); req_to_token int32 [rows, ctx];
    req_rows [N] its row per request; lengths [N] physical lengths; queries [N, L, Hq, W, d], newest last
    (cast to kv_dtype for the tensor-core product). Returns (mean_rows, last_row or None), fp32
    [N, L, Hq (or H with group_reduce="mean"), max_len], zeros past each length. max_len defaults to
    lengths.max() (one host sync) and must be >= every length. out_mean / out_last let the caller reuse buffers.
    row_lse [N, L, Hq, W] fp32, optional: each query row's log2-sum-exp2 of its scaled logits over the keys it sees
    (FlashInfer's decode LSE convention); given, the keys are read once instead of twice.
    """
    tl_dtype = tl_kv_dtype(kv_dtype, "window_attention_pool")
    if group_reduce not in ("none", "mean"):
        raise ValueError(f"group_reduce = {group_reduce!r}: must be 'none' or 'mean'")
    n, num_layers, num_q_heads, window, qd = queries.shape
    if qd != head_dim or num_q_heads % num_kv_heads:
        raise ValueError(f"queries {tuple(queries.shape)} do not match num_kv_heads={num_kv_heads}, "
                         f"head_dim={head_dim}")
    if k_ptrs.numel() != num_layers:
        raise ValueError(f"k_ptrs has {k_ptrs.numel()} layers, queries {num_layers}")
    if req_to_token.stride(1) != 1:
        raise ValueError("req_to_token rows must be contiguous")
    group = num_q_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    out_len = int(lengths.max()) if max_len is None else int(max_len)
    device = queries.device

    g_pad = _next_pow2(group)
    w_pad = max(_next_pow2(window), triton.cdiv(16, g_pad))        # tl.dot needs >= 16 rows
    rows = g_pad * w_pad
    cfg = config or scoring_config(head_dim, rows)
    block = block_t or cfg.block_t
    programs = n * num_layers * num_kv_heads
    splits = num_splits or default_num_splits(programs, out_len, device)
    split_len = triton.cdiv(triton.cdiv(max(out_len, 1), splits), block) * block   # whole blocks per split

    out_heads = num_kv_heads if group_reduce == "mean" else num_q_heads
    shape = (n, num_layers, out_heads, out_len)
    mean_out = torch.empty(shape, dtype=torch.float32, device=device) if out_mean is None else out_mean
    last_out = None
    if want_last_row:
        last_out = torch.empty(shape, dtype=torch.float32, device=device) if out_last is None else out_last
    for name, t in (("out_mean", mean_out), ("out_last", last_out)):
        if t is not None and (tuple(t.shape) != shape or t.dtype != torch.float32 or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous float32 tensor of shape {shape}")
    if row_lse is not None and (tuple(row_lse.shape) != (n, num_layers, num_q_heads, window)
                                or row_lse.dtype != torch.float32 or (row_lse.stride(3) != 1 and window > 1)):
        raise ValueError(f"row_lse must be float32 [N, L, Hq, W] = {(n, num_layers, num_q_heads, window)} with "
                         f"a contiguous last dim; got {row_lse.dtype} {tuple(row_lse.shape)}")   # (W = 1: any stride)
    if n == 0 or out_len == 0:
        return mean_out, last_out

    if row_lse is None:
        part_max = torch.empty((programs, splits, rows), dtype=torch.float32, device=device)
        part_sum = torch.empty_like(part_max)
        lse_arg, lse_strides = part_max, (0, 0, 0)        # unused by the kernel
    else:
        part_max = part_sum = lse_arg = row_lse
        lse_strides = tuple(row_lse.stride(i) for i in range(3))
    upcast = interpreting()          # the interpreter's tl.dot mishandles bf16; fp32 there is exact
    dot_dtype = tl.float32 if (upcast or kv_dtype == torch.float32) else tl_dtype
    dot_precision = "ieee" if dot_dtype == tl.float32 else "tf32"
    if queries.dtype != kv_dtype:     # round like torch (the interpreter's in-kernel cast truncates)
        queries = queries.to(kv_dtype)
    lengths = lengths.to(device=device, dtype=torch.int32)
    req_rows = req_rows.to(device=device, dtype=torch.int32)
    common = dict(NUM_KV_HEADS=num_kv_heads, GROUP=group, WINDOW=window, G_PAD=g_pad, W_PAD=w_pad,
                  HEAD_DIM=head_dim, D_PAD=_next_pow2(head_dim), BLOCK_T=block, KV_DTYPE=tl_dtype,
                  DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    q_strides = [queries.stride(i) for i in range(4)]
    grid = (programs, splits)
    if row_lse is None:
        _lse_partials_kernel[grid](
            k_ptrs, req_to_token, req_rows, lengths, queries, part_max, part_sum,
            req_to_token.stride(0), *q_strides, slot_stride, num_layers, split_len, splits, scale * LOG2E, **common)
    _probabilities_kernel[grid](
        k_ptrs, req_to_token, req_rows, lengths, queries, part_max, part_sum, lse_arg, mean_out,
        last_out if last_out is not None else mean_out,
        req_to_token.stride(0), *q_strides, *lse_strides, slot_stride, num_layers, split_len, splits, out_len,
        scale * LOG2E, S_PAD=1 if row_lse is not None else _next_pow2(splits),   # (S_PAD unused with an LSE)
        GROUP_MEAN=group_reduce == "mean", WANT_LAST=want_last_row,
        LSE_GIVEN=row_lse is not None, **common)
    return mean_out, last_out


def scoring_key_bytes(lengths, num_layers: int, num_kv_heads: int, head_dim: int, elem_size: int,
                      passes: int = 2) -> int:
    """Key bytes the two passes read (the roofline term of the docstring)."""
    total = int(sum(int(x) for x in lengths))
    return passes * total * num_layers * num_kv_heads * head_dim * elem_size
