"""kernels/select_ams.py against the torch selection (selection.select_ams): the same indices, carried credit and
segment ids, bit for bit, over random batches and the inputs that stress its exact steps (ties of scores and of
segment masses, NaN / inf, rows without mass, floors that do not fit, one-token segments). On the CPU the kernel
runs under the Triton interpreter; the `gpu` test repeats the comparison at Llama-3-8B chunk shapes."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sglang_ams.config import PolicyConfig
from sglang_ams.kernels import select_ams as ams_kernel
from sglang_ams.selection import select_ams


def _inputs(seed, n, nl, h, t, lengths, pinned, *, special=False, credit=True, evidence=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, nl, h, t, generator=g)
    ev = torch.rand(n, nl, h, t, generator=g) ** 4 if evidence else None
    cr = torch.rand(n, nl, h, t, generator=g) / t if credit else None
    if special:     # ties, non-finite values, a row with no mass, bf16 scores
        scores = (scores * 2).round() / 2
        scores[scores > 2] = float("nan")
        scores[scores < -2] = float("-inf")
        scores[scores == 2] = float("inf")
        scores = scores.bfloat16()
        if ev is not None:
            ev = (ev * 4).round() / 4
            ev[0, 0] = 0.0
            ev[ev > 0.9] = float("nan")
        if cr is not None:
            cr[cr > 0.9 / t] = float("inf")
    to = dict(device=device)
    return (scores.to(**to), None if ev is None else ev.to(**to), None if cr is None else cr.to(**to),
            torch.tensor(lengths, **to), torch.tensor(pinned, **to))


def _assert_same(cfg, scores, ev, cr, lengths, pinned, keeps, k_max=None):
    ref = select_ams(scores, ev, lengths, pinned, keeps, cfg, cr, k_max)
    got = select_ams(scores, ev, lengths, pinned, keeps, cfg, cr, k_max, kernel=True)
    assert torch.equal(got.n_keep, ref.n_keep)
    assert torch.equal(got.indices, ref.indices), (got.indices != ref.indices).nonzero()[:5].tolist()
    assert torch.equal(got.segment_ids, ref.segment_ids)
    assert (got.credit is None) == (ref.credit is None)
    if ref.credit is not None:
        assert torch.equal(got.credit, ref.credit)


@st.composite
def cases(draw):
    n = draw(st.integers(1, 3))
    keep_lastn = draw(st.integers(0, 12))
    t = draw(st.integers(keep_lastn + 2, 140))
    rows = []
    for i in range(n):
        length = t if i == 0 else draw(st.integers(keep_lastn + 2, t))
        pinned = draw(st.integers(0, min(10, length - keep_lastn - 1)))
        keep = draw(st.integers(pinned + keep_lastn + 1, length + 10))
        rows.append((length, pinned, keep))
    cfg = PolicyConfig(
        policy="ams", budget=keep_lastn + 8, interval=64, window=8, keep_lastn=keep_lastn, sink=0,
        delta=draw(st.sampled_from([0.01, 0.05, 0.2, 1.0])), lmin=draw(st.integers(1, 16)),
        qmin=draw(st.integers(0, 24)), segmenter=draw(st.sampled_from(["equal_mass", "fixed_length"])),
        use_credit=draw(st.booleans()), use_mass=draw(st.booleans()),
        credit_decay=draw(st.sampled_from([0.0, 0.8, 1.0])), mass_mix=draw(st.sampled_from([0.0, 0.7, 1.0])))
    cfg = cfg.replace(lmax=draw(st.integers(max(2, 2 * cfg.lmin), 200)))
    return cfg, t, rows, draw(st.integers(0, 2**16)), draw(st.booleans()), draw(st.booleans()), \
        draw(st.booleans()), draw(st.sampled_from([None, "max"]))


@settings(max_examples=40, deadline=None)
@given(cases())
def test_kernel_selects_what_the_torch_path_selects(case):
    cfg, t, rows, seed, special, credit, evidence, k_max = case
    lengths, pinned, keeps = zip(*rows)
    heads = 2 if len(rows) < 3 else 1
    scores, ev, cr, lengths, pinned = _inputs(seed, len(rows), 1, heads, t, lengths, pinned, special=special,
                                              credit=credit, evidence=evidence or cfg.use_mass)
    keeps = torch.tensor(keeps)
    _assert_same(cfg, scores, ev, cr, lengths, pinned, keeps,
                 None if k_max is None else int(torch.minimum(keeps, lengths).max()))


def test_equal_masses_and_scores_break_ties_alike():
    """Uniform evidence and constant scores: every segment has the same mass and every token the same score, so
    both the D'Hondt shares and the in-segment order are decided by the tie rules alone."""
    t = 120
    cfg = PolicyConfig(policy="ams", budget=40, interval=64, window=8, keep_lastn=8, sink=0, delta=0.1, lmin=4,
                       lmax=16, qmin=3)
    ones = torch.ones(2, 1, 2, t)
    lengths, pinned, keeps = torch.tensor([t, 101]), torch.tensor([4, 0]), torch.tensor([47, 30])
    for credit in (None, ones / t):
        _assert_same(cfg, ones.clone(), ones.clone(), credit, lengths, pinned, keeps)


