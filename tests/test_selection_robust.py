"""Selection under hostile numbers and batch shapes: non-finite scores or evidence never unpin a token, a request's
kept set does not depend on the requests padded into its batch, and the floor quota is the documented one."""
import torch

from sglang_ams.config import PolicyConfig
from sglang_ams.selection import select_ams, select_topk

NONFINITE = (float("inf"), float("-inf"), float("nan"))


def _must_keep(sel, lengths, pinned, keeps, keep_lastn):
    for n in range(sel.indices.shape[0]):
        length, p, k = int(lengths[n]), int(pinned[n]), min(int(keeps[n]), int(lengths[n]))
        for row in sel.indices[n].reshape(-1, sel.indices.shape[-1]):
            kept = row[:k].tolist()
            assert len(set(kept)) == k and min(kept) >= 0 and max(kept) < length
            assert kept[:p] == list(range(p)), "the pinned prefix is kept in place"
            assert set(range(max(p, length - keep_lastn), length)) <= set(kept)


def test_infinite_evidence_keeps_the_pinned_prefix():
    # The case that overwrote tree-owned slots: inf/inf made NaN priorities, which sorted above the pinned ones.
    cfg = PolicyConfig(policy="ams", budget=26, interval=16, sink=1, keep_lastn=0, delta=0.5, lmin=144, lmax=144,
                       qmin=1, use_credit=False)
    t = 42
    scores = torch.arange(t, 0, -1, dtype=torch.float32).view(1, 1, 1, t)
    evidence = torch.full((1, 1, 1, t), 0.5)
    evidence[..., 12] = float("inf")
    sel = select_ams(scores, evidence, torch.tensor([t]), torch.tensor([9]), torch.tensor([35]), cfg)
    kept = sel.indices[0, 0, 0].tolist()
    assert kept[:9] == list(range(9)) and len(set(kept)) == 35


def test_nonfinite_scores_evidence_and_credit_never_unpin():
    g = torch.Generator().manual_seed(3)
    for trial in range(40):
        n, nl, h, t = 3, 2, 2, 160
        lengths = torch.tensor([160, 97, 130])
        pinned = torch.tensor([20, 0, 64])
        keeps = torch.tensor([90, 60, 100])
        scores, evidence, credit = (torch.randn(n, nl, h, t, generator=g) for _ in range(3))
        for x in (scores, evidence, credit):
            spots = torch.rand(x.shape, generator=g) < 0.1
            x[spots] = NONFINITE[trial % 3]
        cfg = PolicyConfig(policy="ams", budget=40, interval=16, keep_lastn=8, sink=4, delta=0.05, lmin=4, lmax=64,
                           qmin=2, use_credit=bool(trial % 2))
        sel = select_ams(scores, evidence, lengths, pinned, keeps, cfg, credit=credit)
        _must_keep(sel, lengths, pinned, keeps, cfg.keep_lastn)
        assert sel.credit is None or torch.isfinite(sel.credit).all()
        _must_keep(select_topk(scores, lengths, pinned, keeps, 8), lengths, pinned, keeps, 8)


def test_kept_set_does_not_depend_on_batch_padding():
    g = torch.Generator().manual_seed(0)
    cfg = PolicyConfig(policy="ams", budget=200, interval=64, keep_lastn=16, sink=4, delta=0.02, lmin=8, lmax=256,
                       qmin=4)
    nl, h, length = 4, 4, 700
    for trial in range(6):
        scores = torch.randn(1, nl, h, length, generator=g)
        evidence = torch.rand(1, nl, h, length, generator=g) ** 6
        credit = torch.rand(1, nl, h, length, generator=g) * 1e-3
        alone = select_ams(scores, evidence, torch.tensor([length]), torch.tensor([4]), torch.tensor([300]), cfg,
                           credit=credit)
        for pad, others in ((1, 1), (3000, 1), (257, 3)):
            t = length + pad
            s = torch.randn(1 + others, nl, h, t, generator=g)
            e = torch.rand(1 + others, nl, h, t, generator=g)
            c = torch.rand(1 + others, nl, h, t, generator=g)
            s[0], e[0], c[0] = 0, 0, 0
            s[0, ..., :length], e[0, ..., :length], c[0, ..., :length] = scores[0], evidence[0], credit[0]
            lengths = torch.tensor([length] + [t] * others)
            batched = select_ams(s, e, lengths, torch.tensor([4] * (1 + others)), torch.tensor([300] * (1 + others)),
                                 cfg, credit=c)
            assert torch.equal(batched.indices[0, ..., :300], alone.indices[0]), (trial, pad, others)
            assert torch.equal(batched.credit[0, ..., :300], alone.credit[0])


def test_every_segment_keeps_its_documented_floor():
    # Thousands of short rows at once (one request each): whenever the budget covers sum_s min(qmin, len_s),
    # segment s keeps at least min(qmin, len_s) tokens (the old rule capped it at keep // n_segments).
    g = torch.Generator().manual_seed(1)
    n, t = 4000, 24
    lengths = torch.randint(8, t + 1, (n,), generator=g)
    keeps = (lengths - torch.randint(1, 6, (n,), generator=g)).clamp(min=2)
    pinned = torch.zeros(n, dtype=torch.long)
    scores = torch.randn(n, 1, 1, t, generator=g)
    evidence = torch.rand(n, 1, 1, t, generator=g) ** 8
    checked = 0
    for qmin in (2, 3):
        cfg = PolicyConfig(policy="ams", budget=2, interval=8, keep_lastn=0, sink=0, delta=0.1, lmin=1, lmax=8,
                           qmin=qmin, use_credit=False)
        sel = select_ams(scores, evidence, lengths, pinned, keeps, cfg)
        seg = sel.segment_ids[:, 0, 0]
        for i in range(n):
            ids = seg[i, : int(lengths[i])]
            seg_lens = torch.bincount(ids)
            floors = torch.clamp(seg_lens, max=qmin)
            k = int(keeps[i])
            if int(floors.sum()) > k:
                continue
            kept = sel.indices[i, 0, 0, :k]
            got = torch.bincount(ids[kept], minlength=len(seg_lens))
            assert (got >= floors).all(), (i, seg_lens.tolist(), got.tolist(), k)
            checked += 1
    assert checked > 3000
