"""Tensor parallelism below the engine: a rank holding a slice of the heads computes exactly the slice of what one
process holding every head computes. The head ranges follow SGLang's own sharding (checked against
QKVParallelLinear's weight loader); every built-in scorer, window attention, the gather, both selectors and the
compaction kernel run on a head-sharded input (Triton under TRITON_INTERPRET on CPU) and are compared with the
matching slice of the full run. Ranks run as threads of a simulated TP group (tp_group.py) where a scorer needs a
sum over all heads (TOVA). The engine-level simulation is tests/engine/test_tensor_parallel.py."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from sglang_ams.config import SCORERS, PolicyConfig
from sglang_ams.heads import HeadRange
from sglang_ams.kernels.compaction import compact_kv
from sglang_ams.kernels.gather import gather_dense
from sglang_ams.kernels.scoring import window_attention_pool
from sglang_ams.rope import RopeSpec
from sglang_ams.scorers.base import ScoreInputs
from sglang_ams.scorers.builtin import make_scorer
from sglang_ams.selection import select_ams, select_topk
from sglang_ams.window_attention import WindowAttention, attention_evidence, window_row_lse

sys.path.insert(0, str(Path(__file__).resolve().parent))     # (--import-mode=importlib adds no test folder)
from fake_pool import FakePool, fake_pool  # noqa: E402
from tp_group import FakeTPGroup  # noqa: E402

LAYERS, KV_HEADS, GROUP, D, W, TP = 2, 4, 2, 16, 4, 2
Q_HEADS = KV_HEADS * GROUP
LENGTHS = (40, 29, 33)
T = max(LENGTHS)


def _inputs(seed: int = 0) -> ScoreInputs:
    gen = torch.Generator().manual_seed(seed)
    n = len(LENGTHS)
    lengths = torch.tensor(LENGTHS)
    query_pos = lengths[:, None] - W + torch.arange(W)[None, :] + torch.tensor([0, 17, 5])[:, None]
    return ScoreInputs(keys=torch.randn(n, LAYERS, KV_HEADS, T, D, generator=gen),
                       values=torch.randn(n, LAYERS, KV_HEADS, T, D, generator=gen), lengths=lengths,
                       queries=torch.randn(n, LAYERS, Q_HEADS, W, D, generator=gen), query_pos=query_pos,
                       rope=RopeSpec(1.0 / 10000.0 ** (torch.arange(0, D, 2).float() / D)), scale=D ** -0.5)


def _shard(inputs: ScoreInputs, heads: HeadRange) -> ScoreInputs:
    kv = slice(heads.kv_start, heads.kv_start + heads.kv_count)
    q = slice(heads.q_start, heads.q_start + heads.q_count)
    return dataclasses.replace(inputs, keys=inputs.keys[:, :, kv], values=inputs.values[:, :, kv],
                               queries=inputs.queries[:, :, q], attn=None, heads=heads)


def _kv(heads: HeadRange) -> slice:
    return slice(heads.kv_start, heads.kv_start + heads.kv_count)


def _assert_valid_equal(got: torch.Tensor, want: torch.Tensor, exact: bool) -> None:
    for n, length in enumerate(LENGTHS):
        if exact:
            assert torch.equal(got[n, ..., :length], want[n, ..., :length])
        else:
            torch.testing.assert_close(got[n, ..., :length], want[n, ..., :length], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- head ranges


@pytest.mark.parametrize("tp, kv, q", [(2, 8, 32), (4, 8, 32), (8, 8, 64), (4, 2, 16), (8, 2, 16), (2, 1, 8)])
def test_head_ranges_match_sglang_sharding(tp, kv, q):
    """Each rank's range is what SGLang's QKVParallelLinear loads onto that rank: a qkv weight whose rows carry
    their model-wide head id, loaded per rank, shows which q and KV heads land there."""
    linear = pytest.importorskip("sglang.srt.layers.linear")
    hd, hidden = 2, 4
    weights = {name: (torch.arange(heads).repeat_interleave(hd).float()[:, None]).expand(heads * hd, hidden).clone()
               for name, heads in (("q", q), ("k", kv), ("v", kv))}
    for rank in range(tp):
        layer = linear.QKVParallelLinear(hidden, hd, q, kv, bias=False, tp_rank=rank, tp_size=tp)
        for name, w in weights.items():
            layer.weight_loader(layer.weight, w, name)
        rows = layer.weight[:, 0].view(-1, hd)[:, 0].long()            # head id per loaded head
        heads = HeadRange.of_rank(rank, tp, kv, q)
        assert rows[:heads.q_count].tolist() == list(range(heads.q_start, heads.q_start + heads.q_count))
        kv_rows = rows[heads.q_count:]
        assert kv_rows.tolist() == 2 * list(range(heads.kv_start, heads.kv_start + heads.kv_count))   # K, V
        assert heads.replicated == (tp > kv)
    full = HeadRange.of_rank(0, 1, kv, q)
    assert full.is_full and full == HeadRange.full(kv, q) and full.all_reduce is None


def test_head_ranges_refuse_what_sglang_cannot_shard():
    with pytest.raises(ValueError, match="shard"):
        HeadRange.of_rank(0, 3, 8, 32)
    with pytest.raises(ValueError, match="TP group"):
        HeadRange.of_rank(1, 2, 4, 8).sum_over_ranks(torch.ones(1))     # a partial range without a group


# ---------------------------------------------------------------- scorers


def _stats_file(tmp_path) -> str:
    from sglang_ams.scorers.triattention_calib import TriAttentionStats, save_stats
    gen = torch.Generator().manual_seed(9)
    f = D // 2
    q_mean = torch.complex(torch.randn(LAYERS, Q_HEADS, f, generator=gen),
                           torch.randn(LAYERS, Q_HEADS, f, generator=gen))
    path = str(tmp_path / "stats.pt")
    save_stats(TriAttentionStats(q_mean, q_mean.abs() + torch.rand(LAYERS, Q_HEADS, f, generator=gen), 10, "neox"),
               path)
    return path


SCORER_CASES = [(name, {}) for name in SCORERS] + [("triattention", {"triattention_stats": "FILE"})]


def _cfg(name, extra, tmp_path) -> PolicyConfig:
    extra = {k: _stats_file(tmp_path) if v == "FILE" else v for k, v in extra.items()}
    return PolicyConfig(scorer=name, seed=3, **extra)


def _sharded_scores(cfg: PolicyConfig, name: str, inputs: ScoreInputs, calls: int = 2, drop_offset: bool = False):
    """Full-head scores and each rank's, over `calls` successive calls (stateful scorers: random's stream)."""
    full_scorer = make_scorer(cfg, name)
    full = [full_scorer.score(dataclasses.replace(inputs, attn=None)) for _ in range(calls)]
    group = FakeTPGroup(TP)
    ranges = [group.heads(r, KV_HEADS, Q_HEADS) for r in range(TP)]
    if drop_offset:          # what a rank would do if it took its local head index for the model's
        ranges = [dataclasses.replace(h, kv_start=0, q_start=0) for h in ranges]
    scorers = [make_scorer(cfg, name) for _ in range(TP)]           # one per rank process

    def rank(r):
        return [scorers[r].score(_shard(inputs, ranges[r])) for _ in range(calls)]
    return full, group.run([lambda r=r: rank(r) for r in range(TP)]), group


@pytest.mark.parametrize("name, extra", SCORER_CASES, ids=[n + ("-stats" if e else "") for n, e in SCORER_CASES])
def test_scorer_on_a_head_shard_equals_the_slice(name, extra, tmp_path):
    cfg = _cfg(name, extra, tmp_path)
    inputs = _inputs()
    full, ranks, group = _sharded_scores(cfg, name, inputs)
    exact = name in ("random", "streaming")           # integer hash / positions; the others are float math
    for r, per_call in enumerate(ranks):
        for call, got in enumerate(per_call):
            _assert_valid_equal(got, full[call][:, :, _kv(HeadRange.of_rank(r, TP, KV_HEADS, Q_HEADS))], exact)
    # Only TOVA needs the other ranks' heads: one [N, L, 1, T] sum per call, on every rank.
    assert group.shapes == ([(k, (len(LENGTHS), LAYERS, 1, T)) for k in range(2)] if name == "tova" else [])
    if name == "random":       # successive calls draw new scores, on every rank alike
        assert not torch.equal(full[0], full[1])


@pytest.mark.parametrize("name, extra", [("random", {}), ("triattention", {"triattention_stats": "FILE"})],
                         ids=["random", "triattention-stats"])
def test_a_rank_without_its_head_offset_scores_other_heads(name, extra, tmp_path):
    """The offset matters: scored with local head ids, rank 1 gets rank 0's numbers (the test above can fail)."""
    cfg = _cfg(name, extra, tmp_path)
    inputs = _inputs(1)
    full, ranks, _ = _sharded_scores(cfg, name, inputs, calls=1, drop_offset=True)
    want = full[0][:, :, _kv(HeadRange.of_rank(1, TP, KV_HEADS, Q_HEADS))]
    got = ranks[1][0]
    assert not torch.allclose(got, want, rtol=1e-3, atol=1e-3)


