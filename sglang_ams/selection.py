"""Which tokens each (layer, KV head) keeps: global top-k and AMS.

Everything works on rows = (request, layer, KV head) flattened, padded to T tokens, with per-request lengths,
pinned-prefix sizes and keep counts, so one call serves a batch of requests without Python loops over
requests, layers, heads or segments, and without host syncs.

Regions of a row of length `len`: pinned [0, P), compressible C = [P, len - R), recent [len - R, len).
Pinned and recent tokens are always kept; n_keep - P - R tokens of C are chosen.

AMS picks tokens of C through one priority per token, then a single top-n over the row:
  * a token whose rank inside its segment (by base score) is below the segment's floor quota
    q_s = min(qmin, len_s) gets an effectively infinite priority (when the budget cannot cover every floor,
    q_s = min(qmin, keep_C // n_segments, len_s), which always fits);
  * the k-th token past the quota gets mass_s / (k + 1).
Taking the top of these priorities is D'Hondt apportionment of the remaining budget in proportion to segment
mass, capped at each segment's length (a segment runs out of tokens) and exact in total: the water-filling of
DESIGN.md §2.5 with integer rounding. Within a segment the best-scored tokens come first.

Pinned and recent tokens are kept by mask, never by priority, so no score (NaN, inf) can drop them. Masses are
summed in integer fixed point: a request's kept set depends on that request alone, not on the padding its
batch gives it or on the order a GPU reduction adds up a row.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:       # (cfg is any object with the AMS fields: a PolicyConfig or the AMS selector)
    from .config import PolicyConfig

QUOTA = 1e30                 # floor-quota tokens of a segment
MASS_FLOOR = 1e-6            # keeps every segment's mass positive so leftover budget always finds a home
FIXED_ONE = 1 << 32          # mass in fixed point: a row's largest value is 2^32 (int64 sums stay below 2^63)


@dataclasses.dataclass
class Selection:
    indices: torch.Tensor            # [N, L, H, K] int64, ascending; -1 past n_keep[n]
    n_keep: torch.Tensor             # [N] tokens kept per (layer, head) of each request
    credit: torch.Tensor | None      # [N, L, H, K] carried credit of the kept tokens (0 on padding)
    segment_ids: torch.Tensor | None  # [N, L, H, T] segment of each compressible token, -1 elsewhere


def _rows(x: torch.Tensor, shape) -> torch.Tensor:
    """Broadcast a per-request [N] tensor to rows [N*L*H, 1]."""
    n, nl, h = shape
    return x.view(n, 1, 1).expand(n, nl, h).reshape(-1, 1)


def _regions(lengths, n_pinned, keep_lastn, shape, t):
    length = _rows(lengths, shape)
    pinned = _rows(n_pinned, shape)
    pos = torch.arange(t, device=lengths.device)[None, :]
    valid = pos < length
    comp = (pos >= pinned) & (pos < length - keep_lastn)
    return valid, comp, pos


def _finalize(priority: torch.Tensor, comp: torch.Tensor, forced: torch.Tensor, keep_rows: torch.Tensor,
              k: int) -> torch.Tensor:
    """Every forced (pinned, recent) token plus the best of C by priority, keep_rows in all; ascending, -1 padded.

    Forced tokens are taken by their mask, not by a priority: whatever the scores hold (NaN sorts above +inf),
    a pinned token can never drop out, and the kept set of the first P positions is exactly 0..P-1."""
    t = priority.shape[-1]
    keep_c = (keep_rows - forced.sum(-1, keepdim=True)).clamp(min=0)
    kc = min(k, t)
    order = torch.sort(torch.where(comp, priority, float("-inf")), dim=-1, descending=True, stable=True).indices
    take = torch.arange(kc, device=priority.device)[None, :] < keep_c
    chosen = torch.zeros_like(comp).scatter_(1, order[:, :kc], take) & comp
    kept = forced | chosen
    rank = torch.cumsum(kept, dim=-1) - 1                      # ascending positions land in ascending slots
    out = torch.full((priority.shape[0], k + 1), -1, dtype=torch.long, device=priority.device)
    out.scatter_(1, torch.where(kept, rank, k), torch.arange(t, device=priority.device).expand_as(rank))
    return out[:, :k].contiguous()


def _clean(scores: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(scores.float(), nan=-3e38, posinf=3e38, neginf=-3e38)


def _keep_counts(lengths, n_keep):
    return torch.minimum(n_keep.to(lengths.dtype), lengths)


def _max_keep(n_keep: torch.Tensor, t: int, k_max: int | None) -> int:
    # The caller usually knows the largest keep count on the host; asking the tensor would sync.
    return min(t, k_max if k_max is not None else int(n_keep.max()))


def select_topk(scores: torch.Tensor, lengths: torch.Tensor, n_pinned: torch.Tensor, n_keep: torch.Tensor,
                keep_lastn: int, k_max: int | None = None) -> Selection:
    """Global top-k of the base scorer over C, plus pinned and recent tokens."""
    n, nl, h, t = scores.shape
    valid, comp, _ = _regions(lengths, n_pinned, keep_lastn, (n, nl, h), t)
    keep = _keep_counts(lengths, n_keep)
    k = _max_keep(keep, t, k_max)
    idx = _finalize(_clean(scores).reshape(-1, t), comp, valid & ~comp, _rows(keep, (n, nl, h)), k)
    return Selection(indices=idx.view(n, nl, h, k), n_keep=keep, credit=None, segment_ids=None)


def _fixed_point(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x restricted to mask as int64 fixed point, the row's largest value at FIXED_ONE; uniform where the row
    has no mass. Non-finite and negative values count as no mass. Sums and prefix sums of the result are exact
    integers, so a row's mass, boundaries and segment shares do not depend on how far the row is padded or on
    the order a reduction adds it up (float sums over padded rows differ in the last bits)."""
    x = torch.where(mask & torch.isfinite(x), x.float(), 0.0).clamp(min=0.0)
    peak = x.amax(-1, keepdim=True)
    fixed = torch.floor(x / peak.clamp(min=1e-38) * FIXED_ONE).long()
    return torch.where(peak > 0, fixed, mask.long())


