"""Which tokens each (layer, KV head) keeps: global top-k and AMS.

Everything works on rows = (request, layer, KV head), [N, L, H, T] padded to T tokens, with per-request
lengths, pinned-prefix sizes and keep counts viewed [N, 1, 1, 1], so one call serves a batch of requests without
Python loops over requests, layers, heads or segments, and without host syncs. The token regions are the same for
every row of a request, so their masks are built once per request, [N, 1, 1, T], and broadcast.

Each torch operation costs its host time and a launch whatever the tensor size. At decode-time chunk sizes (up
to ~17 requests of ~1.5k tokens on an H200) that host time bounds the selection, so the arithmetic below is
written in as few operations as it takes (tests/test_selection_op_count.py).

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
from typing import TYPE_CHECKING, NamedTuple

import torch

from .kernels import select_ams as ams_kernel
from .kernels.scoring import interpreting

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


class _Regions(NamedTuple):
    """Where the tokens of each request lie; masks [N, 1, 1, T], broadcast over the request's rows."""
    pos: torch.Tensor        # [T] token positions
    pinned: torch.Tensor     # [N, 1, 1, 1] P
    comp: torch.Tensor       # C
    outside: torch.Tensor    # not C
    forced: torch.Tensor     # pinned and recent tokens (inside the length)


def _regions(lengths, n_pinned, keep_lastn, t) -> _Regions:
    length, pinned = lengths.view(-1, 1, 1, 1), n_pinned.view(-1, 1, 1, 1)
    pos = torch.arange(t, device=lengths.device)
    comp = (pos >= pinned) & (pos < length - keep_lastn)
    outside = ~comp
    return _Regions(pos, pinned, comp, outside, (pos < length) & outside)


def _budget_c(keep: torch.Tensor, reg: _Regions) -> torch.Tensor:
    """[N, 1, 1, 1] tokens of C each row keeps: the keep count less the forced tokens."""
    return (keep.view(-1, 1, 1, 1) - reg.forced.sum(-1, keepdim=True)).clamp(min=0)


def _finalize(priority: torch.Tensor, reg: _Regions, keep_c: torch.Tensor, k: int) -> torch.Tensor:
    """Every forced (pinned, recent) token plus the best keep_c of C by priority; ascending, -1 padded to k.

    Forced tokens are taken by their mask, not by a priority: whatever the scores hold (NaN sorts above +inf),
    a pinned token can never drop out, and the kept set of the first P positions is exactly 0..P-1."""
    kc = min(k, priority.shape[-1])
    order = torch.sort(priority.masked_fill(reg.outside, float("-inf")), dim=-1, descending=True,
                       stable=True).indices
    pos = reg.pos.expand_as(order)
    place = torch.empty_like(order).scatter_(-1, order, pos)        # each token's place in that order
    # C sorts first; keep_c outgrows C only where a length runs past T, and then every other token is forced.
    kept = reg.forced | (place < keep_c.clamp(max=kc))
    # Kept tokens go to slots 1.. in position order, the rest to the scratch slot 0; a (k+1)-th kept token (keep
    # below the forced count) lands in the scratch slot k + 1 and drops out.
    slot = torch.cumsum(kept, dim=-1) * kept
    out = torch.full((*kept.shape[:-1], k + 2), -1, dtype=torch.long, device=order.device)
    return out.scatter_(-1, slot, pos)[..., 1:k + 1].contiguous()


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
    t = scores.shape[-1]
    reg = _regions(lengths, n_pinned, keep_lastn, t)
    keep = _keep_counts(lengths, n_keep)
    k = _max_keep(keep, t, k_max)
    idx = _finalize(_clean(scores), reg, _budget_c(keep, reg), k)
    return Selection(indices=idx, n_keep=keep, credit=None, segment_ids=None)


def _fixed_point(x: torch.Tensor, reg: _Regions) -> torch.Tensor:
    """x restricted to C as int64 fixed point, the row's largest value at FIXED_ONE; uniform where the row
    has no mass. Non-finite and negative values count as no mass. Sums and prefix sums of the result are exact
    integers, so a row's mass, boundaries and segment shares do not depend on how far the row is padded or on
    the order a reduction adds it up (float sums over padded rows differ in the last bits)."""
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).float().clamp_(min=0.0)
    return _scaled(x.masked_fill_(reg.outside, 0.0), reg.comp)


