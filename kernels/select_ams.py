"""AMS selection (selection.select_ams) in one launch (Triton): one program per (request, layer, KV head) row.

Why: select_ams is ~180 torch operations whatever the batch; at decode-time chunk sizes their launches bound it on
the host (2.3-2.9 ms a call on an H200) and their passes over [N, L, H, T] tensors on the GPU (5.7 ms at 17 x
1536 tokens). A row of up to MAX_TOKENS tokens fits one program, which does the same arithmetic in registers.

The result is the torch path's, bit for bit (tests/test_select_kernel.py): the same float32 / float64 operations
in the same order (precise divisions, no fused multiply-add), integer fixed-point masses. Two steps are computed
differently but exactly:
  * The torch path gives every token of C a priority from its rank inside its segment and takes the top ones
    (D'Hondt apportionment). Priorities fall with the rank inside a segment, and segments are contiguous runs of
    positions, so "the token of rank r in segment s" can stand for position start_s + r: a threshold search over
    those position-indexed priorities gives each segment's share a_s as the selected prefix of its positions
    (ties between segments go to the earlier segment, as the stable sort gives them to the earlier position).
  * Tokens are then sorted by (segment, descending score, position) packed into one int64; in that order the token
    of rank r of segment s sits at index start_s - P + r, so it is kept exactly when position start_s + r was
    selected above: a gather shifted by P. A second sort puts the kept positions in ascending order.
Inputs must satisfy what the compactor guarantees: lengths <= T, keep counts <= the largest keep (k).
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

MAX_TOKENS = 4096            # longest row one program holds; longer rows take the torch path
# Rows are padded to a power of two (tl.sort); on a GPU to at least 512, so that the warm-up compiles four blocks
# (512 .. 4096) x with / without credit. Under the interpreter (CPU tests) small blocks keep it fast.
GPU_MIN_BLOCK = 512


def block_for(tokens: int, device: torch.device) -> int:
    return max(GPU_MIN_BLOCK if device.type == "cuda" else 16, triton.next_power_of_2(tokens))


@triton.jit
def _max_fn(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_fn(a, b):
    return tl.minimum(a, b)


@triton.jit
def _finite_or_zero(x):
    return tl.where((x != x) | (x == float("inf")) | (x == float("-inf")), 0.0, x)


@triton.jit
def _scaled(x, comp):
    """selection._scaled: float32 x >= 0, 0 outside C -> int64 fixed point, the row's peak at 2^32."""
    peak = tl.max(x, 0)
    fixed = (tl.math.div_rn(x, tl.maximum(peak, tl.full([], 1e-38, tl.float32))) * 4294967296.0).to(tl.int64)
    return tl.where(peak > 0, fixed, comp.to(tl.int64))


@triton.jit
def _share(fixed):
    """selection._share: float64 fractions of the row total."""
    total = tl.maximum(tl.sum(fixed, 0), 1)
    return fixed.to(tl.float64) / total.to(tl.float64)     # (float64 division rounds to nearest)


@triton.jit
def _segment_bounds(start, pos, cend, BLOCK: tl.constexpr):
    """For each token of C: the first position a of its segment and the end b (exclusive)."""
    a = tl.associative_scan(tl.where(start, pos, 0), 0, _max_fn)
    big = tl.full([BLOCK], 1 << 40, tl.int64)
    nxt = tl.associative_scan(tl.where(start, pos, big), 0, _min_fn, reverse=True)
    after = tl.gather(nxt, tl.minimum(pos + 1, BLOCK - 1), 0)
    after = tl.where(pos + 1 >= BLOCK, big, after)
    return a, tl.minimum(after, cend)