def test_random_scores_are_uniform_and_seeded():
    inputs = _inputs()
    a, b = make_scorer(PolicyConfig(scorer="random", seed=7)), make_scorer(PolicyConfig(scorer="random", seed=7))
    first, again = a.score(inputs), b.score(inputs)
    assert torch.equal(first, again)                                # same seed, same stream
    assert not torch.equal(a.score(inputs), first)                  # the next call draws anew
    assert not torch.equal(make_scorer(PolicyConfig(scorer="random", seed=8)).score(inputs), first)
    big = dataclasses.replace(inputs, keys=torch.empty(8, 4, 8, 512, 1), lengths=torch.full((8,), 512))
    x = make_scorer(PolicyConfig(scorer="random", seed=1)).score(big).flatten()
    assert 0.0 <= float(x.min()) and float(x.max()) < 1.0
    hist = torch.histc(x, bins=16, min=0.0, max=1.0) / x.numel()     # 131072 values: each bin 1/16 within 8 %
    assert (hist - 1 / 16).abs().max() < 0.005, hist
    assert abs(float(torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1])) < 0.02     # neighbours uncorrelated


# ---------------------------------------------------------------- kernels and selection


def _rank_pool(pool: FakePool, heads: HeadRange) -> FakePool:
    """The same slots and rows, buffers holding only the rank's heads (what its MHATokenToKVPool holds)."""
    kv = _kv(heads)
    return dataclasses.replace(pool, k_buffers=[b[:, kv].contiguous() for b in pool.k_buffers],
                               v_buffers=[b[:, kv].contiguous() for b in pool.v_buffers])


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
@pytest.mark.parametrize("page_size", [1, 4])
def test_kernels_on_a_head_shard_equal_the_slice(page_size):
    """Window attention (recomputed and from a given LSE), the dense gather, both selectors and the in-place
    compaction, on each rank's pool, equal the matching slice of the run on the full pool."""
    gen = torch.Generator().manual_seed(4)
    inputs = _inputs(2)
    lengths = inputs.lengths
    keys = inputs.keys.to(torch.bfloat16)
    pool = fake_pool(keys, lengths, inputs.values.to(torch.bfloat16), page_size=page_size, generator=gen)
    queries = inputs.queries.to(torch.bfloat16)
    kw = dict(kv_dtype=torch.bfloat16, head_dim=D, scale=D ** -0.5, want_last_row=True, max_len=T, num_splits=2)
    lse = window_row_lse(keys.float(), queries.float(), lengths, D ** -0.5).float().contiguous()
    n_pinned, n_keep = torch.tensor([4, 0, 8]), torch.tensor([20, 16, 21])
    cfg = PolicyConfig(policy="ams", budget=12, interval=8, window=W, keep_lastn=4, lmin=4, lmax=16, qmin=2,
                       pool_kernel=3)

    def run(p: FakePool, q: torch.Tensor, row_lse: torch.Tensor, h: int):
        common = dict(num_kv_heads=h, slot_stride=p.slot_stride, **kw)
        attn = window_attention_pool(p.k_ptrs, p.req_to_token, p.req_rows, p.lengths, q, **common)
        from_lse = window_attention_pool(p.k_ptrs, p.req_to_token, p.req_rows, p.lengths, q, row_lse=row_lse, **common)
        dense = gather_dense(p.k_ptrs, p.req_to_token, p.req_rows, p.lengths, T, num_layers=LAYERS, num_heads=h,
                             head_dim=D, slot_stride=p.slot_stride, dtype=torch.bfloat16)
        evidence = attention_evidence(WindowAttention(*attn), h, cfg.pool_kernel)
        scores = evidence + 1e-3 * dense.float().norm(dim=-1)        # any per-head score
        topk = select_topk(scores, lengths, n_pinned, n_keep, cfg.keep_lastn)
        ams = select_ams(scores, evidence, lengths, n_pinned, n_keep, cfg, credit=None)
        compact_kv(p.k_ptrs, p.v_ptrs, p.req_to_token, p.req_rows, ams.indices, n_keep, kv_dtype=torch.bfloat16,
                   num_kv_heads=h, head_dim=D, slot_stride=p.slot_stride)
        return attn, from_lse, dense, topk.indices, ams.indices

    rank_pools = [_rank_pool(pool, HeadRange.of_rank(r, TP, KV_HEADS, Q_HEADS)) for r in range(TP)]
    full = run(pool, queries, lse, KV_HEADS)
    for r, p in enumerate(rank_pools):
        heads = HeadRange.of_rank(r, TP, KV_HEADS, Q_HEADS)
        kv, q = _kv(heads), slice(heads.q_start, heads.q_start + heads.q_count)
        attn, from_lse, dense, topk, ams = run(p, queries[:, :, q].contiguous(), lse[:, :, q].contiguous(),
                                               heads.kv_count)
        for got, want in zip(attn + from_lse, full[0] + full[1]):
            assert torch.equal(got, want[:, :, q])
        assert torch.equal(dense, full[2][:, :, kv])
        assert torch.equal(topk, full[3][:, :, kv]) and torch.equal(ams, full[4][:, :, kv])
        for got, want in zip(p.k_buffers + p.v_buffers, pool.k_buffers + pool.v_buffers):   # every slot
            assert torch.equal(got, want[:, kv])
    assert not torch.equal(full[4][:, :, :2], full[4][:, :, 2:]), "the two ranks' heads keep different tokens"


@pytest.mark.parametrize("tp, kv, q", [(1, 8, 32), (2, 8, 32), (8, 8, 64), (4, 2, 16)])
def test_reservations_are_sized_for_the_rank_heads(tp, kv, q):
    """The KV-budget reservations (workspace, ring share) are computed per rank: its KV heads and its query group
    (with replicated KV heads the group shrinks), as the rank's pool and ring hold them."""
    from types import SimpleNamespace

    from sglang_ams.patches.mem_cache import _kv_dims
    config = SimpleNamespace(num_key_value_heads=kv, num_attention_heads=q, head_dim=64, hidden_size=q * 64)
    dims = _kv_dims(config, torch.bfloat16, tp)
    heads = HeadRange.of_rank(0, tp, kv, q)
    assert dims == dict(num_kv_heads=heads.kv_count, group=heads.q_count // heads.kv_count, head_dim=64, elem_size=2)