def test_floors_that_do_not_fit_and_everything_kept():
    t = 90
    cfg = PolicyConfig(policy="ams", budget=12, interval=64, window=8, keep_lastn=4, sink=0, delta=0.01, lmin=1,
                       lmax=2, qmin=8)
    scores, ev, cr, lengths, pinned = _inputs(3, 3, 2, 2, t, [t, 60, 9], [2, 0, 5])
    _assert_same(cfg, scores, ev, cr, lengths, pinned, torch.tensor([12, 70, 9]))


def test_floors_that_exactly_fill_the_budget():
    """keep_c == the sum of the floors, with segments shorter than qmin: the full floor still applies (the
    boundary of the rule that shrinks the floors)."""
    t, pinned, recent = 90, 2, 4
    cfg = PolicyConfig(policy="ams", budget=12, interval=64, window=8, keep_lastn=recent, sink=0, delta=0.05, lmin=1,
                       lmax=5, qmin=4)
    scores, ev, cr, lengths, pins = _inputs(11, 1, 1, 1, t, [t], [pinned])
    seg = select_ams(scores, ev, lengths, pins, torch.tensor([t]), cfg, cr).segment_ids[0, 0, 0]
    lens = torch.bincount(seg[seg >= 0])
    assert (lens < cfg.qmin).any()
    floors = int(lens.clamp(max=cfg.qmin).sum())
    for keep_c in (floors - 1, floors, floors + 1):
        _assert_same(cfg, scores, ev, cr, lengths, pins, torch.tensor([keep_c + pinned + recent]))


def test_rows_past_the_kernel_take_the_torch_path(monkeypatch):
    def kernel_used(*args):
        raise AssertionError("kernel used")
    monkeypatch.setattr(ams_kernel, "select_ams_rows", kernel_used)
    cfg = PolicyConfig(policy="ams", budget=40)
    scores, ev, cr, lengths, pinned = _inputs(0, 1, 1, 1, ams_kernel.MAX_TOKENS + 1, [ams_kernel.MAX_TOKENS + 1], [4])
    sel = select_ams(scores, ev, lengths, pinned, torch.tensor([40]), cfg, cr, kernel=True)
    assert int((sel.indices >= 0).sum()) == 40


