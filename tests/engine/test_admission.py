"""Admission: the arithmetic, the KV a request holds before its first compaction, and the scheduler hooks."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
from sglang.srt.managers.schedule_batch import ScheduleBatch

from sglang_ams.config import PolicyConfig
from sglang_ams.engine import admission
from sglang_ams.engine import sglang_compat as compat
from sglang_ams.patches import schedule_policy as policy_hooks

from .harness import CFG, MARKS, SHARED, add_request, cache_prefix, forward, make_batch, make_env

pytestmark = MARKS


def test_admission_arithmetic():
    ams = PolicyConfig(policy="ams", budget=1024, interval=512, window=8)
    stream = PolicyConfig(policy="streaming", budget=1024, interval=512)
    assert ams.trigger_len(0) == 1536 and ams.trigger_len(256) == 1792
    assert ams.kept_len(256) == 1280 and ams.pinned_len(0) == ams.sink and ams.pinned_len(256) == 256
    # Lead past the trigger: MIN_DECODE_STEPS before the first ring row, then a full window of queries.
    assert ams.lead_tokens == 8 + 2 and stream.lead_tokens == 2 == PolicyConfig.MIN_DECODE_STEPS
    assert admission.admission_new_tokens(1000, 0, 4000, ams) == 536           # grows to the cap
    assert admission.admission_new_tokens(1000, 256, 4000, ams) == 792         # pinned prefix is extra
    assert admission.admission_new_tokens(1000, 0, 100, ams) == 100            # finishes first
    assert admission.admission_new_tokens(2000, 0, 4000, ams) == 10            # prompt past the cap: the lead
    assert admission.admission_new_tokens(2000, 0, 4000, stream) == 2
    assert admission.admission_new_tokens(2000, 0, 0, ams) == 0
    assert admission.running_reservation(1500, 0, ams) == 36
    assert admission.running_reservation(1530, 0, ams) == 10
    assert admission.running_reservation(1600, 0, stream) == 2
    # Under pacing a request that can become ready only past the cap (within a lead of it) may wait
    # `overdue_wait` more tokens, and that is reserved; further below nothing changes (pacing compacts those by
    # their trigger).
    assert admission.admission_new_tokens(2000, 0, 4000, ams, 256) == 266
    assert admission.admission_new_tokens(1530, 0, 4000, ams, 256) == 266
    assert admission.admission_new_tokens(1526, 0, 4000, ams, 256) == 10
    assert admission.admission_new_tokens(1000, 0, 4000, ams, 256) == 536
    assert admission.running_reservation(1600, 0, ams, 256) == 266
    assert admission.running_reservation(1530, 0, ams, 256) == 266
    assert admission.running_reservation(1500, 0, ams, 256) == 36


@pytest.mark.parametrize("step_requests", [0, 1])   # without and with pacing (its overdue wait)
@pytest.mark.parametrize("policy", ["ams", "streaming"])
@pytest.mark.parametrize("prompt", [30, 50, 60])    # below cap - window, between, past the cap (cap 56)
def test_admission_bounds_what_requests_hold(policy, prompt, step_requests):
    """Drive the real loop: the most KV a request holds before its first compaction is exactly its prompt plus
    what admission reserves, and the running reservation bounds what is left at every step."""
    cfg = CFG.replace(policy=policy)
    # server ams (query ring); the request overrides it. With pacing, a batch slack of 8 tokens: the overdue wait
    env = make_env(policy=CFG, step_requests=step_requests, batch_slack=0.5 if step_requests else 0.0)
    wait = env.rt.settings.overdue_wait(cfg.interval)
    assert wait == (8 if step_requests else 0)
    req = add_request(env, "r", list(range(2000, 2000 + prompt)), override={"policy": policy})
    batch = make_batch(env, [req])
    lengths = []
    while not env.compactor.due_requests(batch):     # the trigger Compactor.step acts on (no kernels needed)
        lengths.append(compat.committed_len(req))
        batch.prepare_for_decode()
        forward(env, batch)
    peak = compat.committed_len(req)
    assert peak - prompt == admission.admission_new_tokens(prompt, 0, 4096, cfg, wait)
    for length in lengths:
        assert peak - length <= admission.running_reservation(length, 0, cfg, wait)


def test_admission_hooks():
    """PrefillAdder (real) counts a policy request's cap, not its max_new_tokens; add_one_req sees the clamp."""
    from sglang.srt.managers.schedule_policy import PrefillAdder
    env = make_env(trace=False, policy=CFG)
    cache_prefix(env, SHARED)
    running = add_request(env, "running", list(range(2000, 2040)))           # committed 40, cap 56
    pinned = add_request(env, "pinned", SHARED + list(range(5000, 5032)), pinned=32)   # 64 of cap 32 + 56
    off = add_request(env, "off", list(range(3000, 3040)), override="none")
    batch = ScheduleBatch(reqs=[running, pinned, off])
    real = PrefillAdder._get_running_request_total_token_offset
    try:
        PrefillAdder._get_running_request_total_token_offset = \
            lambda self, req: policy_hooks.running_offset_hook(real, self, req)
        adder = PrefillAdder(1, env.tree, env.allocator, batch, 1.0, 10_000, None)
    finally:
        PrefillAdder._get_running_request_total_token_offset = real
    assert compat.reserved_for_running(adder) == (56 - 40) + (88 - 64) + 4096     # policy off: upstream's count

    seen = []
    waiting = add_request(env, "waiting", list(range(4000, 4030)))
    assert compat.prefix_len(waiting) == 0
    policy_hooks.add_one_req_hook(lambda self, req: seen.append(req.sampling_params.max_new_tokens), None, waiting)
    assert seen == [56 - 30] and waiting.sampling_params.max_new_tokens == 4096    # restored afterwards
    # --ams-prompt-cache cached: the prompt will be tree-owned (pinned), so the cap starts after it.
    env.rt.settings = dataclasses.replace(env.rt.settings, prompt_cache="cached")
    policy_hooks.add_chunked_req_hook(lambda self, req: seen.append(req.sampling_params.max_new_tokens), None, waiting)
    assert seen[-1] == 30 + 56 - 30

    scheduler = SimpleNamespace(max_new_tokens_limit=None, max_req_len=1000)
    waiting.sampling_params.max_new_tokens = 5000
    policy_hooks.init_req_max_new_tokens_hook(lambda self, req: setattr(req.sampling_params, "max_new_tokens", 10),
                                              scheduler, waiting)
    assert waiting.sampling_params.max_new_tokens == 1000 - 30 - 1     # context length bounds it, not the pool
