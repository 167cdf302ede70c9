"""FlashInfer's decode LSE convention, as the engine relies on it (GPU only): the hook on the decode wrapper returns
the same output as the plain call and stores, next to the ring's queries, log2-sum-exp2 of the scaled logits,
for both decode paths SGLang uses (CUDA cores for GQA < 4, tensor cores for GQA >= 4). The engine also checks the
convention on its first compaction (checks.verify_decode_lse); this test pins it to FlashInfer itself."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("q_heads,kv_heads,head_dim,tensor_cores", [(9, 3, 64, False), (32, 8, 128, True)])
def test_decode_hook_stores_flashinfer_lse_in_log2_units(q_heads, kv_heads, head_dim, tensor_cores):
    flashinfer = pytest.importorskip("flashinfer")
    from sglang_ams.engine import runtime as ams_runtime
    from sglang_ams.engine.ring import QueryRing
    from sglang_ams.engine.settings import EngineSettings
    from sglang_ams.patches import flashinfer_decode as fi_hooks

    dev, dtype = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    lengths = [37, 300, 1025]
    total = sum(lengths)
    k = torch.randn(total + 1, 1, kv_heads, head_dim, device=dev, generator=gen).to(dtype)     # page size 1
    v = torch.randn(total + 1, 1, kv_heads, head_dim, device=dev, generator=gen).to(dtype)
    slots = torch.randperm(total, device=dev, generator=gen).to(torch.int32) + 1                # slot 0 unused
    indptr = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    last_page_len = torch.ones(len(lengths), dtype=torch.int32, device=dev)
    workspace = torch.empty(128 * 2**20, dtype=torch.uint8, device=dev)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=tensor_cores)
    wrapper.plan(indptr, slots, last_page_len, q_heads, kv_heads, head_dim, 1, pos_encoding_mode="NONE",
                 q_data_type=dtype, kv_data_type=dtype)
    q = torch.randn(len(lengths), q_heads, head_dim, device=dev, generator=gen).to(dtype) * 2
    scale = head_dim ** -0.5
    plain = flashinfer.BatchDecodeWithPagedKVCacheWrapper.forward(wrapper, q, (k, v), sm_scale=scale)

    ring = QueryRing(num_layers=1, rows=4, window=4, num_q_heads=q_heads, head_dim=head_dim, req_slots=8,
                     dtype=dtype, device=dev)
    pool_idx = torch.tensor([5, 2, 7], device=dev)
    rows = torch.tensor([ring.acquire(int(i)) for i in pool_idx], device=dev)
    positions = torch.tensor([n - 1 for n in lengths], device=dev)
    ams_runtime.install(SimpleNamespace(ring=ring, settings=EngineSettings()))
    try:
        ring.pending = (0, pool_idx, positions)
        out = fi_hooks.forward_hook(flashinfer.BatchDecodeWithPagedKVCacheWrapper.forward, wrapper, q, (k, v),
                                    sm_scale=scale)
    finally:
        ams_runtime.install(None)
    assert ring.pending is None and torch.equal(out, plain)
    stored = ring.lse[0, rows, positions % 4]                                            # [B, Hq]

    want = []
    for i, n in enumerate(lengths):
        keys = k[slots[indptr[i]:indptr[i + 1]].long(), 0].float()                       # [T, H, d]
        qi = q[i].float().view(kv_heads, q_heads // kv_heads, head_dim)
        logits = torch.einsum("hgd,thd->hgt", qi, keys) * scale
        want.append(torch.logsumexp(logits, -1).reshape(-1) / math.log(2.0))
    torch.testing.assert_close(stored, torch.stack(want), atol=2e-2, rtol=2e-3)


def test_the_queued_lse_check_gives_the_comparison_through_pinned_memory():
    """The first compaction's comparison runs behind a CUDA event into pinned memory (checks.start_lse_check):
    its values are right once the event passes, and a mismatch is seen as one."""
    from sglang_ams.engine import checks
    dev = torch.device("cuda")
    rec = torch.rand(2, 4, 8, 300, device=dev)
    items = [SimpleNamespace(req=SimpleNamespace(rid="r"))]
    for got, close in ((rec + 1e-5, True), (rec * math.log(2.0), False)):
        rt = SimpleNamespace(decode_lse_check=checks.start_lse_check(got, rec, items), decode_lse_ok=None)
        assert rt.decode_lse_check.values.is_pinned() and rt.decode_lse_check.done is not None
        checks.settle_lse_check(rt)
        assert rt.decode_lse_check is None and rt.decode_lse_ok is close
