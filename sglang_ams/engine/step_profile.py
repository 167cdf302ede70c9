"""--ams-profile-steps N: torch.profiler over compaction steps 2 .. N + 1, one summary each in the server log.

A diagnostic for the question "what does a compaction step spend its time on": the number of kernels and their
GPU time against the step's wall time, and the operations that cost most on the GPU and on the host. The first
step is left out (it may still meet a cold cache). Profiling synchronizes and slows the steps it covers; with
N = 0 (the default) nothing here runs.
"""
from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch.profiler import ProfilerActivity, profile

logger = logging.getLogger("sglang_ams")
TOP_ROWS = 15


def scope(profile_steps: int, steps_done: int, requests: int, device: torch.device):
    """A context for the coming step: profiling if it is one of steps 2 .. N + 1 (steps_done 1 .. N)."""
    if not 1 <= steps_done <= profile_steps:
        return contextlib.nullcontext()
    return _Profiled(steps_done + 1, requests, device)


class _Profiled:
    def __init__(self, number: int, requests: int, device: torch.device):
        self.number, self.requests, self.device = number, requests, device
        self.cuda = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.prof = profile(activities=activities)

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)     # the step's own work only
        self.t0 = time.perf_counter()
        try:
            self.prof.__enter__()
        except Exception as e:     # a diagnostic never fails a step (e.g. no CUPTI on this machine)
            logger.warning("sglang-ams: --ams-profile-steps: the profiler did not start (%r); step %d runs unprofiled",
                           e, self.number)
            self.prof = None
        return self

    def __exit__(self, *exc):
        if self.prof is None:
            return False
        if self.cuda:
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self.t0
        try:
            self.prof.__exit__(*exc)
            if exc[0] is None:
                logger.info("%s", summary(self.prof, self.number, self.requests, wall, self.cuda))
        except Exception as e:
            logger.warning("sglang-ams: --ams-profile-steps: no summary of step %d (%r)", self.number, e)
        return False


def top_level_aten(event) -> bool:
    """An aten call made from Python, not one inside another aten call."""
    parent = event.cpu_parent
    return event.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::"))


def summary(prof, number: int, requests: int, wall_s: float, cuda: bool) -> str:
    """The log text: totals, then the top operations by GPU time (when there is a GPU) and by host time."""
    averages = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
    host_ops = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU and top_level_aten(e))
    lines = [f"sglang-ams: profile of compaction step {number} ({requests} requests): wall {wall_s * 1e3:.1f} ms, "
             f"{len(kernels)} GPU kernels taking {gpu_ms:.1f} ms, {host_ops} top-level aten calls"]
    if cuda:
        lines.append(averages.table(sort_by="self_device_time_total", row_limit=TOP_ROWS))
    lines.append(averages.table(sort_by="self_cpu_time_total", row_limit=TOP_ROWS))
    return "\n".join(lines)
