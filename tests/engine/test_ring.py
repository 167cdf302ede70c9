"""The query ring: rows taken, waited for and released; prompt tails; window order."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sglang_ams.engine import request_state
from sglang_ams.engine import runtime as ams_runtime
from sglang_ams.engine import sglang_compat as compat
from sglang_ams.patches import prefill_window as pw_hooks

from .checks import compacted, step
from .harness import MARKS, add_request, make_batch, make_env

pytestmark = MARKS


def test_ring_rows_wait_and_release():
    """One ring row for two requests: the second waits (ring_waits grows), then compacts `window` queries
    after it finally gets the row, never earlier."""
    env = make_env(ring_rows=1)
    ring = env.rt.ring
    a = add_request(env, "a", list(range(2000, 2046)))    # cap 56, reaches cap - window (48) at step 3
    b = add_request(env, "b", list(range(3000, 3047)))    # one token ahead: finds the ring taken
    batch = make_batch(env, [a, b])
    sa, sb = (lambda: request_state.existing_state(a)), (lambda: request_state.existing_state(b))
    history = []
    for n in range(1, 21):
        done = compacted(step(env, batch))
        history.append(done)
        if n == 2:
            assert sa().ring_row == 0 and ring.free_rows == 1          # below cap - window: no row yet
        if n == 3:
            assert sa().ring_row and sa().ring_start == 48 and sb().ring_row == 0 and ring.free_rows == 0
        if n == 9:
            assert env.rt.counters.ring_waits == 0                     # b not at its cap yet: not a wait
        if n == 10:
            assert env.rt.counters.ring_waits == 1                     # b at 56 with no row
        if n == 11:
            assert done == {"a": (56, 40)} and sa().ring_row == 0 and env.rt.counters.ring_waits == 2
            assert ring.free_rows == 1 and int(ring.row_of[compat.pool_idx(a)]) == 0
        if n == 12:
            assert sb().ring_row and sb().ring_start == 58             # b took the released row at 58
        if 12 <= n < 20:
            assert sb().compactions == 0                               # past cap, but fewer than 8 queries
    assert history[19] == {"b": (66, 40)}
    assert sb().ring_row == 0 and sb().pos_offset == 26
    assert env.rt.counters.ring_waits == 2


def test_prompt_tail_of_short_and_long_extends():
    """The last min(W, extend) tokens of each request go to its row at position % W; the rest to the trash row."""
    ring = ams_runtime.ring_mod.QueryRing(num_layers=1, rows=2, window=4, num_q_heads=1, head_dim=1, req_slots=4,
                                          dtype=torch.float32, device="cpu")
    r3, r1 = ring.acquire(3), ring.acquire(1)
    # Request 3 extends positions 5..7 (3 tokens < W), request 1 positions 0..9.
    positions = torch.cat([torch.arange(5, 8), torch.arange(0, 10)])
    fb = SimpleNamespace(extend_start_loc=torch.tensor([0, 3], dtype=torch.int32),
                         extend_seq_lens=torch.tensor([3, 10], dtype=torch.int32), req_pool_indices=torch.tensor([3, 1]))
    idx, owners, valid = pw_hooks.prompt_tail(fb, 4)
    assert idx.tolist() == [[0, 0, 1, 2], [9, 10, 11, 12]] and valid.tolist() == [[False, True, True, True], [True] * 4]
    assert pw_hooks.prompt_tail(fb, 4) is pw_hooks.prompt_tail(fb, 4)            # once per forward batch
    q = (100 + positions).float().view(-1, 1)          # a query's value tells its position
    ring.write_tail(0, q, idx, owners, valid, positions)
    got = ring.buf[0, :, :, 0, 0]
    assert got[r3].tolist() == [0.0, 105.0, 106.0, 107.0]                            # slot 0 never written
    assert got[r1].tolist() == [108.0, 109.0, 106.0, 107.0]                          # positions 6..9 by slot
    assert int(ring.row_of[3]) == r3 and int(ring.row_of[1]) == r1


def test_ring_rows_are_located_once_per_forward_and_again_at_layer_0():
    """Layers after the first reuse the rows found at layer 0 for the same batch tensors; layer 0 looks them up
    again even for the same tensors (a CUDA-graph warm-up and its capture share them)."""
    ring = ams_runtime.ring_mod.QueryRing(num_layers=2, rows=2, window=4, num_q_heads=1, head_dim=1, req_slots=4,
                                          dtype=torch.float32, device="cpu")
    reqs, pos = torch.tensor([3]), torch.tensor([5])
    row = ring.acquire(3)
    for layer in (0, 1):
        ring.write(layer, torch.tensor([[1.0]]), reqs, pos)
        ring.write_lse(layer, torch.tensor([[2.0]]), reqs, pos)
    assert ring.buf[:, row, 1, 0, 0].tolist() == [1.0, 1.0] and ring.lse[:, row, 1, 0].tolist() == [2.0, 2.0]
    ring.release_many([3], [row])                             # the scheduler took the row back between two forwards
    for layer in (0, 1):
        ring.write(layer, torch.tensor([[7.0]]), reqs, pos)
    assert ring.buf[:, row, 1, 0, 0].tolist() == [1.0, 1.0] and ring.buf[:, 0, 1, 0, 0].tolist() == [7.0, 7.0]


def test_ring_window_order():
    """Queries come back oldest first whatever slot the window starts at; row 0 is the trash row."""
    ring = ams_runtime.ring_mod.QueryRing(num_layers=1, rows=2, window=4, num_q_heads=1, head_dim=2, req_slots=4,
                                          dtype=torch.float32, device="cpu")
    row = ring.acquire(3)
    for pos in range(10, 17):     # 7 writes into 4 slots: the last four survive
        ring.write(0, torch.full((2, 2), float(pos)), torch.tensor([3, 1]), torch.tensor([pos, pos]))
    q, pos = ring.window_queries(torch.tensor([row]), torch.tensor([16]))
    assert pos.tolist() == [[13, 14, 15, 16]]
    assert q[0, 0, 0, :, 0].tolist() == [13.0, 14.0, 15.0, 16.0]
    unused = 3 - row                  # rows are 1 and 2
    assert int(ring.row_of[1]) == 0 and ring.buf[0, 0].ne(0).all()    # req 1 has no row: the trash row
    assert ring.buf[0, row].ne(0).all() and ring.buf[0, unused].eq(0).all()
    ring.release_many([3], [row])
    assert ring.free_rows == 2 and int(ring.row_of[3]) == 0


def _decode_layers(ring, layers: int, reqs: torch.Tensor, pos: torch.Tensor, value: float) -> list:
    """One decode forward through the RadixAttention and FlashInfer hooks; returns what each layer's attention
    was asked for ("lse" or "plain")."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_ams.patches import flashinfer_decode as fi_hooks
    from sglang_ams.patches import radix_attention as attn_hooks
    fb = SimpleNamespace(forward_mode=ForwardMode.DECODE, req_pool_indices=reqs, positions=pos)
    asked = []

    class Wrapper:
        def run(self, q, paged_kv_cache, **kwargs):
            asked.append("lse")
            return q, torch.full((q.shape[0], 1), value + 0.5)

    def plain(*args, **kwargs):
        asked.append("plain")
        return args[1]
    def attend(layer_q, *args, **kwargs):       # SGLang's backend hands FlashInfer the same queries
        return fi_hooks.forward_hook(plain, Wrapper(), layer_q, None)
    for layer in range(layers):
        q = torch.full((len(reqs), 1), value)
        attn_hooks.forward_hook(lambda _self, q, *a, **k: attend(q), SimpleNamespace(layer_id=layer), q, None, None,
                                fb)
    return asked