def test_block_padding_does_not_change_the_result(monkeypatch):
    """A row padded to a larger block (as a GPU pads to 512) selects the same."""
    cfg = PolicyConfig(policy="ams", budget=40, delta=0.05, lmin=4, lmax=24, qmin=2)
    scores, ev, cr, lengths, pinned = _inputs(5, 2, 1, 1, 70, [70, 52], [4, 4])
    keeps = torch.tensor([44, 44])
    small = select_ams(scores, ev, lengths, pinned, keeps, cfg, cr, kernel=True)
    monkeypatch.setattr(ams_kernel, "block_for", lambda tokens, device: 256)
    large = select_ams(scores, ev, lengths, pinned, keeps, cfg, cr, kernel=True)
    assert torch.equal(small.indices, large.indices) and torch.equal(small.credit, large.credit)
    assert torch.equal(small.segment_ids, large.segment_ids)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1536, 2048, 4096])
@pytest.mark.parametrize("special", [False, True])
def test_kernel_on_the_gpu_at_llama_chunk_shapes(t, special):
    """8 requests x 32 layers x 8 KV heads, AMS defaults at budget 1024 (what a paced decode-time step holds)."""
    cfg = PolicyConfig(policy="ams", budget=1024)
    lengths = [t - 37 * i for i in range(8)]
    scores, ev, cr, lengths, pinned = _inputs(t, 8, 32, 8, t, lengths, [4] * 8, special=special, device="cuda")
    keeps = torch.full((8,), 1024, device="cuda")
    _assert_same(cfg, scores, ev, cr, lengths, pinned, keeps, k_max=1024)
    _assert_same(cfg, scores, ev, None, lengths, pinned, keeps, k_max=1024)


_HOPPER = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sglang_ams.kernels import select_ams as K
ptr = {n: t for n, t in zip(("scores", "evidence", "credit", "lengths", "pinned", "keep", "out_idx", "out_credit",
                             "out_sid"), ("*fp32", "*fp32", "*fp32", "*i64", "*i64", "*i64", "*i64", "*fp32", "*i64"))}
ints = {n: "i32" for n in ("T", "K", "rows_per_req", "keep_lastn", "lmin", "lmax", "qmin", "n_max")}
bits = {n: "i64" for n in ("decay", "one_minus_decay", "mix", "one_minus_mix", "inv_delta")}
flags = ("HAS_EVIDENCE", "HAS_CREDIT", "USE_CREDIT", "USE_MASS", "EQUAL_MASS")
out = []
blocks = json.loads(sys.argv[1])
# every block with every input; the smallest also with each branch off (no evidence and no mass, no carried credit,
# no credit, fixed-length segments)
variants = [(b, {}) for b in blocks] + [(blocks[0], off) for off in (
    {"HAS_EVIDENCE": False, "USE_MASS": False}, {"HAS_CREDIT": False}, {"USE_CREDIT": False, "HAS_CREDIT": False},
    {"EQUAL_MASS": False})]
for block, off in variants:
    const = {"BLOCK": block, "POS_BITS": block.bit_length() - 1, **{f: True for f in flags}, **off}
    sig = {**ptr, **ints, "delta32": "fp32", **bits, **{c: "constexpr" for c in const}}
    k = triton.compile(ASTSource(fn=K._select_kernel, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": K._warps(block), "enable_fp_fusion": False, "enable_reflect_ftz": False})
    out.append({"block": block, "shared": k.metadata.shared, "cubin": len(k.asm["cubin"])})
print(json.dumps(out))
'''


def test_the_kernel_compiles_for_hopper():
    """Every block the wrapper can launch on a GPU (and each constexpr branch) compiles for sm_90 (H100 / H200)
    with the warps it picks, and fits a block's shared memory: Triton compiles for a GPU target without one (ptxas
    ships with it). The interpreter runs none of that, so this is what catches a GPU-only compile error here."""
    import json
    import os
    import subprocess
    import sys
    import torch as _torch
    blocks = []
    block = ams_kernel.block_for(1, _torch.device("cuda"))
    while block <= ams_kernel.MAX_TOKENS:
        blocks.append(block)
        block *= 2
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _HOPPER, json.dumps(blocks)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["block"] for r in results] == blocks + [512] * 4 and blocks == [512, 1024, 2048, 4096]
    assert all(0 < r["shared"] <= 227 * 1024 and r["cubin"] > 0 for r in results), results
