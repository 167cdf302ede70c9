"""kernels/ring_store.store_queries against a plain PyTorch loop: whole ring tensors are compared after filling them
with a sentinel, so a store to the trash row (row 0), to a wrong layer/row/slot or of an uncast value fails."""
from __future__ import annotations

import pytest
import torch

from sglang_ams.kernels.ring_store import store_queries

L, ROWS, W, HQ, D, SLOTS, B = 3, 3, 4, 4, 8, 8, 5
SENTINEL, LSE_SENTINEL = 123.0, -77.0
ROW_OF = [0, 2, 0, 1, 3, 0, 0, 0]          # req_pool_idx -> ring row
RPI = [1, 0, 4, 5, 3]                      # entries 1 and 3 have no row
POSITIONS = [6, 9, 3, 12, 17]              # slots 2, 1, 3, 0, 1


def ring(dtype, device):
    buf = torch.full((L, ROWS + 1, W, HQ, D), SENTINEL, dtype=dtype, device=device)
    lse = torch.full((L, ROWS + 1, W, HQ), LSE_SENTINEL, dtype=torch.float32, device=device)
    return buf, lse, torch.tensor(ROW_OF, dtype=torch.int64, device=device)


def reference(buf, lse_buf, row_of, layer, q, lse, rpi, positions):
    for b in range(len(rpi)):
        row = int(row_of[rpi[b]])
        if row:
            buf[layer, row, int(positions[b]) % W] = q[b].reshape(HQ, D).to(buf.dtype)
            if lse is not None:
                lse_buf[layer, row, int(positions[b]) % W] = lse[b].float()


def batch(device, idx_dtype, n=B):
    return (torch.tensor(RPI[:n], dtype=idx_dtype, device=device),
            torch.tensor(POSITIONS[:n], dtype=idx_dtype, device=device))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("with_lse", [True, False])
def test_matches_reference(device, dtype, idx_dtype, with_lse):
    g = torch.Generator().manual_seed(0)
    buf, lse_buf, row_of = ring(dtype, device)
    want_buf, want_lse = buf.clone(), lse_buf.clone()
    rpi, positions = batch(device, idx_dtype)
    for layer in (2, 0, 1):
        q = torch.randn(B, HQ * D, generator=g).to(device)                 # fp32: bf16 buffers test the cast
        lse = torch.randn(B, HQ, generator=g).to(device) if with_lse else None
        store_queries(buf, lse_buf, row_of, layer, q, lse, rpi, positions)
        reference(want_buf, want_lse, row_of, layer, q, lse, rpi, positions)
    assert torch.equal(buf, want_buf)
    assert torch.equal(lse_buf, want_lse)                                 # untouched when lse is None
    assert (buf[:, 0] == SENTINEL).all() and (lse_buf[:, 0] == LSE_SENTINEL).all()      # trash row untouched
    if not with_lse:
        assert (lse_buf == LSE_SENTINEL).all()


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_rows_zero_store_nothing(device, idx_dtype):
    buf, lse_buf, row_of = ring(torch.bfloat16, device)
    row_of.zero_()
    rpi, positions = batch(device, idx_dtype)
    store_queries(buf, lse_buf, row_of, 1, torch.zeros(B, HQ, D, device=device),
                  torch.zeros(B, HQ, device=device), rpi, positions)
    assert (buf == SENTINEL).all() and (lse_buf == LSE_SENTINEL).all()


def test_empty_batch_is_noop(device):
    buf, lse_buf, row_of = ring(torch.float32, device)
    rpi, positions = batch(device, torch.int64, n=0)
    store_queries(buf, lse_buf, row_of, 0, torch.zeros(0, HQ * D, device=device),
                  torch.zeros(0, HQ, device=device), rpi, positions)
    assert (buf == SENTINEL).all() and (lse_buf == LSE_SENTINEL).all()


