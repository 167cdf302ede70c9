"""--ams-selection triton in the engine: compaction steps on SGLang's real pools give what the torch selection
gives (the same requests compacted, the same KV left in every slot, the same carried credit), and the warm-up
compiles the kernel for every block a row can get."""
import torch

from sglang_ams.config import PolicyConfig
from sglang_ams.engine import sglang_compat as compat
from sglang_ams.kernels import select_ams as ams_kernel

from .checks import compacted, step
from .harness import MARKS, add_request, make_batch, make_env

pytestmark = MARKS


def _run(selection):
    env = make_env(selection=selection, batch_slack=0.5, ring_rows=2)
    reqs = [add_request(env, rid, list(range(base, base + n)))
            for rid, base, n in (("a", 2000, 44), ("b", 3000, 47), ("c", 4000, 50))]
    batch = make_batch(env, reqs)
    history = [compacted(step(env, batch)) for _ in range(40)]
    slots = [env.r2t[compat.pool_idx(r), :compat.allocated_len(r)].long() for r in reqs]
    kv = [torch.stack([b[s] for b in env.kv_pool.k_buffer + env.kv_pool.v_buffer]) for s in slots]
    credit = [None if r._ams.credit is None else r._ams.credit.clone() for r in reqs]
    return history, kv, credit


def test_the_selection_kernel_compacts_exactly_as_the_torch_selection(monkeypatch):
    calls = []
    real = ams_kernel.select_ams_rows
    monkeypatch.setattr(ams_kernel, "select_ams_rows", lambda *a: calls.append(a[0].shape) or real(*a))
    h1, kv1, c1 = _run("torch")
    assert not calls
    h2, kv2, c2 = _run("triton")
    assert calls, "the kernel never ran"
    assert sum(len(h) for h in h1) >= 4 and h1 == h2
    assert all(torch.equal(a, b) for a, b in zip(kv1, kv2))
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(c1, c2))


def test_warm_up_compiles_each_block_with_and_without_credit(monkeypatch):
    from sglang_ams.engine import warmup
    env = make_env(trace=False, selection="triton")
    monkeypatch.setattr(ams_kernel, "MAX_TOKENS", 64)          # (blocks 16, 32, 64 under the interpreter)
    calls = []
    real = ams_kernel.select_ams_rows

    def recording(scores, evidence, credit, *rest):
        calls.append((scores.shape[-1], credit is not None, evidence is not None))
        return real(scores, evidence, credit, *rest)
    monkeypatch.setattr(ams_kernel, "select_ams_rows", recording)
    assert warmup.warm_up(env.rt) > 0
    assert sorted(calls) == [(b, c, True) for b in (16, 32, 64) for c in (False, True)]
    # A query-free server (top-k by keys, an interval below the window) can run no AMS request: nothing to compile.
    calls.clear()
    env = make_env(trace=False, selection="triton", policy=PolicyConfig(policy="topk", scorer="keydiff", budget=40,
                                                                         interval=4, window=8, sink=4, keep_lastn=8))
    assert warmup.warm_up(env.rt) > 0 and not calls