def _scaled(x: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """_fixed_point of an x that is already float32, >= 0 and 0 outside C."""
    peak = x.amax(-1, keepdim=True)
    fixed = (x / peak.clamp(min=1e-38) * FIXED_ONE).long()        # in [0, 2^32]: truncation is the floor
    return torch.where(peak > 0, fixed, comp)                     # (int64 result: C counts 1)


def _share(fixed: torch.Tensor) -> torch.Tensor:
    """Fixed-point mass as float64 fractions of its row total (exact total; elementwise division)."""
    return fixed.double() / fixed.sum(-1, keepdim=True).clamp(min=1)


def _segment_table(start: torch.Tensor, comp: torch.Tensor):
    """Segment id per token (1, 2, ... in C; the dummy id 0 outside C) and the number of tokens of every id."""
    sid = torch.cumsum(start, dim=-1) * comp
    lens = torch.zeros(*sid.shape[:-1], sid.shape[-1] + 1, dtype=torch.long, device=sid.device)
    return sid, lens.scatter_add_(-1, sid, torch.ones_like(sid))


def _used_mass(evidence, credit, reg: _Regions, cfg: PolicyConfig):
    """The mass u (int64 fixed point) that places boundaries and shares the budget, and the updated credit."""
    m = _share(_fixed_point(evidence, reg))
    new_credit = None
    if cfg.use_credit:
        fresh = (1.0 - cfg.credit_decay) * m
        if credit is None:          # no credit yet: decay * 0 + fresh is fresh, bit for bit
            new_credit = fresh
        else:
            old = torch.nan_to_num(credit, nan=0.0, posinf=0.0, neginf=0.0).double().clamp_(min=0.0)
            new_credit = cfg.credit_decay * old + fresh
        new_credit = new_credit.float()                     # finite and >= 0 already
        credit_mass = _share(_scaled(new_credit.masked_fill(reg.outside, 0.0), reg.comp))
        m = cfg.mass_mix * m + (1.0 - cfg.mass_mix) * credit_mass
    if not cfg.use_mass:            # by length: every token of C weighs FIXED_ONE (what _fixed_point makes of C)
        return (reg.comp * FIXED_ONE).expand_as(m), new_credit
    return _scaled(m.float(), reg.comp), new_credit      # m: finite, >= 0 and 0 outside C already


def last_segment(delta: float) -> int:
    """The largest raw equal-mass segment index: ceil(1 / delta) segments at most."""
    return max(0, math.ceil(1.0 / delta - 1e-9) - 1)


def segment(u: torch.Tensor, reg: _Regions, cfg: PolicyConfig) -> torch.Tensor:
    """Start flags [N, L, H, T] of the segments of C: equal-mass (or fixed-length) cuts, short ones merged, long
    split. u is the int64 fixed-point mass (exact prefix sums)."""
    if cfg.segmenter == "equal_mass":
        cum_before = (torch.cumsum(u, dim=-1) - u).double() / u.sum(-1, keepdim=True).clamp(min=1)
        # times 1/Δ, not / Δ: CUDA divides by a host scalar that way, CPU does not; both then agree, and with the
        # kernel (kernels/select_ams.py)
        raw = (cum_before * (1.0 / cfg.delta)).clamp_(0, last_segment(cfg.delta)).long()  # >= 0: trunc. = floor
    else:  # fixed_length: as many equal-length segments as equal-mass would make
        seg_len = torch.ceil(reg.comp.sum(-1, keepdim=True) * cfg.delta).clamp(min=1).long()
        raw = ((reg.pos - reg.pinned) // seg_len).expand_as(u)
    raw = raw.masked_fill(reg.outside, -1)
    # raw never decreases along C (one run of tokens) and is -1 elsewhere: it rises exactly at segment starts.
    start = raw > torch.nn.functional.pad(raw[..., :-1], (1, 0), value=-1)

    # Merge: a segment shorter than Lmin joins its left neighbour (its start goes); then a short first segment
    # joins its right one: the second start goes when it lies closer than Lmin to the first token of C, at P. Both
    # in one step: a start that survives the first rule and lies before P + Lmin can only be the second start
    # (the segment it opens is Lmin long, so any later start lies past P + Lmin).
    sid, lens = _segment_table(start, reg.comp)
    start = start & ((sid == 1) | ((lens.gather(-1, sid) >= cfg.lmin) & (reg.pos >= reg.pinned + cfg.lmin)))

    # Split: a segment longer than Lmax becomes ceil(len / Lmax) near-equal pieces.
    sid, lens = _segment_table(start, reg.comp)
    # Token o of a segment of length len lies in piece o * pieces // len, which rises at o exactly when
    # (o * pieces) mod len < pieces (a piece is at least one token long); at o = 0 start is set already.
    seg_len = lens.gather(-1, sid)                           # >= 1: a token counts in its own id
    offset = reg.pos - torch.cummax(start * reg.pos, dim=-1).values    # from its segment's first token
    pieces = (seg_len + cfg.lmax - 1) // cfg.lmax
    return start | (reg.comp & (offset * pieces % seg_len < pieces))


def _ascending_bits(scores: torch.Tensor) -> torch.Tensor:
    """int32 that orders like the scores: the float32 bits made monotone (the usual sign flip)."""
    bits = (scores.float() + 0.0).contiguous().view(torch.int32)      # + 0.0 turns -0.0 into 0.0
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _rank_in_segment(scores: torch.Tensor, sid: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Rank of every token inside its segment by descending score (ties: earlier position first).

    One stable sort on (segment, descending score) packed into an int64 key."""
    t = scores.shape[-1]
    order = torch.sort((sid << 32) - _ascending_bits(scores), dim=-1, stable=True).indices     # (int64 key)
    seg_first = torch.cumsum(lens, dim=-1) - lens            # where each id's tokens begin in that order
    rank_sorted = torch.arange(t, device=scores.device) - seg_first.gather(-1, sid.gather(-1, order))
    return torch.empty_like(rank_sorted).scatter_(-1, order, rank_sorted)


def select_ams(scores: torch.Tensor, evidence: torch.Tensor | None, lengths: torch.Tensor,
               n_pinned: torch.Tensor, n_keep: torch.Tensor, cfg: PolicyConfig,
               credit: torch.Tensor | None = None, k_max: int | None = None, kernel: bool = False) -> Selection:
    """AMS: mass → credit → segments → quotas → per-segment top tokens, union pinned and recent.

    kernel: the same result from one Triton launch (kernels/select_ams.py) where rows fit it and Triton can run;
    lengths must then not exceed T (as in every compaction)."""
    t = scores.shape[-1]
    if evidence is None and cfg.use_mass:
        raise ValueError("AMS needs attention evidence (window queries) unless use_mass is off")
    if kernel and ams_kernel.fits(t) and (scores.is_cuda or interpreting()):
        keep = _keep_counts(lengths, n_keep)
        idx, carried, sid = ams_kernel.select_ams_rows(scores, evidence, credit, lengths, n_pinned, keep,
                                                        _max_keep(keep, t, k_max), cfg, last_segment(cfg.delta))
        return Selection(indices=idx, n_keep=keep, credit=carried, segment_ids=sid)
    reg = _regions(lengths, n_pinned, cfg.keep_lastn, t)
    if evidence is None:
        evidence = torch.ones_like(scores, dtype=torch.float32)
    u, new_credit = _used_mass(evidence, credit, reg, cfg)
    start = segment(u, reg, cfg)
    sid, lens = _segment_table(start, reg.comp)              # lens[..., 1:]: the segments' lengths

    keep = _keep_counts(lengths, n_keep)
    keep_c = _budget_c(keep, reg)
    n_seg = start.sum(-1, keepdim=True)
    # Floor quota min(qmin, len_s) for every segment (DESIGN.md); only where the budget cannot cover all floors,
    # each gets min(qmin, keep_c // n_seg, len_s) instead, which always fits.
    floors = lens[..., 1:].clamp(max=cfg.qmin).sum(-1, keepdim=True)
    q_floor = (keep_c // n_seg.clamp(min=1)).clamp_(max=cfg.qmin).masked_fill_(floors <= keep_c, cfg.qmin)

    # (the dummy id 0 gets a mass too; its tokens lie outside C, which _finalize never picks)
    seg_fixed = torch.zeros_like(lens).scatter_add_(-1, sid, u)
    n_comp = reg.comp.sum(-1, keepdim=True).clamp(min=1)
    seg_mass = _share(seg_fixed) + MASS_FLOOR * lens / n_comp

    s = _clean(scores).masked_fill_(reg.outside, float("-inf"))
    rank = _rank_in_segment(s, sid, lens)
    past = rank - torch.minimum(q_floor, lens.gather(-1, sid))     # rank past the segment's quota
    share = seg_mass.gather(-1, sid) / (past.clamp(min=0) + 1)
    priority = share.masked_fill_(past < 0, QUOTA)

    k = _max_keep(keep, t, k_max)
    idx = _finalize(priority, reg, keep_c, k)
    carried = None
    if new_credit is not None:
        carried = new_credit.gather(-1, idx.clamp(min=0)).masked_fill_(idx < 0, 0.0)
    seg_ids = sid - 1                                       # 0, 1, ... in C; -1 elsewhere
    return Selection(indices=idx, n_keep=keep, credit=carried, segment_ids=seg_ids)
