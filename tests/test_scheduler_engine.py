"""The scheduler's engine object (counters out to Prometheus, the log and /get_server_info), the one policy-state
lookup and the one ring-row release."""
import logging
from types import SimpleNamespace

import torch

from sglang_ams.config import PolicyConfig
from sglang_ams.engine import request_state
from sglang_ams.engine import runtime as ams_runtime
from sglang_ams.engine.counters import Counters
from sglang_ams.engine.ring import QueryRing
from sglang_ams.engine.scheduler_engine import LOG_EVERY_S, SchedulerEngine
from sglang_ams.engine.settings import EngineSettings

SETTINGS = EngineSettings(policy=PolicyConfig(policy="ams", budget=256, interval=64))


def _engine(clock):
    rt = SimpleNamespace(settings=SETTINGS, counters=Counters())
    return rt, SchedulerEngine(rt, compactor=SimpleNamespace(step=lambda batch: len(batch)), clock=clock)


def test_report_exports_deltas_and_logs_at_most_every_interval(caplog):
    from prometheus_client import CollectorRegistry
    now = [100.0]
    rt, engine = _engine(lambda: now[0])
    registry = CollectorRegistry()
    engine.enable_prometheus({"model": "m"}, registry=registry)

    def value(name):
        return registry.get_sample_value(name, {"model": "m"})
    with caplog.at_level(logging.INFO, logger="sglang_ams"):
        engine.report()                               # nothing compacted yet: no log line
        rt.counters.record(300, 256)
        engine.report()
        now[0] += LOG_EVERY_S / 2
        rt.counters.record(320, 256)
        engine.report()                               # exported, but too soon for another log line
        now[0] += LOG_EVERY_S
        engine.report()
    assert value("sglang_ams:compactions_total") == 2 and value("sglang_ams:tokens_freed_total") == 44 + 64
    assert abs(value("sglang_ams:kept_ratio") - 512 / 620) < 1e-9
    assert sum("AMS compactions" in r.getMessage() for r in caplog.records) == 2
    assert engine.step([1, 2, 3]) == 3


def test_internal_state_names_the_policy():
    rt, engine = _engine(lambda: 0.0)
    rt.counters.record(300, 256)
    state = engine.internal_state()
    assert (state["policy"], state["budget"], state["interval"], state["compactions"]) == ("ams", 256, 64, 1)


def test_lookup_and_ring_release():
    req = SimpleNamespace(rid="r", sampling_params=SimpleNamespace(custom_params={"kv_policy": {"budget": 128}}))
    ams_runtime.install(None)
    assert request_state.lookup(req) == (None, None)
    ring = QueryRing(1, 4, SETTINGS.policy.window, 2, 8, 8, torch.bfloat16, torch.device("cpu"))
    rt = SimpleNamespace(settings=SETTINGS, ring=ring)
    ams_runtime.install(rt)
    try:
        got_rt, st = request_state.lookup(req)
        assert got_rt is rt and st.cfg.budget == 128 and request_state.lookup(req)[1] is st
        off = SimpleNamespace(rid="o", sampling_params=SimpleNamespace(custom_params={"kv_policy": "none"}))
        assert request_state.lookup(off) == (rt, None)
    finally:
        ams_runtime.install(None)
    st.ring_row, st.ring_start, st.ring_lse = ring.acquire(3), 40, False
    assert st.ring_row and ring.free_rows == ring.rows - 1
    st.release_ring_row(ring, 3)
    assert (st.ring_row, st.ring_start, st.ring_lse) == (0, -1, True) and ring.free_rows == ring.rows
    assert ring.row_of[3] == 0
    st.release_ring_row(None, None)                   # no row: nothing to return (a query-free request)


def test_a_fault_in_reporting_is_logged_once_and_never_reaches_the_scheduler(caplog):
    """A raising snapshot (as a deep copy of pending CUDA events once did) must not take the event loop down."""
    rt, engine = _engine(lambda: 0.0)

    def broken():
        raise TypeError("cannot pickle 'Event' object")
    rt.counters.snapshot = broken
    with caplog.at_level(logging.ERROR, logger="sglang_ams"):
        engine.report()
        engine.report()
        state = engine.internal_state()
    assert engine.report_faults == 3 and state == {"error": "TypeError: cannot pickle 'Event' object",
                                                   "report_faults": 3}
    assert sum("report failed" in r.getMessage() for r in caplog.records) == 1
