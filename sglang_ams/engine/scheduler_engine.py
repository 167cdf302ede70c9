"""The plugin's part of one SGLang scheduler: its compactor and what it reports (Prometheus counters, the periodic
log line, the entry in /get_server_info). Built once in Scheduler.__init__ and kept on the scheduler, so the hooks
in patches/scheduler.py hold no state of their own."""
from __future__ import annotations

import functools
import logging
import time

from .compactor import Compactor
from .runtime import Runtime

logger = logging.getLogger("sglang_ams")
ATTR = "_ams_engine"        # the SchedulerEngine on SGLang's Scheduler
LOG_EVERY_S = 10.0
# Prometheus counter -> Counters field it follows
_EXPORTED = (("compactions", "compactions", "Request compactions"),
             ("compaction_steps", "launches", "Compaction steps (one launch set for all requests compacting)"),
             ("tokens_freed", "tokens_freed", "KV tokens freed by compaction"),
             ("ring_waits", "ring_waits", "Compactions delayed because no query-ring row was free"),
             ("score_ms", "score_gpu_ms", "GPU milliseconds spent scoring and selecting"),
             ("compact_ms", "compact_gpu_ms", "GPU milliseconds spent moving KV"),
             ("host_seconds", "host_seconds", "Scheduler seconds spent in the compaction step"))


def _observation(fallback):
    """Reporting is observation: a fault in it is logged (its traceback once) and never reaches SGLang's event loop,
    which would take the whole server down with it."""
    def wrap(method):
        @functools.wraps(method)
        def guarded(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except Exception as e:
                self.report_faults += 1
                if self.report_faults == 1:
                    logger.exception("sglang_ams: %s failed; serving goes on without it", method.__name__)
                return fallback(self, e)
        return guarded
    return wrap


class SchedulerEngine:
    def __init__(self, rt: Runtime, compactor: Compactor | None = None, clock=time.monotonic):
        self.rt = rt
        self.compactor = compactor if compactor is not None else Compactor(rt)
        self._clock = clock
        self._last_log = float("-inf")
        self._prom: dict | None = None          # name -> prometheus metric, once enable_prometheus ran
        self._labels: dict = {}
        self._seen: dict = {}                   # Counters field -> value already exported
        self.report_faults = 0                  # report / internal_state calls that raised (see _observation)

    def step(self, batch) -> int:
        return self.compactor.step(batch)

    def enable_prometheus(self, labels: dict, registry=None) -> None:
        """Export the counters under SGLang's metric labels (--enable-metrics); `registry`: prometheus_client's
        default one unless given (tests)."""
        from prometheus_client import REGISTRY, Counter, Gauge
        where = dict(labelnames=list(labels), registry=registry if registry is not None else REGISTRY)
        self._labels = dict(labels)
        self._prom = {name: Counter(f"sglang_ams:{name}_total", doc, **where) for name, _, doc in _EXPORTED}
        self._prom["kept_ratio"] = Gauge("sglang_ams:kept_ratio", "Kept / physical tokens over all compactions",
                                         multiprocess_mode="mostrecent", **where)

    @_observation(lambda self, e: None)
    def report(self) -> None:
        """After SGLang's decode statistics: advance the Prometheus counters, log a summary every LOG_EVERY_S."""
        snap = self.rt.counters.snapshot()
        if self._prom is not None:
            for name, field, _ in _EXPORTED:
                delta = snap[field] - self._seen.get(field, 0)
                if delta > 0:
                    self._prom[name].labels(**self._labels).inc(delta)
                self._seen[field] = snap[field]
            self._prom["kept_ratio"].labels(**self._labels).set(snap["kept_ratio"])
        now = self._clock()
        if now - self._last_log >= LOG_EVERY_S and snap["compactions"]:
            self._last_log = now
            logger.info(self.rt.counters.summary())

    @_observation(lambda self, e: {"error": f"{type(e).__name__}: {e}", "report_faults": self.report_faults})
    def internal_state(self) -> dict:
        """The counters in /get_server_info and Engine.get_server_info() (internal_states[i]["sglang_ams"])."""
        p = self.rt.settings.policy
        return {**self.rt.counters.snapshot(), "policy": p.policy, "scorer": p.scorer, "budget": p.budget,
                "interval": p.interval}
