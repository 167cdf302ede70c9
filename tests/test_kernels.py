"""Triton kernels against the torch references: scoring vs window_attention, compaction vs gather_kept.

On CPU they run under TRITON_INTERPRET (set by conftest); the `gpu` variants run the same checks at larger sizes
on CUDA. Data is random (never zeros), outputs are poisoned before each run, the fake pool scatters every request
over random slots, and the compaction checks compare whole buffers so a stray write anywhere fails.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from sglang_ams.compaction import gather_kept
from sglang_ams.kernels.compaction import (CompactionConfig, check_keep, compact_kv, compaction_bytes,
                                           tail_to_free)
from sglang_ams.kernels.scoring import scoring_key_bytes, window_attention_pool
from sglang_ams.window_attention import window_attention, window_row_lse

sys.path.insert(0, str(Path(__file__).resolve().parent))     # (--import-mode=importlib adds no test folder)
from fake_pool import FakePool, fake_pool  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# The interpreter can only be chosen before triton is imported, so one process runs either CPU or GPU variants.
CPU = pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(HAS_CUDA, reason="interpreter runs on CPU-only hosts"))
GPU = pytest.param("cuda", id="gpu", marks=pytest.mark.gpu)
DEVICES = [CPU, GPU]
# The interpreter converts 1-element arrays to ints in range() bounds (a numpy deprecation, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------- scoring

def _scoring_case(device, *, lengths, kv_heads, group, window, head_dim, layers, dtype, q_dtype=None,
                  page_size=1, seed=0):
    g = _gen(seed)
    lengths = torch.tensor(lengths, dtype=torch.int32)
    n, t = len(lengths), int(lengths.max())
    keys = torch.randn(n, layers, kv_heads, t, head_dim, generator=g).to(dtype)
    queries = (torch.randn(n, layers, kv_heads * group, window, head_dim, generator=g) * 2).to(q_dtype or dtype)
    pool = fake_pool(keys.to(device), lengths.to(device), page_size=page_size, generator=g)
    return pool, queries.to(device)


def _run_scoring(pool: FakePool, queries, dtype, *, group_reduce, max_len=None, **kw):
    n, layers, hq, _, d = queries.shape
    kv_heads = pool.k_buffers[0].shape[1]
    out_len = int(pool.lengths.max()) if max_len is None else max_len
    out_heads = kv_heads if group_reduce == "mean" else hq
    poison_mean = torch.full((n, layers, out_heads, out_len), float("nan"), device=queries.device)
    poison_last = torch.full_like(poison_mean, -7.0)
    mean, last = window_attention_pool(
        pool.k_ptrs, pool.req_to_token, pool.req_rows, pool.lengths, queries, kv_dtype=dtype,
        num_kv_heads=kv_heads, head_dim=d, slot_stride=pool.slot_stride, group_reduce=group_reduce,
        want_last_row=True, max_len=max_len, out_mean=poison_mean, out_last=poison_last, **kw)
    assert mean is poison_mean and last is poison_last
    return mean, last


def _scoring_reference(pool: FakePool, queries, *, group_reduce, out_len, scale=None, q_dtype=None):
    keys = pool.dense("k", out_len).float()
    q = queries if q_dtype is None else queries.to(q_dtype)
    ref = window_attention(keys, q.float(), pool.lengths, scale)
    mean, last = ref.mean_rows, ref.last_row
    if group_reduce == "mean":
        n, layers, hq, t = mean.shape
        h = keys.shape[2]
        mean = mean.view(n, layers, h, hq // h, t).mean(3)
        last = last.view(n, layers, h, hq // h, t).mean(3)
    return mean, last


def _assert_scores(got, want, lengths, device):
    atol, rtol = (2e-6, 1e-4) if device == "cpu" else (2e-5, 2e-3)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    pos = torch.arange(got.shape[-1], device=got.device)
    past = (pos[None, :] >= lengths[:, None])[:, None, None, :].expand_as(got)
    assert torch.equal(got[past], torch.zeros_like(got[past])), "positions past a length must be exact zeros"


SCORING_CASES = [
    # group, head_dim, dtype, group_reduce, window, num_splits
    (1, 64, torch.bfloat16, "none", 8, 3),
    (4, 128, torch.float16, "mean", 8, 2),
    (8, 64, torch.bfloat16, "none", 5, 2),
    (4, 64, torch.bfloat16, "mean", 16, 1),
    (8, 128, torch.bfloat16, "mean", 8, None),
    (1, 128, torch.float16, "none", 3, 4),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group,head_dim,dtype,group_reduce,window,num_splits", SCORING_CASES)
def test_scoring_matches_reference(device, group, head_dim, dtype, group_reduce, window, num_splits):
    big = device == "cuda"
    lengths = [3000, 1777, 5, 2049] if big else [83, 41, 5, 1]      # < W rows see nothing; T % block != 0
    pool, queries = _scoring_case(device, lengths=lengths, kv_heads=8 if big else 2, group=group, window=window,
                                  head_dim=head_dim, layers=4 if big else 2, dtype=dtype, seed=group + head_dim)
    mean, last = _run_scoring(pool, queries, dtype, group_reduce=group_reduce, num_splits=num_splits,
                              block_t=None if big else 32)
    want_mean, want_last = _scoring_reference(pool, queries, group_reduce=group_reduce, out_len=max(lengths))
    _assert_scores(mean, want_mean, pool.lengths, device)
    _assert_scores(last, want_last, pool.lengths, device)
    if group_reduce == "none":         # each real query row's probabilities sum to 1 (mean over rows too)
        sums = mean.sum(-1)
        seen = pool.lengths.to(sums.device) >= window
        torch.testing.assert_close(sums[seen], torch.ones_like(sums[seen]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_scoring_padding_scale_and_query_dtype(device):
    """max_len wider than every request, a non-default scale, fp32 queries on bf16 keys, a paged pool."""
    lengths = [70, 33]
    pool, queries = _scoring_case(device, lengths=lengths, kv_heads=2, group=4, window=8, head_dim=64, layers=2,
                                  dtype=torch.bfloat16, q_dtype=torch.float32, page_size=16, seed=7)
    mean, last = _run_scoring(pool, queries, torch.bfloat16, group_reduce="none", max_len=100, num_splits=2,
                              block_t=32, scale=0.3)
    want_mean, want_last = _scoring_reference(pool, queries, group_reduce="none", out_len=100, scale=0.3,
                                              q_dtype=torch.bfloat16)       # the kernel rounds queries to kv_dtype
    _assert_scores(mean, want_mean, pool.lengths, device)
    _assert_scores(last, want_last, pool.lengths, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group,head_dim,dtype,group_reduce,window,num_splits", SCORING_CASES[:4])
def test_scoring_with_given_row_lse(device, group, head_dim, dtype, group_reduce, window, num_splits):
    """One key pass with the rows' LSE handed in (as the decode attention reports it) == the two-pass result."""
    big = device == "cuda"
    lengths = [3000, 1777, 5, 2049] if big else [83, 41, 5, 1]
    pool, queries = _scoring_case(device, lengths=lengths, kv_heads=8 if big else 2, group=group, window=window,
                                  head_dim=head_dim, layers=4 if big else 2, dtype=dtype, seed=11 + group)
    keys = pool.dense("k", max(lengths)).float()
    row_lse = window_row_lse(keys, queries.to(dtype).float(), pool.lengths)
    assert torch.isfinite(row_lse).any()
    if min(lengths) < window:           # a request shorter than the window has rows that see no key
        assert torch.isinf(row_lse).any()
    row_lse = row_lse.nan_to_num(0.0, neginf=0.0)       # as the ring holds them: blind rows never matter
    kw = dict(group_reduce=group_reduce, num_splits=num_splits, block_t=None if big else 32)
    mean, last = _run_scoring(pool, queries, dtype, row_lse=row_lse, **kw)
    want_mean, want_last = _scoring_reference(pool, queries, group_reduce=group_reduce, out_len=max(lengths))
    _assert_scores(mean, want_mean, pool.lengths, device)
    _assert_scores(last, want_last, pool.lengths, device)
    # A wrong LSE must show: shift every row by one (a factor of 2 in every probability).
    off, _ = _run_scoring(pool, queries, dtype, row_lse=row_lse + 1.0, **kw)
    torch.testing.assert_close(off, mean / 2, atol=1e-6, rtol=1e-4)


