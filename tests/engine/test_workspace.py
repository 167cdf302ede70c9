"""The compaction workspace: chunked steps equal one launch, the step's peak stays inside the bound, warm-up."""
from __future__ import annotations

import pytest
import torch
from sglang.srt.managers.schedule_batch import ScheduleBatch

from sglang_ams.engine import request_state, workspace

from .checks import free_slots
from .harness import CFG, KV_HEADS, LAYERS, MARKS, Env, add_request, cfg_override, forward, make_batch, make_env

pytestmark = MARKS


def _three_due(env: Env, override=None) -> ScheduleBatch:
    """Three requests of different lengths that all reach their trigger within a few steps (cap 56)."""
    reqs = [add_request(env, f"r{i}", list(range(5000 + 100 * i, 5000 + 100 * i + n)), override=override)
            for i, n in enumerate((47, 80, 120))]
    return make_batch(env, reqs)


def _until_compacted(env: Env, batch: ScheduleBatch, steps: int = 14) -> int:
    """The scheduler loop without the per-group checks (a request split by layers runs several chunks)."""
    done = 0
    for _ in range(steps):
        done += len(env.compactor.step(batch).requests)
        batch.prepare_for_decode()
        forward(env, batch)
    return done


@pytest.mark.parametrize("policy, scorer", [("ams", "snapkv"), ("topk", "keydiff"), ("ams", "tova")])
def test_chunked_compaction_equals_one_launch(policy, scorer):
    """A bound so small that every request runs alone, one layer at a time, leaves the pool, the rows, the
    lengths and the request states exactly as one launch over the whole group does."""
    cfg = CFG.replace(policy=policy, scorer=scorer)
    envs = []
    for bound in (None, "one-layer"):
        env = make_env(trace=False, policy=CFG.replace(delta=0.02), seed=5)
        batch = _three_due(env, cfg_override(cfg))
        cfg = CFG.replace(delta=0.02, policy=policy, scorer=scorer)         # what the requests run under
        if bound:
            cost = env.compactor.chunk_cost(cfg)
            env.rt.set_workspace(cost.bytes(1, 1, 130))         # the longest request compacts at ~130 tokens
            assert len(workspace.plan_chunks([100, 120], LAYERS, cost, env.rt.workspace_bytes)) == 2 * LAYERS
        assert _until_compacted(env, batch) >= 3
        envs.append((env, batch))
    (a, ba), (b, bb) = envs
    for x, y in zip(a.kv_pool.k_buffer + a.kv_pool.v_buffer, b.kv_pool.k_buffer + b.kv_pool.v_buffer):
        assert torch.equal(x, y)
    assert torch.equal(a.r2t, b.r2t) and torch.equal(ba.seq_lens, bb.seq_lens)
    for ra, rb in zip(ba.reqs, bb.reqs):
        sa, sb = request_state.existing_state(ra), request_state.existing_state(rb)
        assert (sa.pos_offset, sa.compactions) == (sb.pos_offset, sb.compactions)
        assert (sa.credit is None) == (sb.credit is None)
        if sa.credit is not None:
            assert torch.equal(sa.credit, sb.credit)


@pytest.mark.parametrize("policy, scorer", [("ams", "snapkv"), ("ams", "keydiff"), ("topk", "expected_attention"),
                                            ("topk", "triattention"), ("streaming", "streaming"), ("ams", "random")])
def test_step_peak_stays_inside_the_bound(live_bytes, policy, scorer):
    """The memory a compaction step really allocates (every tensor it creates, counted at the ATen level) stays
    under the bound the planner cut the group for, here one request with all layers."""
    cfg = CFG.replace(policy=policy, scorer=scorer)
    env = make_env(trace=False, policy=CFG, seed=2)
    reqs = [add_request(env, f"r{i}", list(range(6000 + 300 * i, 6000 + 300 * i + n)), override=cfg_override(cfg))
            for i, n in enumerate((150, 200, 230))]
    batch = make_batch(env, reqs)
    cost = env.compactor.chunk_cost(cfg)
    env.rt.set_workspace(cost.bytes(1, LAYERS, 240))
    peaks = []
    for _ in range(14):
        due = env.compactor.due_requests(batch)
        with live_bytes() as mem:
            report = env.compactor.step(batch)
        if report:
            chunks = env.compactor.chunks(due)
            assert len(chunks) == len(report.chunks) == len(report.requests)     # one request per chunk here
            peaks.append(mem.peak)
        batch.prepare_for_decode()
        forward(env, batch)
    assert peaks and max(peaks) <= env.rt.workspace_bytes, (peaks, env.rt.workspace_bytes)
    assert max(peaks) > env.rt.workspace_bytes / 20          # the model is not absurdly loose either

def test_warm_up_runs_every_variant_and_touches_only_the_dummy_slot(monkeypatch):
    from sglang_ams.engine import warmup
    env = make_env(trace=False)
    before = [b.clone() for b in env.kv_pool.k_buffer + env.kv_pool.v_buffer]
    free = free_slots(env)
    calls = []
    real = warmup.window_attention_pool

    def recording(*args, **kwargs):
        calls.append((kwargs["want_last_row"], kwargs.get("row_lse") is not None, kwargs["num_splits"]))
        return real(*args, **kwargs)
    monkeypatch.setattr(warmup, "window_attention_pool", recording)
    assert warmup.warm_up(env.rt) > 0
    most = warmup.default_num_splits(KV_HEADS, env.r2t.shape[1], env.rt.device)
    splits = [1 << i for i in range(most.bit_length())]
    assert sorted(calls) == sorted([(last, True, 1) for last in (False, True)]
                                   + [(last, False, s) for last in (False, True) for s in splits])
    for b, old in zip(env.kv_pool.k_buffer + env.kv_pool.v_buffer, before):
        assert torch.equal(b[1:], old[1:]), "warm-up wrote a slot other than the dummy slot 0"
    assert free_slots(env) == free