def _share(fixed: torch.Tensor) -> torch.Tensor:
    """Fixed-point mass as float64 fractions of its row total (exact total; elementwise division)."""
    return fixed.double() / fixed.sum(-1, keepdim=True).clamp(min=1).double()


def _segment_table(start: torch.Tensor, comp: torch.Tensor):
    """Segment id per token (dummy id T outside C) and the length of every segment id."""
    t = start.shape[-1]
    sid = torch.cumsum(start.long(), dim=-1) - 1
    sid = torch.where(comp, sid, t)
    lens = torch.zeros(start.shape[0], t + 1, dtype=torch.long, device=start.device)
    lens.scatter_add_(1, sid, torch.ones_like(sid))
    return sid, lens


def _used_mass(evidence, credit, comp, cfg: PolicyConfig):
    """The mass u (int64 fixed point) that places boundaries and shares the budget, and the updated credit."""
    m = _share(_fixed_point(evidence, comp))
    new_credit = None
    if cfg.use_credit:
        old = torch.zeros_like(m) if credit is None else \
            torch.where(torch.isfinite(credit), credit.double(), 0.0).clamp(min=0.0)
        new_credit = cfg.credit_decay * old + (1.0 - cfg.credit_decay) * m
        m = cfg.mass_mix * m + (1.0 - cfg.mass_mix) * _share(_fixed_point(new_credit, comp))
        new_credit = new_credit.float()
    if not cfg.use_mass:
        m = comp.double()
    return _fixed_point(m, comp), new_credit


def segment(u: torch.Tensor, comp: torch.Tensor, pos: torch.Tensor, n_pinned_rows: torch.Tensor,
            cfg: PolicyConfig) -> torch.Tensor:
    """Start flags [rows, T] of the segments of C: equal-mass (or fixed-length) cuts, short ones merged, long split.
    u is the int64 fixed-point mass (exact prefix sums)."""
    if cfg.segmenter == "equal_mass":
        cum_before = (torch.cumsum(u, dim=-1) - u).double() / u.sum(-1, keepdim=True).clamp(min=1).double()
        n_max = max(0, math.ceil(1.0 / cfg.delta - 1e-9) - 1)
        raw = torch.floor(cum_before / cfg.delta).clamp(0, n_max).long()
    else:  # fixed_length: as many equal-length segments as equal-mass would make
        seg_len = torch.ceil(comp.sum(-1, keepdim=True) * cfg.delta).clamp(min=1).long()
        raw = (pos - n_pinned_rows) // seg_len
    raw = torch.where(comp, raw, -1)
    prev = torch.nn.functional.pad(raw[:, :-1], (1, 0), value=-1)
    start = comp & (raw != prev)

    # Merge: a segment shorter than Lmin joins its left neighbour; a short first segment joins its right one.
    sid, lens = _segment_table(start, comp)
    first = comp & (pos == n_pinned_rows)
    start = start & (first | (lens.gather(1, sid) >= cfg.lmin))
    sid, lens = _segment_table(start, comp)
    first_short = lens[:, :1] < cfg.lmin
    start = start & ~(first_short & (sid == 1))

    # Split: a segment longer than Lmax becomes ceil(len / Lmax) near-equal pieces.
    sid, lens = _segment_table(start, comp)
    seg_end = torch.cumsum(lens, dim=-1)
    seg_first = (seg_end - lens).gather(1, sid) + n_pinned_rows
    seg_len = lens.gather(1, sid).clamp(min=1)
    offset = pos - seg_first
    pieces = (seg_len + cfg.lmax - 1) // cfg.lmax
    piece = offset * pieces // seg_len
    prev_piece = torch.nn.functional.pad(piece[:, :-1], (1, 0), value=-1)
    return start | (comp & (offset > 0) & (piece != prev_piece))