@triton.jit
def _f64(bits):
    """A float64 passed as its int64 bits (a Python float argument would arrive as float32)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit(do_not_specialize=["T", "K", "rows_per_req", "keep_lastn", "lmin", "lmax", "qmin", "n_max",
                               "decay", "one_minus_decay", "mix", "one_minus_mix", "inv_delta"])
def _select_kernel(scores, evidence, credit, lengths, pinned, keep, out_idx, out_credit, out_sid,
                   T, K, rows_per_req, keep_lastn, lmin, lmax, qmin, n_max, delta32,
                   decay, one_minus_decay, mix, one_minus_mix, inv_delta,
                   BLOCK: tl.constexpr, POS_BITS: tl.constexpr, HAS_EVIDENCE: tl.constexpr,
                   HAS_CREDIT: tl.constexpr, USE_CREDIT: tl.constexpr, USE_MASS: tl.constexpr,
                   EQUAL_MASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    req = row // rows_per_req
    length = tl.load(lengths + req).to(tl.int64)
    p = tl.load(pinned + req).to(tl.int64)
    keep_eff = tl.load(keep + req).to(tl.int64)
    pos = tl.arange(0, BLOCK).to(tl.int64)
    in_t = pos < T
    base = row * T
    cend = length - keep_lastn
    comp = (pos >= p) & (pos < cend)
    forced = (pos < length) & ~comp

    # --- the used mass u (selection._used_mass) ---------------------------------------------------------------
    if HAS_EVIDENCE:
        e = _finite_or_zero(tl.load(evidence + base + pos, mask=in_t, other=0.0).to(tl.float32))
        e = tl.maximum(e, 0.0)
    else:
        e = tl.full([BLOCK], 1.0, tl.float32)
    m = _share(_scaled(tl.where(comp, e, 0.0), comp))
    nc32 = tl.zeros([BLOCK], tl.float32)
    if USE_CREDIT:
        fresh = _f64(one_minus_decay) * m
        if HAS_CREDIT:
            old = _finite_or_zero(tl.load(credit + base + pos, mask=in_t, other=0.0).to(tl.float32))
            nc = _f64(decay) * tl.maximum(old.to(tl.float64), 0.0) + fresh
        else:
            nc = fresh
        nc32 = nc.to(tl.float32)
        credit_mass = _share(_scaled(tl.where(comp, nc32, 0.0), comp))
        m = _f64(mix) * m + _f64(one_minus_mix) * credit_mass
    if USE_MASS:
        u = _scaled(m.to(tl.float32), comp)
    else:
        u = tl.where(comp, 4294967296, 0).to(tl.int64)

    # --- segments (selection.segment) --------------------------------------------------------------------------
    if EQUAL_MASS:
        total_u = tl.maximum(tl.sum(u, 0), 1).to(tl.float64)
        cum_before = (tl.cumsum(u, 0) - u).to(tl.float64) / total_u
        raw = cum_before * _f64(inv_delta)
        raw = tl.minimum(tl.maximum(raw, 0.0), n_max.to(tl.float64)).to(tl.int64)
    else:
        n_c = tl.sum(comp.to(tl.int64), 0)
        seg0 = tl.maximum(tl.math.ceil(n_c.to(tl.float32) * delta32), 1.0).to(tl.int64)
        raw = (tl.maximum(pos - p, 0)) // seg0
    raw = tl.where(comp, raw, -1)
    prev = tl.gather(raw, tl.maximum(pos - 1, 0), 0)
    start = raw > tl.where(pos == 0, -1, prev)
    # merge segments shorter than Lmin into the left neighbour, a short first one into the right one
    sid = tl.cumsum(start.to(tl.int64), 0) * comp
    a, b = _segment_bounds(start, pos, cend, BLOCK)
    start = start & ((sid == 1) | (((b - a) >= lmin) & (pos >= p + lmin)))
    # split segments longer than Lmax into near-equal pieces
    a, b = _segment_bounds(start, pos, cend, BLOCK)
    seg_len = tl.where(comp, b - a, 1)
    pieces = (seg_len + lmax - 1) // lmax
    start = start | (comp & (((pos - a) * pieces) % seg_len < pieces))

    # --- quotas and the priorities of positions (D'Hondt), threshold for the top M -----------------------------
    sid = tl.cumsum(start.to(tl.int64), 0) * comp
    a, b = _segment_bounds(start, pos, cend, BLOCK)
    seg_len = tl.where(comp, b - a, 1)
    n_seg = tl.sum(start.to(tl.int64), 0)
    n_comp = tl.sum(comp.to(tl.int64), 0)
    keep_c = tl.maximum(keep_eff - tl.sum(forced.to(tl.int64), 0), 0)
    floors = tl.sum(tl.where(start, tl.minimum(seg_len, qmin), 0), 0)
    q_floor = tl.where(floors <= keep_c, qmin, tl.minimum(keep_c // tl.maximum(n_seg, 1), qmin))
    cu = tl.cumsum(u, 0)
    before = tl.where(a > 0, tl.gather(cu, tl.maximum(a - 1, 0), 0), 0)
    seg_fixed = tl.gather(cu, tl.minimum(tl.maximum(b - 1, 0), BLOCK - 1), 0) - before
    floor_mass = tl.math.div_rn(seg_len.to(tl.float32) * 1e-6, tl.maximum(n_comp, 1).to(tl.float32))
    seg_mass = seg_fixed.to(tl.float64) / tl.maximum(tl.sum(u, 0), 1).to(tl.float64) + floor_mass.to(tl.float64)
    past = (pos - a) - tl.minimum(q_floor, seg_len)
    prio = seg_mass / (tl.maximum(past, 0) + 1).to(tl.float64)
    prio_bits = tl.where(past < 0, 0x7FE0000000000000, prio.to(tl.int64, bitcast=True))   # quota: above any share
    prio_bits = tl.where(comp, prio_bits, -1)
    n_take = tl.minimum(tl.minimum(keep_c, tl.minimum(K, T)), n_comp)
    lo = tl.zeros([], tl.int64)                      # count(prio_bits >= lo) >= n_take ...
    hi = tl.full([], 0x7FF0000000000000, tl.int64)   # ... count(prio_bits >= hi) == 0 < n_take
    for _ in range(63):
        mid = lo + (hi - lo) // 2
        enough = tl.sum((prio_bits >= mid).to(tl.int64), 0) >= n_take
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    above = prio_bits > lo
    at = prio_bits == lo
    room = n_take - tl.sum(above.to(tl.int64), 0)
    chosen = (above | (at & (tl.cumsum(at.to(tl.int64), 0) <= room))) & (n_take > 0)

    # --- inside each segment its best-scored tokens: sort by (segment, score desc, position) -------------------
    s = tl.load(scores + base + pos, mask=in_t, other=0.0).to(tl.float32)
    s = tl.where(s != s, -3e38, tl.where(s == float("inf"), 3e38, tl.where(s == float("-inf"), -3e38, s)))
    bits = (s + 0.0).to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    sid_key = tl.where(comp, sid, 2 * BLOCK)          # the tokens outside C sort last
    packed = (sid_key << (32 + POS_BITS)) | ((2147483647 - key) << POS_BITS) | pos
    order = tl.sort(packed, 0)
    opos = order & (BLOCK - 1)
    i = pos
    in_c = i < n_comp
    taken = tl.gather(chosen.to(tl.int32), tl.minimum(i + p, BLOCK - 1), 0) != 0
    kept = tl.where(in_c, taken, opos < length)       # outside C: pinned and recent tokens are kept by mask
    ascending = tl.sort(tl.where(kept, opos, BLOCK + opos), 0)
    has = ascending < BLOCK
    out = tl.where(has, ascending, -1)
    store = i < K
    tl.store(out_idx + row * K + i, out, mask=store)
    if USE_CREDIT:
        carried = tl.gather(nc32, tl.minimum(ascending, BLOCK - 1), 0)
        tl.store(out_credit + row * K + i, tl.where(has, carried, 0.0), mask=store)
    tl.store(out_sid + base + pos, sid - 1, mask=in_t)


def fits(tokens: int) -> bool:
    return 0 < tokens <= MAX_TOKENS


def select_ams_rows(scores: torch.Tensor, evidence: torch.Tensor | None, credit: torch.Tensor | None,
                    lengths: torch.Tensor, n_pinned: torch.Tensor, keep: torch.Tensor, k: int, cfg, n_max: int):
    """indices [N, L, H, k] int64 (ascending, -1 padded), carried credit [N, L, H, k] float32 (None without
    credit) and segment ids [N, L, H, T] int64 of select_ams; keep = min(n_keep, lengths), k >= every keep,
    n_max = selection.last_segment(cfg.delta).
    scores, evidence, credit [N, L, H, T] (T <= MAX_TOKENS); one launch, no host sync."""
    n, nl, h, t = scores.shape
    dev = scores.device
    idx = torch.empty(n, nl, h, k, dtype=torch.long, device=dev)
    carried = torch.empty(n, nl, h, k, dtype=torch.float32, device=dev) if cfg.use_credit else None
    sid = torch.empty(n, nl, h, t, dtype=torch.long, device=dev)
    rows = n * nl * h
    if rows == 0 or t == 0:
        return idx, carried, sid
    block = block_for(t, dev)
    scores = scores.contiguous()
    dummy = scores
    _select_kernel[(rows,)](
        scores, evidence.contiguous() if evidence is not None else dummy,
        credit.contiguous() if credit is not None else dummy, lengths, n_pinned, keep,
        idx, carried if carried is not None else idx, sid,
        t, k, nl * h, cfg.keep_lastn, cfg.lmin, cfg.lmax, cfg.qmin, n_max, float(cfg.delta),
        *(_bits(x) for x in (cfg.credit_decay, 1.0 - cfg.credit_decay, cfg.mass_mix, 1.0 - cfg.mass_mix,
                             1.0 / cfg.delta)),
        BLOCK=block, POS_BITS=block.bit_length() - 1, HAS_EVIDENCE=evidence is not None,
        HAS_CREDIT=credit is not None, USE_CREDIT=cfg.use_credit, USE_MASS=cfg.use_mass,
        EQUAL_MASS=cfg.segmenter == "equal_mass", num_warps=_warps(block), enable_fp_fusion=False,
        enable_reflect_ftz=False)      # (no flushed denormals in libdevice calls, as in torch)
    return idx, carried, sid


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _warps(block: int) -> int:
    # every value of a row is live at once: more warps keep it in registers (a guess until a GPU has timed it)
    return 16 if block >= 4096 else 8 if block >= 1024 else 4
