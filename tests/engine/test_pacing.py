"""--ams-step-requests: a batch that reaches its triggers together compacts over several short steps."""
from __future__ import annotations

import random

import pytest

from sglang_ams.engine import admission, request_state
from sglang_ams.engine import sglang_compat as compat
from sglang_ams.engine.pacing import paced_count

from .checks import compacted, step
from .harness import CFG, MARKS, add_request, make_batch, make_env

pytestmark = MARKS


def test_paced_count_waits_while_it_can():
    assert paced_count([256] * 160, 16) == 0                 # 16 a step from the next step on: 16 x 256 >= 160
    assert paced_count([10] * 160, 16) == 0                  # 160 <= 16 x 10: still one step to spare
    assert paced_count([9] * 160, 16) == 16                  # now: 10 steps including this one, 16 each
    assert paced_count([9] * 200, 16) == 20                  # more than N where N would let one pass its trigger
    assert paced_count([0], 4) == 1 and paced_count([0, 0, 0], 2) == 3     # at the trigger: all of them
    assert paced_count([-3, 5], 1) == 1                      # past it (joined late): counts as at it
    assert paced_count([], 8) == 0


@pytest.mark.parametrize("seed", range(20))
def test_paced_steps_never_let_a_request_pass_its_trigger(seed):
    """Requests arrive with random distances to their triggers; every step takes paced_count of the most urgent.
    None ever goes past its trigger, and a step takes more than N only when the deadlines force it."""
    rnd = random.Random(seed)
    n = rnd.choice([1, 2, 4, 16])
    waiting: list[int] = []
    for _ in range(400):
        waiting += [rnd.randrange(0, 64) for _ in range(rnd.choice([0, 0, 1, 3, 40]))]
        waiting.sort()
        take = paced_count(waiting, n)
        forced = max([-(-(i + 1) // (d + 1)) for i, d in enumerate(waiting)], default=0)
        assert take in (0, min(len(waiting), max(n, forced)))
        waiting = [d - 1 for d in waiting[take:]]
        assert all(d >= 0 for d in waiting), "a request passed its trigger"


def run_lockstep(step_requests):
    """Four requests with equal prompts: all reach their trigger (56 tokens) at the same decode step."""
    env = make_env(batch_slack=0.5, step_requests=step_requests)       # slack: 8 of the 16 interval tokens
    reqs = [add_request(env, rid, list(range(base, base + 34))) for rid, base in
            (("a", 2000), ("b", 3000), ("c", 4000), ("d", 5000))]
    batch = make_batch(env, reqs)
    done = {}
    for n in range(1, 26):
        c = compacted(step(env, batch))      # step() checks the bookkeeping of every compaction
        if c:
            done[n] = c
    return env, reqs, done


def test_lockstep_batch_compacts_in_one_step_without_a_limit():
    env, reqs, done = run_lockstep(0)
    assert done == {23: {"a": (56, 40), "b": (56, 40), "c": (56, 40), "d": (56, 40)}}
    assert env.rt.counters.launches == 1


def test_step_requests_spreads_a_lockstep_batch():
    """N = 1: one request a step, the last exactly at its trigger, the first three just before theirs."""
    env, reqs, done = run_lockstep(1)
    assert done == {20: {"a": (53, 40)}, 21: {"b": (54, 40)}, 22: {"c": (55, 40)}, 23: {"d": (56, 40)}}
    assert env.rt.counters.launches == 4
    assert all(request_state.existing_state(r).compactions == 1 for r in reqs)


def test_step_requests_two():
    env, reqs, done = run_lockstep(2)
    assert done == {22: {"a": (55, 40), "b": (55, 40)}, 23: {"c": (56, 40), "d": (56, 40)}}


def run_long_prompts(step_requests):
    """Four requests whose prompts (70 tokens) already pass the trigger (56): ready together after prefill."""
    env = make_env(batch_slack=0.5, step_requests=step_requests)       # overdue wait under pacing: 8 tokens
    reqs = [add_request(env, rid, list(range(base, base + 70))) for rid, base in
            (("a", 2000), ("b", 3000), ("c", 4000), ("d", 5000))]
    batch = make_batch(env, reqs)
    done, peak, first = {}, {r.rid: 70 for r in reqs}, set()
    for n in range(1, 40):
        for r in reqs:
            if r.rid not in first:
                peak[r.rid] = max(peak[r.rid], compat.committed_len(r))
        c = {rid: v for rid, v in compacted(step(env, batch)).items() if rid not in first}   # first compactions
        if c:
            done[n] = c
            first |= set(c)
    return env, reqs, done, peak


def test_long_prompts_compact_in_one_step_without_a_limit():
    env, reqs, done, _ = run_long_prompts(0)
    assert len(done) == 1 and len(next(iter(done.values()))) == 4


def test_step_requests_spreads_long_prompts_within_the_reserved_wait():
    """N = 1: one long prompt a step, each within the overdue wait after it became ready, so no request holds more
    than admission reserved for it (the lead plus that wait)."""
    env, reqs, done, peak = run_long_prompts(1)
    assert sorted(len(c) for c in done.values()) == [1, 1, 1, 1], done
    steps = sorted(done)
    assert steps == list(range(steps[0], steps[0] + 4))           # on consecutive steps, as late as allowed:
    assert [c[rid][0] for c, rid in zip((done[n] for n in steps), "abcd")] == [85, 86, 87, 88]  # ready 80, wait 8
    wait = env.rt.settings.overdue_wait(CFG.interval)
    assert wait == 8
    for r in reqs:
        reserved = admission.admission_new_tokens(70, 0, 4096, CFG, wait)
        assert peak[r.rid] - 70 <= reserved, (r.rid, peak[r.rid], reserved)
        assert request_state.existing_state(r).overdue_since == 0        # reset by its compaction
    assert max(peak.values()) - 70 == 10 + wait                    # the last one used all of the reserved wait
