"""Every flag set the launcher accepts also starts: the KV-sizing hook (workspace bound, ring and credit
reservations), the runtime on SGLang's real pools, the warm-up, and decode steps up to a compaction. Found this way:
a query-free top-k server with an interval below the window raised while sizing its workspace."""
from types import SimpleNamespace
from unittest import mock

import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from sglang_ams.config import SCORERS, ConfigError, PolicyConfig
from sglang_ams.engine import settings as ams_settings
from sglang_ams.engine import warmup
from sglang_ams.engine.settings import EngineSettings, from_user_values
from sglang_ams.kernels import select_ams as ams_kernel
from sglang_ams.patches import mem_cache

from .checks import step
from .harness import CFG, HEAD_DIM, KV_HEADS, LAYERS, MARKS, Q_HEADS, add_request, make_batch, make_env

pytestmark = MARKS


@st.composite
def flag_sets(draw):
    window = draw(st.integers(1, 12))
    sink, keep_lastn = draw(st.integers(0, 6)), draw(st.integers(0, 12))
    lmin = draw(st.integers(1, 40))
    values = dict(
        kv_policy=draw(st.sampled_from(["topk", "ams", "streaming"])), kv_scorer=draw(st.sampled_from(SCORERS)),
        kv_budget=sink + keep_lastn + draw(st.integers(1, 40)), kv_interval=draw(st.integers(1, 40)),
        ams_window=window, ams_pool_kernel=draw(st.sampled_from([1, 3, 5])), ams_sink=sink,
        ams_keep_lastn=keep_lastn, ams_delta=draw(st.sampled_from([0.02, 0.3, 1.0])), ams_lmin=lmin,
        ams_lmax=lmin + draw(st.integers(0, 60)), ams_qmin=draw(st.integers(0, 10)),
        ams_segmenter=draw(st.sampled_from(["equal_mass", "fixed_length"])), ams_use_credit=draw(st.booleans()),
        ams_use_mass=draw(st.booleans()), ams_prefill_window=draw(st.booleans()),
        ams_scoring_lse=draw(st.sampled_from(["decode", "recompute"])),
        ams_ring_store=draw(st.sampled_from(["torch", "triton"])),
        ams_selection=draw(st.sampled_from(["torch", "triton"])), ams_batch_slack=draw(st.sampled_from([0, 0.5])),
        ams_step_requests=draw(st.sampled_from([0, 1, 2])), ams_workspace_mib=draw(st.sampled_from([0, 4096])),
        ams_ring_rows=draw(st.sampled_from([0, 1])))
    try:
        return from_user_values(values), draw(st.sampled_from([1, 16]))     # what the launcher accepts; page size
    except ConfigError:
        assume(False)


def _size_pool(s: EngineSettings) -> int:
    """The KV-sizing hook as SGLang's model runner calls it (profile_available_bytes): bytes left for the pool."""
    runner = SimpleNamespace(
        model_config=SimpleNamespace(num_key_value_heads=KV_HEADS, num_attention_heads=Q_HEADS, head_dim=HEAD_DIM,
                                     hidden_size=Q_HEADS * HEAD_DIM, context_len=256),
        kv_cache_dtype=torch.bfloat16, server_args=SimpleNamespace(tp_size=1), is_draft_worker=False)
    ams_settings.publish(s)
    try:
        return mem_cache.profile_available_bytes_hook(lambda self: 8 << 30, runner)
    finally:
        ams_settings.publish(None)
        mem_cache._RESERVED.clear()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(flag_sets())
def test_every_accepted_flag_set_starts_and_compacts(case):
    s, page_size = case
    assert 0 < _size_pool(s) < 8 << 30
    env = make_env(policy=s.policy, page_size=page_size, ring_rows=s.ring_rows, batch_slack=s.batch_slack, scoring_lse=s.scoring_lse,
                   step_requests=s.step_requests, ring_store=s.ring_store, selection=s.selection)
    with mock.patch.object(ams_kernel, "MAX_TOKENS", 64):     # (the interpreter is slow on 4096-token blocks)
        assert warmup.warm_up(env.rt) > 0
    reqs = [add_request(env, rid, list(range(base, base + n))) for rid, base, n in (("a", 2000, 30), ("b", 3000, 37))]
    batch = make_batch(env, reqs)
    cap = s.policy.trigger_len(0) + s.policy.lead_tokens + s.slack_tokens(s.policy.interval) + 4
    for _ in range(cap + 8):          # (a prompt past its trigger compacts within its lead)
        if step(env, batch).requests:
            return
    raise AssertionError("no request compacted by its cap")


def _compacts(env, n_steps=60) -> bool:
    reqs = [add_request(env, rid, list(range(base, base + n))) for rid, base, n in (("a", 2000, 44), ("b", 3000, 47))]
    batch = make_batch(env, reqs)
    return any(step(env, batch).requests for _ in range(n_steps))


def test_a_one_query_window_scores_with_the_decode_lse():
    """--ams-window 1: the ring's LSE view has a size-1 last dim whose stride is not 1; scoring refused it (a
    ValueError inside the scheduler at the first compaction)."""
    env = make_env(policy=CFG.replace(window=1, pool_kernel=1), scoring_lse="decode")
    assert _compacts(env) and env.rt.counters.decode_lse_launches > 0


def test_a_query_free_server_with_a_short_interval_starts():
    """--kv-policy topk --kv-scorer keydiff --kv-interval 4 (valid: no queries, so no window to wait for)."""
    s = from_user_values(dict(kv_policy="topk", kv_scorer="keydiff", kv_interval=4, kv_budget=40, ams_sink=4,
                              ams_keep_lastn=8))
    assert 0 < _size_pool(s) < 8 << 30
    assert _compacts(make_env(policy=s.policy))