def test_scoring_rejects_bad_row_lse():
    pool, queries = _scoring_case("cpu", lengths=[9], kv_heads=1, group=2, window=4, head_dim=64, layers=1,
                                  dtype=torch.bfloat16)
    bad = torch.zeros(1, 1, 2, 3)
    with pytest.raises(ValueError, match="row_lse must be float32"):
        window_attention_pool(pool.k_ptrs, pool.req_to_token, pool.req_rows, pool.lengths, queries,
                              kv_dtype=torch.bfloat16, num_kv_heads=1, head_dim=64, slot_stride=pool.slot_stride,
                              row_lse=bad)


@pytest.mark.parametrize("device", DEVICES)
def test_scoring_splits_agree(device):
    """The LSE combine across splits: 1 split and many splits give the same result."""
    pool, queries = _scoring_case(device, lengths=[150, 97], kv_heads=1, group=4, window=8, head_dim=64,
                                  layers=1, dtype=torch.float16, seed=3)
    one, _ = _run_scoring(pool, queries, torch.float16, group_reduce="mean", num_splits=1, block_t=32)
    many, _ = _run_scoring(pool, queries, torch.float16, group_reduce="mean", num_splits=8, block_t=32)
    torch.testing.assert_close(one, many, atol=1e-6, rtol=1e-5)


