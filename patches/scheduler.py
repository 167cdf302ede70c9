"""Hooks on sglang.srt.managers.scheduler (and its metrics reporter): startup checks in every scheduler
process, the compaction step between decode steps, and the counters in the log and in Prometheus."""
from __future__ import annotations

import logging

from sglang_ams.engine import runtime as ams_runtime
from sglang_ams.engine import settings as ams_settings
from sglang_ams.engine import sglang_compat as compat
from sglang_ams.engine.scheduler_engine import ATTR, SchedulerEngine

from .server_args import settings_of

logger = logging.getLogger("sglang_ams")
SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
REPORTER = "sglang.srt.managers.scheduler_components.metrics_reporter.SchedulerMetricsReporter"


def _check_scheduler(scheduler) -> None:
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
    accepted = compat.tree_cache_classes()
    if type(scheduler.tree_cache) not in accepted:
        raise ams_runtime.Unsupported(f"the prefix cache is {type(scheduler.tree_cache).__name__}; the plugin "
                                      f"supports SGLang's {', '.join(c.__name__ for c in accepted)}")
    backend = scheduler.tp_worker.model_runner.attn_backend
    if not isinstance(backend, FlashInferAttnBackend):
        raise ams_runtime.Unsupported(f"attention backend is {type(backend).__name__}, not FlashInfer (SGLang "
                                      "changed it for this model); the plugin needs FlashInfer")
    if not scheduler.spec_algorithm.is_none():
        raise ams_runtime.Unsupported("speculative decoding is not supported")


def decode_graph_max_bs(server_args) -> int | None:
    """The largest batch SGLang decodes in a CUDA graph (its per-phase graph config, 0.5.17 and 0.5.23); None
    where decode graphs are off or the config is not resolved."""
    decode = getattr(getattr(server_args, "cuda_graph_config", None), "decode", None)
    if decode is None or getattr(decode, "backend", None) == "disabled":
        return None
    return getattr(decode, "max_bs", None)


ADVISED_GRAPH_MAX_BS = 512      # the serving benchmark's setting; larger graphs cost capture time and memory


def graph_hint(max_running: int | None, graph_max_bs: int | None) -> str | None:
    """Compaction lets more requests run at once than SGLang's decode graphs cover (they stop at 256 on an H200
    by default): say so at startup, since past them every decode step runs eagerly. Silent once the graphs reach
    the batch it would advise (at most 512, README's advice)."""
    if not max_running or not graph_max_bs:
        return None
    advised = min(max_running, ADVISED_GRAPH_MAX_BS)
    if graph_max_bs >= advised:
        return None
    return (f"sglang-ams: up to {max_running} requests can run, but decode CUDA graphs stop at batch "
            f"{graph_max_bs} and larger batches decode eagerly; with compaction more requests run at once, so "
            f"consider --cuda-graph-max-bs-decode {advised} (README, serving benchmark)")


def init_hook(result, self, *args, **kwargs):
    from . import engine_hooks, flag_hooks, verify_applied
    settings = settings_of(self.server_args)
    env = ams_settings.current()
    if env is None or env != settings:
        raise RuntimeError("sglang-ams: the scheduler's settings differ from the launcher's "
                           f"({ams_settings.ENV_VAR}); was the environment changed between launch and spawn?")
    where = f"scheduler process (tp rank {getattr(self, 'tp_rank', 0)})"
    verify_applied(flag_hooks() + engine_hooks(), where)
    rt = ams_runtime.get()
    if rt is None:
        raise RuntimeError(f"sglang-ams: the KV-pool hook did not run in the {where}")
    _check_scheduler(self)
    rt.attach_scheduler(self)
    engine = SchedulerEngine(rt)
    setattr(self, ATTR, engine)
    if settings.warmup:
        from sglang_ams.engine.warmup import warm_up
        rt.counters.warmup_seconds = warm_up(rt)
        logger.info("sglang-ams: compaction kernels compiled in %.1f s", rt.counters.warmup_seconds)
    reporter = getattr(self, "metrics_reporter", None)
    if reporter is not None and getattr(reporter, "enable_metrics", False):
        engine.enable_prometheus(dict(getattr(reporter.metrics_collector, "labels", {}) or {}))
    p = settings.policy
    logger.info("sglang-ams: policy %s, scorer %s, budget %d, interval %d, window %d, prompt %s; ring %s; "
                "static overhead %.1f MiB = %.2f%% of the KV pool; compaction workspace %.1f MiB = %.2f%% "
                "(reserved)", p.policy, p.scorer, p.budget, p.interval,
                p.window, settings.prompt_cache, f"{rt.ring.rows} rows" if rt.ring is not None else "off",
                rt.overhead_bytes() / 2**20, 100.0 * rt.overhead_bytes() / max(1, rt.kv_pool_bytes()),
                rt.workspace_bytes / 2**20, 100.0 * rt.workspace_bytes / max(1, rt.kv_pool_bytes()))
    hint = graph_hint(getattr(self, "max_running_requests", None), decode_graph_max_bs(self.server_args))
    if hint:
        logger.info(hint)


def update_running_batch_hook(orig, self, batch):
    # Filter first so finished requests are not compacted, then compact before SGLang checks decode memory:
    # freed slots avoid a retraction and the new decode slot lands right after the kept tokens.
    initial = batch.batch_size()
    finishing = getattr(self, "_reqs_finishing_inflight", None)      # (SGLang that skips their last decode)
    batch.filter_batch(**({"reqs_to_exclude": finishing(batch)} if finishing is not None else {}))
    if batch.batch_size() < initial:
        batch.batch_is_full = False
    if not batch.is_empty():
        getattr(self, ATTR).step(batch)
    return orig(self, batch)


def report_decode_stats_hook(result, self, *args, **kwargs):
    engine = getattr(getattr(self, "scheduler", None), ATTR, None)
    if engine is not None:
        engine.report()
    return result


def internal_state_hook(result, self, *args, **kwargs):
    engine = getattr(self, ATTR, None)
    if engine is not None and isinstance(getattr(result, "internal_state", None), dict):
        result.internal_state["sglang_ams"] = engine.internal_state()
    return result


HOOKS = [
    (SCHEDULER + ".__init__", init_hook, "after"),
    (SCHEDULER + ".get_internal_state", internal_state_hook, "after"),
    (SCHEDULER + ".update_running_batch", update_running_batch_hook, "around"),
    (REPORTER + ".report_decode_stats", report_decode_stats_hook, "after"),
]