@pytest.mark.parametrize("store", ["torch", "triton"])
def test_an_eager_decode_with_no_row_lent_stores_nothing_but_a_graph_capture_always_does(monkeypatch, store):
    """With no ring row lent, an eager decode forward leaves the ring alone and asks the attention for no LSE
    (every store would hit the trash row); once a row is lent every layer stores again, and a CUDA-graph capture
    stores whatever is lent, since its replays serve later batches (the fused store skips the trash row there
    too)."""
    from sglang_ams.engine import ring as ring_mod
    ring = ring_mod.QueryRing(num_layers=2, rows=2, window=4, num_q_heads=1, head_dim=1, req_slots=4,
                              dtype=torch.float32, device="cpu")
    ams_runtime.install(SimpleNamespace(ring=ring, settings=SimpleNamespace(scoring_lse="decode", ring_store=store),
                                        shape=SimpleNamespace(start_layer=0)))
    reqs, pos = torch.tensor([3, 1]), torch.tensor([5, 9])
    try:
        assert _decode_layers(ring, 2, reqs, pos, 1.0) == ["plain", "plain"]
        assert ring.buf.eq(0).all() and ring.lse.eq(0).all() and not ring.lse_layers
        row = ring.acquire(3)
        assert _decode_layers(ring, 2, reqs, pos, 2.0) == ["lse", "lse"]
        assert ring.buf[:, row, 1, 0, 0].tolist() == [2.0, 2.0] and ring.lse[:, row, 1, 0].tolist() == [2.5, 2.5]
        ring.release_many([3], [row])
        monkeypatch.setattr(ring_mod, "capturing", lambda t: True)
        assert _decode_layers(ring, 2, reqs, pos, 3.0) == ["lse", "lse"]
        trash = [3.0, 3.0] if store == "torch" else [0.0, 0.0]           # as a replay would
        assert ring.buf[:, 0, 1, 0, 0].tolist() == trash and ring.buf[:, row].eq(2.0).sum() == 2
    finally:
        ams_runtime.install(None)


@pytest.mark.parametrize("scoring_lse", ["decode", "recompute"])
def test_the_fused_ring_store_compacts_exactly_as_the_torch_stores(scoring_lse):
    """--ams-ring-store triton: the same ring contents for every row lent, so the same selections, and the
    same decode LSE, whichever way the queries went in (checks.step verifies each selection against the
    reference from the queries the harness generated)."""
    runs = {}
    for store in ("torch", "triton"):
        env = make_env(ring_store=store, scoring_lse=scoring_lse, ring_rows=2)
        reqs = [add_request(env, rid, list(range(base, base + n)))
                for rid, base, n in (("a", 2000, 44), ("b", 3000, 47), ("c", 4000, 50))]
        batch = make_batch(env, reqs)
        history = [compacted(step(env, batch)) for _ in range(30)]
        rows = [r for r in range(1, env.rt.ring.rows + 1)]
        runs[store] = (history, env.rt.ring.buf[:, rows].clone(), env.rt.ring.lse[:, rows].clone(),
                       sorted(env.rt.ring.lse_layers), env.rt.counters.decode_lse_launches)
    (h1, b1, l1, s1, n1), (h2, b2, l2, s2, n2) = runs["torch"], runs["triton"]
    assert sum(len(h) for h in h1) >= 4 and h1 == h2
    assert torch.equal(b1, b2) and torch.equal(l1, l2) and s1 == s2 and n1 == n2
    assert (n1 > 0) == (scoring_lse == "decode")