def layouts(g, device):
    """q as [B, Hq*d], [B, Hq, d], a slice of a wider qkv row, and with transposed heads; lse with strides."""
    qkv = torch.randn(B, (HQ + 2) * D, generator=g).to(device)
    yield qkv[:, :HQ * D], torch.randn(HQ, B, generator=g).to(device).t()
    yield qkv[:, :HQ * D].contiguous().view(B, HQ, D), torch.randn(B, 2 * HQ, generator=g).to(device)[:, ::2]
    yield torch.randn(B, D, HQ, generator=g).to(device).transpose(1, 2), torch.randn(B, HQ, generator=g).to(device)
    yield torch.randn(B, HQ * D, generator=g).to(device, torch.float16), torch.randn(B, HQ, generator=g).to(device)


def test_layouts_and_dtypes(device):
    g = torch.Generator().manual_seed(1)
    rpi, positions = batch(device, torch.int32)
    for dtype in (torch.bfloat16, torch.float32):
        for q, lse in layouts(g, device):
            buf, lse_buf, row_of = ring(dtype, device)
            want_buf, want_lse = buf.clone(), lse_buf.clone()
            store_queries(buf, lse_buf, row_of, 1, q, lse, rpi, positions)
            reference(want_buf, want_lse, row_of, 1, q, lse, rpi, positions)
            assert torch.equal(buf, want_buf), (dtype, q.shape, q.stride())
            assert torch.equal(lse_buf, want_lse), lse.stride()


def test_rejects_bad_shapes(device):
    buf, lse_buf, row_of = ring(torch.float32, device)
    rpi, positions = batch(device, torch.int64)
    with pytest.raises(ValueError, match="q"):
        store_queries(buf, lse_buf, row_of, 0, torch.zeros(B, D, HQ, device=device), None, rpi, positions)
    with pytest.raises(ValueError, match="lse"):
        store_queries(buf, lse_buf, row_of, 0, torch.zeros(B, HQ * D, device=device),
                      torch.zeros(B, HQ + 1, device=device), rpi, positions)
    with pytest.raises(ValueError, match="contiguous"):
        store_queries(buf.transpose(3, 4), lse_buf, row_of, 0, torch.zeros(B, HQ * D, device=device), None,
                      rpi, positions)


@pytest.mark.gpu
def test_the_fused_store_is_captured_into_a_cuda_graph_and_replays_with_new_rows():
    """GPU only: captured once with no row lent (as SGLang captures at startup), the graph's replays store for
    exactly the rows lent at replay time, in bf16 as torch's cast rounds, and leave the trash row alone."""
    from sglang_ams.engine.ring import QueryRing
    dev = torch.device("cuda")
    ring = QueryRing(num_layers=2, rows=4, window=8, num_q_heads=32, head_dim=128, req_slots=16,
                     dtype=torch.bfloat16, device=dev)
    ring.compile_store()
    batch = 6
    rpi = torch.arange(1, batch + 1, device=dev, dtype=torch.int32)
    pos = torch.arange(100, 100 + batch, device=dev)
    q = torch.zeros(batch, 32 * 128, device=dev, dtype=torch.float32)
    lse = torch.zeros(batch, 32, device=dev)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for layer in range(2):
            ring.store(layer, q, lse, rpi, pos)
    torch.cuda.synchronize()
    assert ring.buf.eq(0).all() and ring.lse.eq(0).all()             # capture runs nothing
    rows = {2: ring.acquire(2), 5: ring.acquire(5)}                  # lent after the capture
    q.copy_(torch.randn_like(q))
    lse.copy_(torch.randn_like(lse))
    graph.replay()
    torch.cuda.synchronize()
    for idx, row in rows.items():
        b = idx - 1
        for layer in range(2):
            assert torch.equal(ring.buf[layer, row, int(pos[b]) % 8].reshape(-1), q[b].to(torch.bfloat16))
            assert torch.equal(ring.lse[layer, row, int(pos[b]) % 8], lse[b])
    assert ring.buf[:, 0].eq(0).all() and ring.lse[:, 0].eq(0).all()
    assert int(ring.buf.ne(0).any(-1).any(-1).sum()) == 2 * len(rows)  # nothing else written