def _descending_key(scores: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2^32) that orders like -scores: the float32 bits made monotone (the usual sign flip)."""
    bits = (scores.float() + 0.0).contiguous().view(torch.int32).long()      # + 0.0 turns -0.0 into 0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)       # ascending like the floats, as signed ints
    return (2**31 - 1) - ordered                                      # descending score -> ascending key


def _rank_in_segment(scores: torch.Tensor, sid: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Rank of every token inside its segment by descending score (ties: earlier position first).

    One stable sort on (segment, descending score) packed into an int64 key."""
    t = scores.shape[-1]
    key = (sid << 32) | _descending_key(scores)
    by_seg = torch.sort(key, dim=-1, stable=True)
    order = by_seg.indices
    seg_first = torch.cumsum(lens, dim=-1) - lens
    rank_sorted = torch.arange(t, device=scores.device)[None, :] - seg_first.gather(1, sid.gather(1, order))
    return torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)


def select_ams(scores: torch.Tensor, evidence: torch.Tensor | None, lengths: torch.Tensor,
               n_pinned: torch.Tensor, n_keep: torch.Tensor, cfg: PolicyConfig,
               credit: torch.Tensor | None = None, k_max: int | None = None) -> Selection:
    """AMS: mass → credit → segments → quotas → per-segment top tokens, union pinned and recent."""
    n, nl, h, t = scores.shape
    shape = (n, nl, h)
    valid, comp, pos = _regions(lengths, n_pinned, cfg.keep_lastn, shape, t)
    if evidence is None:
        if cfg.use_mass:
            raise ValueError("AMS needs attention evidence (window queries) unless use_mass is off")
        evidence = torch.ones_like(scores, dtype=torch.float32)
    u, new_credit = _used_mass(evidence.reshape(-1, t), None if credit is None else credit.reshape(-1, t),
                               comp, cfg)
    pinned_rows = _rows(n_pinned, shape)
    start = segment(u, comp, pos, pinned_rows, cfg)
    sid, lens = _segment_table(start, comp)

    keep = _keep_counts(lengths, n_keep)
    keep_rows = _rows(keep, shape)
    forced = valid & ~comp
    keep_c = (keep_rows - forced.sum(-1, keepdim=True)).clamp(min=0)
    seg_lens = lens[:, :t]
    n_seg = (seg_lens > 0).sum(-1, keepdim=True)
    # Floor quota min(qmin, len_s) for every segment (DESIGN.md); only where the budget cannot cover all floors,
    # each gets min(qmin, keep_c // n_seg, len_s) instead, which always fits.
    floors = torch.minimum(seg_lens, torch.full_like(seg_lens, cfg.qmin)).sum(-1, keepdim=True)
    q_floor = torch.where(floors <= keep_c, cfg.qmin,
                          torch.minimum(torch.full_like(keep_c, cfg.qmin), keep_c // n_seg.clamp(min=1)))

    seg_fixed = torch.zeros(lens.shape, dtype=torch.long, device=u.device).scatter_add_(1, sid, u)
    seg_mass = _share(seg_fixed[:, :t]) + MASS_FLOOR * seg_lens / comp.sum(-1, keepdim=True).clamp(min=1)
    seg_mass = torch.nn.functional.pad(seg_mass, (0, 1))         # the dummy id T (outside C)

    s = torch.where(comp, _clean(scores).reshape(-1, t), float("-inf"))
    rank = _rank_in_segment(s, sid, lens)
    quota = torch.minimum(q_floor, lens.gather(1, sid))
    past = (rank - quota).clamp(min=0)
    share = seg_mass.gather(1, sid) / (past + 1).double()
    priority = torch.where(rank < quota, QUOTA, share)

    k = _max_keep(keep, t, k_max)
    idx = _finalize(priority, comp, forced, keep_rows, k)
    carried = None
    if new_credit is not None:
        carried = new_credit.gather(1, idx.clamp(min=0)).masked_fill(idx < 0, 0.0).view(n, nl, h, k)
    seg_ids = torch.where(comp, sid, -1).view(n, nl, h, t)
    return Selection(indices=idx.view(n, nl, h, k), n_keep=keep, credit=carried, segment_ids=seg_ids)
