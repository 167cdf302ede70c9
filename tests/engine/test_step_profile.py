"""--ams-profile-steps: the profiled steps log a summary and compact exactly what unprofiled steps do."""
from __future__ import annotations

import dataclasses
import logging

import pytest

from sglang_ams.engine import step_profile

from .checks import compacted, step
from .harness import MARKS, add_request, make_batch, make_env

pytestmark = MARKS


def run_lockstep(profile_steps):
    """Four requests reaching their triggers together, one compacting a step (step_requests 1): four steps."""
    env = make_env(batch_slack=0.5, step_requests=1)
    env.rt.settings = dataclasses.replace(env.rt.settings, profile_steps=profile_steps)
    reqs = [add_request(env, rid, list(range(base, base + 34))) for rid, base in
            (("a", 2000), ("b", 3000), ("c", 4000), ("d", 5000))]
    batch = make_batch(env, reqs)
    done = {}
    for n in range(1, 26):
        c = compacted(step(env, batch))
        if c:
            done[n] = c
    return done


def test_profiled_steps_log_a_summary_and_change_nothing(caplog):
    plain = run_lockstep(0)
    with caplog.at_level(logging.INFO, logger="sglang_ams"):
        profiled = run_lockstep(2)
    assert profiled == plain and len(plain) == 4
    lines = [r.getMessage() for r in caplog.records if "profile of compaction step" in r.getMessage()]
    # steps 2 and 3 of the four, one request each; the first and the last are not profiled
    assert [line.split("(")[0].split()[-1] for line in lines] == ["2", "3"]
    assert all("(1 requests)" in line and "top-level aten calls" in line and "Self CPU" in line for line in lines)


def test_scope_is_a_no_op_outside_the_steps():
    import torch
    dev = torch.device("cpu")
    assert type(step_profile.scope(0, 1, 4, dev)).__name__ == "nullcontext"
    assert type(step_profile.scope(2, 0, 4, dev)).__name__ == "nullcontext"     # the first step
    assert type(step_profile.scope(2, 3, 4, dev)).__name__ == "nullcontext"     # past N
    assert type(step_profile.scope(2, 2, 4, dev)).__name__ == "_Profiled"


@pytest.mark.parametrize("bad", [-1, 1001])
def test_profile_steps_range(bad):
    from sglang_ams.config import ConfigError
    from sglang_ams.engine.settings import EngineSettings
    with pytest.raises(ConfigError, match="ams_profile_steps|profile"):
        EngineSettings(profile_steps=bad)


def test_a_profiler_that_fails_leaves_the_step_alone(monkeypatch, caplog):
    """No CUPTI, a profiler already running: the step still compacts, the log says why it was not profiled."""
    plain = run_lockstep(0)

    def broken(*args, **kwargs):
        raise RuntimeError("profiler unavailable")
    monkeypatch.setattr(step_profile.profile, "__enter__", broken)
    with caplog.at_level(logging.WARNING, logger="sglang_ams"):
        assert run_lockstep(2) == plain
    assert sum("the profiler did not start" in r.getMessage() for r in caplog.records) == 2
