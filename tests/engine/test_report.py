"""The report Compactor.step returns, and the counters that consume it."""
from __future__ import annotations

from sglang_ams.engine import report as report_mod
from sglang_ams.engine.counters import Counters

from .harness import CFG, LAYERS, MARKS, add_request, forward, make_batch, make_env

pytestmark = MARKS


def test_counters_add_up_a_step_report():
    def req(rid, length, keep, freed=0):
        return report_mod.RequestReport(rid, 1, length, 0, keep, 4, freed)
    layer0 = report_mod.ChunkReport(CFG, range(0, 1), (req("a", 60, 40), req("b", 70, 40)), False, True, True,
                                    workspace_peak=300)
    layer1 = report_mod.ChunkReport(CFG, range(1, 2), (req("a", 60, 40, 16), req("b", 70, 40, 30)), True, True,
                                    False, workspace_peak=200)
    step = report_mod.StepReport((layer0, layer1), host_seconds=0.5)
    assert [r.rid for r in step.requests] == ["a", "b"] and step.freed == 46      # once, from the committing chunk
    c = Counters()
    c.step_done(step)
    c.step_done(report_mod.StepReport((layer1,), host_seconds=0.25))
    assert (c.compactions, c.launches, c.tokens_before, c.tokens_kept, c.tokens_freed) == (4, 2, 260, 160, 100)
    assert c.decode_lse_launches == 1 and c.workspace_peak_bytes == 300
    assert (c.host_seconds, c.first_step_seconds, c.step_seconds_max) == (0.75, 0.5, 0.25)
    assert not report_mod.NOTHING and report_mod.NOTHING.requests == () and "a 60->40 (freed 16)" in step.summary()


def test_a_layer_chunked_step_reports_every_chunk_and_commits_once():
    """Under a bound of one layer of one request, a step runs a chunk per (request, layer); each request is
    committed (freed, counted) once, by its last layer's chunk. Steps with nothing due return NOTHING."""
    env = make_env(trace=False, page_size=16)
    reqs = [add_request(env, f"r{i}", list(range(5000 + 100 * i, 5000 + 100 * i + n))) for i, n in enumerate((47, 80))]
    batch = make_batch(env, reqs)
    cost = env.compactor.chunk_cost(CFG)
    env.rt.set_workspace(cost.bytes(1, 1, 100))
    reports = []
    for _ in range(12):
        reports.append(env.compactor.step(batch))
        batch.prepare_for_decode()
        forward(env, batch)
    done = [r for r in reports if r]
    assert all(r is report_mod.NOTHING for r in reports if not r) and len(done) == 1
    step = done[0]
    assert [(c.requests[0].rid, c.layers, c.committed) for c in step.chunks] == \
        [(rid, range(layer, layer + 1), layer == LAYERS - 1) for rid in ("r1", "r0") for layer in range(LAYERS)]
    assert [(r.rid, r.length, r.keep) for r in step.requests] == [("r1", 90, 40), ("r0", 57, 40)]   # step 11
    assert [r.freed for r in step.requests] == [48, 16]                   # pages past align_up(40) = 48
    assert all(r.freed == 0 for c in step.chunks if not c.committed for r in c.requests)
    assert env.rt.counters.compactions == 2 and env.rt.counters.launches == 1
    assert env.rt.counters.tokens_freed == sum(r.dropped for r in step.requests) == 50 + 17
    assert all(c.trace is None and c.gpu_marks == (None, None, None) for c in step.chunks)
    assert batch.seq_lens_cpu.tolist() == [40 + 2, 40 + 2]               # two decode steps since


class FakeEvent:
    """A CUDA event stand-in: recorded at `t` ms, completed unless told otherwise; like torch.cuda.Event it cannot
    be copied or pickled (a deep copy of a pending span once killed a scheduler)."""
    def __init__(self, t, done=True):
        self.t, self.done = t, done

    def __reduce_ex__(self, protocol):
        raise TypeError("cannot pickle 'Event' object")

    def query(self):
        return self.done

    def elapsed_time(self, end):
        return end.t - self.t


def test_the_longest_step_on_the_gpu_spans_its_chunks_and_skips_the_first_step():
    def chunk(t0, t1, t2):
        return report_mod.ChunkReport(CFG, range(0, LAYERS), (), True, True, False,
                                      gpu_marks=(FakeEvent(t0), FakeEvent(t1), FakeEvent(t2)))
    c = Counters()
    c.step_done(report_mod.StepReport((chunk(0, 90, 100),), host_seconds=0.2))           # first: compile, cold
    c.step_done(report_mod.StepReport((chunk(200, 205, 207), chunk(207, 230, 236)), host_seconds=0.01))
    c.step_done(report_mod.StepReport((chunk(300, 310, 312),), host_seconds=0.01))
    late = FakeEvent(500, done=False)
    c.step_done(report_mod.StepReport((report_mod.ChunkReport(CFG, range(0, LAYERS), (), True, True, False,
                                                              gpu_marks=(FakeEvent(400), late, late)),), 0.01))
    snap = c.snapshot()                             # with a span still pending: its events are not copied
    assert snap["step_gpu_ms_max"] == 36 and not any(k.startswith("_") for k in snap)
    assert c.step_gpu_ms_max == 36                  # 200 -> 236: both chunks of the second step
    assert c.first_step_gpu_ms == 100 and "first step 200 ms (on the GPU 100 ms)" in c.summary()
    assert (c.score_gpu_ms, c.compact_gpu_ms) == (90 + 5 + 23 + 10, 10 + 2 + 6 + 2)
    late.done = True
    c.harvest()                                     # a span still running is read once it has completed
    assert c.step_gpu_ms_max == 100 and "on the GPU 100 ms" in c.summary()


def test_reporting_reads_the_real_compactor_with_gpu_events_still_pending():
    """The GPU path on the CPU: the compactor's timer hands out events that cannot be copied and complete late, as
    CUDA events do. Reports and /get_server_info taken while they are pending must work, and count them once done."""
    from sglang_ams.engine.scheduler_engine import SchedulerEngine

    class LateTimer:
        def __init__(self):
            self.t, self.events = 0, []

        def mark(self):
            self.t += 1
            self.events.append(FakeEvent(self.t, done=False))
            return self.events[-1]
    env = make_env(trace=False)
    env.compactor._timer = timer = LateTimer()
    engine = SchedulerEngine(env.rt, env.compactor)
    batch = make_batch(env, [add_request(env, f"r{i}", list(range(7000 + 100 * i, 7000 + 100 * i + n)))
                             for i, n in enumerate((70, 90))])
    for _ in range(40):
        engine.step(batch)
        batch.prepare_for_decode()
        forward(env, batch)
        engine.report()
    state = engine.internal_state()
    assert env.rt.counters.launches >= 2 and timer.events and engine.report_faults == 0
    assert state["launches"] == env.rt.counters.launches and state["score_gpu_ms"] == 0     # nothing completed yet
    for ev in timer.events:
        ev.done = True
    assert engine.internal_state()["score_gpu_ms"] > 0 and env.rt.counters._pending == []