def test_scoring_rejects_unsupported_dtype():
    pool, queries = _scoring_case("cpu", lengths=[20], kv_heads=1, group=1, window=4, head_dim=64, layers=1,
                                  dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"float8_e4m3fn.*bfloat16, torch.float16"):
        window_attention_pool(pool.k_ptrs, pool.req_to_token, pool.req_rows, pool.lengths, queries,
                              kv_dtype=torch.float8_e4m3fn, num_kv_heads=1, head_dim=64,
                              slot_stride=pool.slot_stride)
    with pytest.raises(ValueError, match="group_reduce"):
        window_attention_pool(pool.k_ptrs, pool.req_to_token, pool.req_rows, pool.lengths, queries,
                              kv_dtype=torch.bfloat16, num_kv_heads=1, head_dim=64, slot_stride=pool.slot_stride,
                              group_reduce="max")


def test_scoring_key_bytes():
    assert scoring_key_bytes([10, 20], num_layers=2, num_kv_heads=4, head_dim=128, elem_size=2) == \
        2 * 30 * 2 * 4 * 128 * 2


# ------------------------------------------------------------------------------------------------- compaction

def _keep_positions(kind: str, length: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Adversarial ascending keep sets of k positions out of [0, length)."""
    if kind == "identity":
        return torch.arange(k)
    if kind == "tail":                                     # every source is far above its destination
        return torch.arange(length - k, length)
    if kind == "shift":                                    # keep[j] = j + 1: each block reads what it writes next
        return torch.arange(k) + 1 if k < length else torch.arange(k)
    if kind == "pinned_tail":                              # pinned prefix (no writes), then the tail
        p = min(4, k)
        return torch.cat([torch.arange(p), torch.arange(length - (k - p), length)])
    if kind == "random":
        return torch.sort(torch.randperm(length, generator=g)[:k]).values
    raise ValueError(kind)


KINDS = ("identity", "tail", "shift", "pinned_tail", "random")


def _make_keep(lengths, n_keep, layers, heads, pattern, g):
    """keep [N, L, H, K] (-1 past n_keep); pattern 'mixed' draws a different kind per (layer, head)."""
    k_max = max(max(n_keep), 1)
    keep = torch.full((len(lengths), layers, heads, k_max), -1, dtype=torch.int64)
    for n, (length, k) in enumerate(zip(lengths, n_keep)):
        for layer in range(layers):
            for h in range(heads):
                kind = KINDS[int(torch.randint(len(KINDS), (1,), generator=g))] if pattern == "mixed" else pattern
                keep[n, layer, h, :k] = _keep_positions(kind, length, k, g)
    return keep


def _expected_buffers(buffers, pool: FakePool, keep, n_keep):
    """Old buffers with only destination slots [0, n_keep) of each row rewritten, per (layer, head)."""
    out = [b.clone() for b in buffers]
    for n in range(keep.shape[0]):
        row = pool.req_to_token[pool.req_rows[n].long()].long()
        k = int(n_keep[n])
        for layer in range(keep.shape[1]):
            for h in range(keep.shape[2]):
                src = row[keep[n, layer, h, :k].long().to(row.device)]
                out[layer][row[:k], h] = buffers[layer][src, h]
    return out


def _run_compaction_case(device, *, lengths, n_keep, layers, heads, head_dim, dtype, pattern, page_size=1,
                         keep_dtype=torch.int32, seed=0, config=None):
    g = _gen(seed)
    t = max(lengths)
    keys = torch.randn(len(lengths), layers, heads, t, head_dim, generator=g).to(dtype)
    lengths_t = torch.tensor(lengths, dtype=torch.int32)
    pool = fake_pool(keys.to(device), lengths_t.to(device), page_size=page_size, generator=g)
    keep = _make_keep(lengths, n_keep, layers, heads, pattern, g).to(keep_dtype)
    n_keep_t = torch.tensor(n_keep, dtype=torch.int32)
    check_keep(keep, n_keep_t)
    want_k = _expected_buffers(pool.k_buffers, pool, keep, n_keep)
    want_v = _expected_buffers(pool.v_buffers, pool, keep, n_keep)
    dense_k, dense_v = pool.dense("k", t), pool.dense("v", t)

    compact_kv(pool.k_ptrs, pool.v_ptrs, pool.req_to_token, pool.req_rows, keep.to(device), n_keep_t.to(device),
               kv_dtype=dtype, num_kv_heads=heads, head_dim=head_dim, slot_stride=pool.slot_stride, config=config)

    for layer in range(layers):      # whole buffers: other requests, heads, tails and spare slots untouched
        assert torch.equal(pool.k_buffers[layer], want_k[layer]), f"K layer {layer}"
        assert torch.equal(pool.v_buffers[layer], want_v[layer]), f"V layer {layer}"
    got_k, got_v = pool.dense("k", t), pool.dense("v", t)      # and the composite-slot contract, via gather_kept
    ref_k, ref_v = gather_kept(dense_k, keep.to(device)), gather_kept(dense_v, keep.to(device))
    for n, k in enumerate(n_keep):
        assert torch.equal(got_k[n, :, :, :k], ref_k[n, :, :, :k])
        assert torch.equal(got_v[n, :, :, :k], ref_v[n, :, :, :k])
    return pool


COMPACTION_CASES = [
    # pattern, head_dim, dtype
    ("identity", 64, torch.bfloat16),
    ("tail", 128, torch.bfloat16),
    ("shift", 64, torch.float16),
    ("pinned_tail", 128, torch.float16),
    ("random", 64, torch.bfloat16),
    ("mixed", 128, torch.bfloat16),
    ("mixed", 64, torch.float16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern,head_dim,dtype", COMPACTION_CASES)
def test_compaction_adversarial(device, pattern, head_dim, dtype):
    big = device == "cuda"
    # Several requests of different lengths; n_keep not a multiple of the 64-row block; one keeps everything,
    # one keeps nothing.
    lengths = [3001, 1500, 700, 64, 900] if big else [150, 131, 70, 9, 40]
    n_keep = [1100, 1499, 700, 0, 64] if big else [100, 130, 70, 0, 17]
    # On CPU: 16-row blocks and 32-wide dim chunks, so the walk crosses many blocks (the GPU uses the defaults).
    config = None if big else CompactionConfig(block_j=16, d_chunk=32, num_warps=4)
    _run_compaction_case(device, lengths=lengths, n_keep=n_keep, layers=4 if big else 2, heads=8 if big else 3,
                         head_dim=head_dim, dtype=dtype, pattern=pattern, seed=head_dim + len(pattern),
                         config=config)


@pytest.mark.parametrize("device", DEVICES)
def test_compaction_paged_pool_and_tail(device):
    """Page size 16, int64 keep; then the tail to free is exactly the whole pages past align_up(n_keep, 16), each
    page whole and in order from its page-aligned first slot."""
    lengths, n_keep, page = [70, 45, 33], [40, 20, 33], 16
    pool = _run_compaction_case(device, lengths=lengths, n_keep=n_keep, layers=2, heads=2, head_dim=64,
                                dtype=torch.bfloat16, pattern="mixed", page_size=page, keep_dtype=torch.int64,
                                seed=11)
    rows = pool.req_to_token[pool.req_rows.long()]
    req_rows = pool.req_rows.tolist()
    freed = tail_to_free(pool.req_to_token, req_rows, n_keep, lengths, page)
    assert freed.dtype == torch.int64 and freed.device == pool.req_to_token.device
    tails = torch.cat([rows[0, 48:70], rows[1, 32:45]]).long()      # request 2 keeps everything
    pages = freed.view(-1, page)
    assert (pages[:, 0] % page == 0).all() and torch.equal(pages, pages[:, :1] + torch.arange(page, device=freed.device))
    assert sorted((pages[:, 0] // page).tolist()) == sorted(set((tails // page).tolist())), "not exactly the tail pages"
    kept = torch.cat([rows[n, :min(-(-k // page) * page, length)] for n, (k, length) in enumerate(zip(n_keep, lengths))]).long()
    assert not set((freed // page).tolist()) & set((kept // page).tolist()), "a freed page still holds kept tokens"
    one = tail_to_free(pool.req_to_token, req_rows, n_keep, lengths, 1)
    assert torch.equal(one, torch.cat([rows[0, 40:70], rows[1, 20:45]]).long())
    assert tail_to_free(pool.req_to_token, [], [], [], page).numel() == 0
    with pytest.raises(ValueError, match="> lengths"):
        tail_to_free(pool.req_to_token, req_rows[:1], [71], [70], page)


def test_compaction_rejects_bad_inputs():
    pool = fake_pool(torch.randn(1, 1, 1, 8, 64).bfloat16(), torch.tensor([8], dtype=torch.int32))
    keep = torch.arange(4, dtype=torch.int32).view(1, 1, 1, 4)
    args = (pool.k_ptrs, pool.v_ptrs, pool.req_to_token, pool.req_rows, keep, torch.tensor([4]))
    with pytest.raises(ValueError, match=r"float8_e4m3fn.*supported: torch.bfloat16, torch.float16"):
        compact_kv(*args, kv_dtype=torch.float8_e4m3fn, num_kv_heads=1, head_dim=64, slot_stride=64)
    with pytest.raises(ValueError, match="int8"):
        compact_kv(*args, kv_dtype=torch.int8, num_kv_heads=1, head_dim=64, slot_stride=64)
    descending = torch.tensor([0, 3, 2, 5]).view(1, 1, 1, 4)
    with pytest.raises(ValueError, match="ascending"):
        check_keep(descending, torch.tensor([4]))
    with pytest.raises(ValueError, match="ascending"):
        compact_kv(pool.k_ptrs, pool.v_ptrs, pool.req_to_token, pool.req_rows, descending, torch.tensor([4]),
                   kv_dtype=torch.bfloat16, num_kv_heads=1, head_dim=64, slot_stride=64, validate=True)


def test_compaction_bytes():
    assert compaction_bytes(1024, num_layers=32, num_kv_heads=8, head_dim=128, elem_size=2) == \
        2 * 1024 * 32 * 8 * 128 * 2 * 2


# ------------------------------------------------------------------------------------------------- codegen

_COMPILE_CHECK = textwrap.dedent("""
    import re, triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sglang_ams.kernels import scoring, compaction

    def compile_ptx(kernel, constexprs, pointers, num_warps):
        sig = {a: "constexpr" if a in constexprs else pointers.get(a, "fp32" if a == "scale_log2" else "i32")
               for a in kernel.arg_names}
        # What the launcher specialises at run time: 16-byte aligned pointers, strides divisible by 16.
        aligned = [a for a in kernel.arg_names if a in pointers or a.startswith(("q_s", "keep_s")) or
                   a in ("slot_stride", "r2t_stride")]
        attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned if a != "keep_sj"}
        src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]

    common = dict(NUM_KV_HEADS=8, GROUP=4, WINDOW=8, G_PAD=4, W_PAD=8, HEAD_DIM=128, D_PAD=128, BLOCK_T=64,
                  KV_DTYPE=tl.bfloat16, DOT_DTYPE=tl.bfloat16, DOT_PRECISION="tf32")
    pointers = dict(k_ptrs="*i64", req_to_token="*i32", req_rows="*i32", lengths="*i32", queries="*bf16",
                    part_max="*fp32", part_sum="*fp32", row_lse="*fp32", mean_out="*fp32", last_out="*fp32")
    probs = dict(S_PAD=4, GROUP_MEAN=True, WANT_LAST=True)
    for kernel, extra in ((scoring._lse_partials_kernel, {}),
                          (scoring._probabilities_kernel, dict(probs, LSE_GIVEN=False)),
                          (scoring._probabilities_kernel, dict(probs, LSE_GIVEN=True))):
        ptx = compile_ptx(kernel, {**common, **extra}, pointers, 4)
        assert "ld.global.b16" not in ptx, kernel          # no element-wise key or query loads
        assert "f64" not in ptx, kernel                    # a float literal outside fp32 range promotes to fp64
        assert "cp.async.cg.shared.global" in ptx, kernel  # 16-byte pipelined key loads
        print("ok", kernel.fn.__name__)
    cfg = compaction.compaction_config(128, 2)
    ptx = compile_ptx(compaction._compact_kernel,
                      dict(NUM_KV_HEADS=8, HEAD_DIM=128, D_CHUNK=cfg.d_chunk, BLOCK_J=cfg.block_j,
                           KV_DTYPE=tl.bfloat16),
                      dict(k_ptrs="*i64", v_ptrs="*i64", req_to_token="*i32", req_rows="*i32", keep="*i32",
                           n_keep="*i32"), cfg.num_warps)
    assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx and "bar.sync" in ptx
    assert "ld.global.b16" not in ptx and "st.global.b16" not in ptx and "f64" not in ptx
    print("ok compaction")
""")


def test_kernels_compile_for_h100_with_vector_loads():
    """Compiles for sm90 on the CPU (no GPU needed): key loads and copies must be 16-byte vectors, which
    hinges on the alignment hint for pointers loaded from the k_ptrs / v_ptrs tables."""
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError:
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
    # cwd elsewhere: `python -c` puts cwd first on sys.path, and the repo's sglang_ams/ lacks .kernels
    proc = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tempfile.gettempdir())
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.count("ok") == 4

