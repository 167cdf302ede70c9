"""due_requests skips a request until the length its readiness waits for (RequestState.wake): the same
compactions at the same steps as checking every request every step, with the readiness rule run only near the
triggers."""
from __future__ import annotations

import pytest

from sglang_ams.engine import request_state
from sglang_ams.engine import sglang_compat as compat
from sglang_ams.engine.compactor import Compactor

from .checks import compacted, step
from .harness import MARKS, add_request, make_batch, make_env

pytestmark = MARKS


def _run(monkeypatch, wake: bool, steps: int = 60, **env_kwargs):
    """Compactions per step and readiness calls for three requests of different lengths (one ring row for them
    with ring_rows=1, so one waits)."""
    env = make_env(**env_kwargs)
    reqs = [add_request(env, rid, list(range(base, base + n)))
            for rid, base, n in (("a", 2000, 34), ("b", 3000, 41), ("c", 4000, 47))]
    batch = make_batch(env, reqs)
    calls = []
    readiness = Compactor._readiness

    def counted(self, req, st, length):
        calls.append((req.rid, length))
        ready = readiness(self, req, st, length)
        if not wake:
            st.wake = 0                 # what the compactor did before: every request, every step
        return ready
    monkeypatch.setattr(Compactor, "_readiness", counted)
    history = [compacted(step(env, batch)) for _ in range(steps)]
    return history, calls, env


@pytest.mark.parametrize("kwargs", [{}, {"ring_rows": 1}, {"batch_slack": 0.5}, {"step_requests": 1}])
def test_skipping_until_the_wake_length_compacts_exactly_as_checking_every_step(monkeypatch, kwargs):
    every, all_calls, _ = _run(monkeypatch, wake=False, **kwargs)
    skipping, calls, _ = _run(monkeypatch, wake=True, **kwargs)
    assert sum(len(h) for h in every) >= 3 and skipping == every
    assert len(calls) < 0.75 * len(all_calls), (len(calls), len(all_calls))     # (half, at these small sizes)


def test_losing_the_ring_row_clears_the_wake():
    """A request waiting on its window (wake at ring_start + W) whose row is taken back starts over: the next
    step checks it again and it takes a new row."""
    env = make_env()
    req = add_request(env, "a", list(range(2000, 2046)))        # cap 56: takes a row at 48 - slack
    batch = make_batch(env, [req])
    def st():
        return request_state.existing_state(req)
    for _ in range(12):
        step(env, batch)
        if st().ring_row:
            break
    assert st().ring_row and st().wake == st().ring_start + env.rt.settings.policy.window
    st().release_ring_row(env.rt.ring, compat.pool_idx(req))
    assert st().wake == 0 and not st().ring_row
    step(env, batch)
    assert st().ring_row
