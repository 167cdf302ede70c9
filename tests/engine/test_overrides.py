"""Per-request overrides in one batch, batch slack, and where the window attention takes its LSE."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sglang_ams.config import PolicyConfig
from sglang_ams.engine import request_state
from sglang_ams.engine import sglang_compat as compat

from .checks import compacted, step
from .harness import CFG, LAYERS, MARKS, Q_HEADS, DecodeAttention, add_request, forward, make_batch, make_env, tiny_rope

pytestmark = MARKS


def test_mixed_overrides_compact_in_one_step():
    """Streaming (no queries), top-k KeyDiff (keys, no queries), AMS+TOVA and the server default in one batch.
    Regression: a streaming override on a server whose scorer reads attention used to run the attention
    kernel with no queries (fixed by the policy's declared inputs, PolicyConfig.inputs)."""
    env = make_env()
    overrides = {"stream": "streaming", "keydiff": {"policy": "topk", "scorer": "keydiff"},
                 "tova": {"policy": "ams", "scorer": "tova"}, "default": None, "off": "none"}
    reqs = [add_request(env, rid, list(range(2000 + 100 * i, 2046 + 100 * i)), override=o)
            for i, (rid, o) in enumerate(overrides.items())]
    batch = make_batch(env, reqs)
    off_row = env.r2t[compat.pool_idx(reqs[-1])].clone()
    seen = {}
    for _ in range(12):
        for g in step(env, batch).chunks:
            seen.setdefault((g.cfg.policy, g.cfg.scorer), []).extend(it.rid for it in g.requests)
    assert seen == {("streaming", "snapkv"): ["stream"], ("topk", "keydiff"): ["keydiff"],
                    ("ams", "tova"): ["tova"], ("ams", "snapkv"): ["default"]}
    off = reqs[-1]
    assert request_state.existing_state(off) is None and compat.committed_len(off) == 46 + 12
    assert torch.equal(env.r2t[compat.pool_idx(off), :46], off_row[:46])
    assert int(env.rt.pos_offsets[compat.pool_idx(off)]) == 0


def test_needs_attention():
    def needs_attention(cfg):
        return cfg.inputs.runs_attention
    server = PolicyConfig(policy="ams", scorer="tova")
    assert needs_attention(server) and server.inputs.last_row
    assert not needs_attention(server.replace(policy="streaming"))
    assert not needs_attention(server.replace(policy="topk", scorer="keydiff"))
    assert needs_attention(server.replace(policy="topk", scorer="snapkv"))
    assert not needs_attention(server.replace(policy="topk", scorer="expected_attention"))
    assert needs_attention(server.replace(scorer="expected_attention"))     # AMS mass reads attention
    assert not needs_attention(server.replace(scorer="keydiff", use_mass=False))


@pytest.mark.parametrize("slack", [0.0, 0.5])
def test_batch_slack_joins_a_due_request(slack):
    """With slack 0.5 (8 of 16 interval tokens) a request 4 tokens short of its trigger, with a full window,
    compacts in the same step as a request at its trigger; alone it never compacts early. With slack 0 each
    compacts at its own trigger."""
    env = make_env(batch_slack=slack)
    a = add_request(env, "a", list(range(2000, 2030)))      # 30 tokens: trigger 56 at step 27
    b = add_request(env, "b", list(range(3000, 3034)))      # 34 tokens: trigger 56 at step 23
    batch = make_batch(env, [a, b])
    history = {n: compacted(step(env, batch)) for n in range(1, 28)}
    done = {n: c for n, c in history.items() if c}
    if slack:
        assert request_state.existing_state(a).compactions == 1
        assert done == {23: {"b": (56, 40), "a": (52, 40)}}        # a joined 4 tokens early
        assert env.rt.counters.launches == 1
    else:
        assert done == {23: {"b": (56, 40)}, 27: {"a": (56, 40)}}
        assert env.rt.counters.launches == 2


@pytest.mark.parametrize("debug", [False, True])
def test_decode_lse_in_another_convention_is_caught(monkeypatch, debug):
    """An attention kernel reporting its LSE in natural-log units: the first scoring's check catches it; the
    server logs it and recomputes from then on (debug mode raises instead). Selections stay right."""
    real_run = DecodeAttention.run

    def natural_log_run(self, *args, **kwargs):
        out, lse = real_run(self, *args, **kwargs)
        return out, lse * math.log(2.0)
    monkeypatch.setattr(DecodeAttention, "run", natural_log_run)
    env = make_env(debug_checks=debug)
    reqs = [add_request(env, "a", list(range(2000, 2046))), add_request(env, "b", list(range(3000, 3049)))]
    batch = make_batch(env, reqs)
    if debug:
        with pytest.raises(AssertionError, match="differs from the recomputed one"):
            for _ in range(12):
                step(env, batch)
        return
    # check_selection: attention == reference; the check queued at the first compaction settles at the second
    groups = [g for _ in range(30) for g in step(env, batch).chunks]
    assert len(groups) >= 2 and env.rt.decode_lse_ok is False and env.rt.counters.decode_lse_launches == 0


@pytest.mark.parametrize("passed", [True, False])
def test_the_first_decode_lse_check_does_not_wait_for_the_gpu(monkeypatch, passed):
    """Outside debug mode the first comparison is queued behind a CUDA event (faked here) instead of a host sync:
    that step scores from the recomputed rows and the next step settles it and takes the decode LSE. It waits
    for the event only if it has not passed by then (it ran a decode step earlier or more), so which steps use
    the decode LSE does not depend on GPU timing. (`step` checks each chunk's decode_lse and selection.)"""
    from sglang_ams.engine import checks

    class Event:
        ready, waited = passed, False

        def query(self):
            return self.ready

        def synchronize(self):
            self.ready = self.waited = True
    event = Event()
    real_start, started = checks.start_lse_check, []

    def start(*args):
        started.append(1)
        assert env.rt.decode_lse_check is None              # one comparison
        return dataclasses.replace(real_start(*args), done=event)
    monkeypatch.setattr(checks, "start_lse_check", start)
    env = make_env(debug_checks=False)
    reqs = [add_request(env, "a", list(range(2000, 2046))), add_request(env, "b", list(range(3000, 3049)))]
    batch = make_batch(env, reqs)
    seen = []
    for _ in range(200):
        seen += [(c.decode_lse, env.rt.decode_lse_ok) for c in step(env, batch).chunks]
        if len(seen) == 3:
            break
    assert seen == [(False, None), (True, True), (True, True)], seen
    assert len(started) == 1 and event.waited is not passed
    assert env.rt.decode_lse_check is None and env.rt.counters.decode_lse_launches == 2


def test_scoring_lse_recompute():
    """--ams-scoring-lse recompute: the kernel's own LSE pass, no LSE taken from the decode attention."""
    env = make_env(scoring_lse="recompute")
    reqs = [add_request(env, "a", list(range(2000, 2046))), add_request(env, "b", list(range(3000, 3049)))]
    batch = make_batch(env, reqs)
    groups = [g for _ in range(12) for g in step(env, batch).chunks]
    assert groups and not any(g.decode_lse for g in groups) and env.rt.counters.decode_lse_launches == 0
    assert not env.rt.ring.has_lse


def test_triattention_with_stats_runs_without_a_ring(tmp_path):
    """Top-k TriAttention with a stats file declares positions but no queries: the server keeps no query ring, and
    the compactor gives the scorer the window's logical positions from the host lengths (it used to give none, and
    the scorer raised inside the scheduler)."""
    from sglang_ams.scorers.triattention_calib import TriAttentionStats, save_stats
    g = torch.Generator().manual_seed(0)
    freqs = tiny_rope().inv_freq.numel()
    q_mean = torch.complex(*torch.randn(2, LAYERS, Q_HEADS, freqs, generator=g))
    path = str(tmp_path / "stats.pt")
    save_stats(TriAttentionStats(q_mean, q_mean.abs() + 0.1, 1, "neox"), path)
    cfg = CFG.replace(policy="topk", scorer="triattention", triattention_stats=path)
    env = make_env(policy=cfg, scoring_lse="recompute")         # (no ring: the decode LSE is not kept)
    assert env.rt.ring is None and not cfg.needs_queries
    batch = make_batch(env, [add_request(env, "r0", list(range(2000, 2050)))])
    traces = []
    for _ in range(14):
        traces += [c.trace for c in env.compactor.step(batch).chunks]
        batch.prepare_for_decode()
        forward(env, batch)
    (trace,) = traces
    assert trace.inputs.queries is None and trace.inputs.rope is env.rt.rope
    assert trace.inputs.query_pos.tolist() == [list(range(56 - cfg.window, 56))]      # compacts at its cap, length 56
