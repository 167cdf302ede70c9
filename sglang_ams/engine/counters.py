"""Compaction counters: proof that compaction happens, and what it costs.

GPU time is measured with CUDA events that are read only once they have completed (Event.query), so
measuring never makes the scheduler wait for the GPU.
"""
from __future__ import annotations

import dataclasses
import time

import torch


@dataclasses.dataclass
class Counters:
    compactions: int = 0            # request compactions
    launches: int = 0               # compaction steps (one kernel launch set for all due requests)
    tokens_freed: int = 0
    tokens_before: int = 0          # physical tokens of compacted requests before compaction (for the kept ratio)
    tokens_kept: int = 0
    ring_waits: int = 0             # a request reached its trigger with no query-ring row free
    decode_lse_launches: int = 0    # scoring launches that took the window queries' LSE from the decode attention
    host_seconds: float = 0.0       # scheduler time spent in the compaction step
    score_gpu_ms: float = 0.0       # scoring + selection kernels
    compact_gpu_ms: float = 0.0     # KV moves
    warmup_seconds: float = 0.0     # kernel compilation at startup
    first_step_seconds: float = 0.0  # scheduler time of the first compaction step
    first_step_gpu_ms: float = 0.0   # and its span on the GPU (as step_gpu_ms_max's)
    step_seconds_max: float = 0.0   # the longest compaction step after the first (scheduler time)
    step_gpu_ms_max: float = 0.0    # the longest after the first on the GPU: its first kernel's start to its last's
                                    # end (what the decode step queued behind it waits for)
    workspace_bound_bytes: int = 0  # transient memory reserved for a compaction step (set at startup)
    workspace_peak_bytes: int = 0   # the largest transient peak a step reached (GPU allocator statistics)
    _pending: list = dataclasses.field(default_factory=list, repr=False)

    @property
    def kept_ratio(self) -> float:
        return self.tokens_kept / self.tokens_before if self.tokens_before else 1.0

    def record(self, before: int, kept: int) -> None:
        self.compactions += 1
        self.tokens_before += before
        self.tokens_kept += kept
        self.tokens_freed += before - kept

    def step_done(self, report) -> None:
        """Add one compaction step (engine.report.StepReport)."""
        for r in report.requests:
            self.record(r.length, r.keep)
        for chunk in report.chunks:
            start, scored, moved = chunk.gpu_marks
            self.gpu_span("score", start, scored)
            self.gpu_span("compact", scored, moved)
            self.workspace_peak_bytes = max(self.workspace_peak_bytes, chunk.workspace_peak)
            self.decode_lse_launches += chunk.decode_lse
        if report.chunks and report.chunks[0].gpu_marks[0] is not None:
            self.gpu_span("step" if self.launches else "first", report.chunks[0].gpu_marks[0],
                          report.chunks[-1].gpu_marks[2])
        seconds = report.host_seconds
        self.launches += 1
        self.host_seconds += seconds
        if self.launches == 1:
            self.first_step_seconds = seconds
        else:
            self.step_seconds_max = max(self.step_seconds_max, seconds)

    def gpu_span(self, kind: str, start, end) -> None:
        if start is not None:
            self._pending.append((kind, start, end))

    def harvest(self) -> None:
        """Add the durations of completed GPU spans (non-blocking)."""
        still = []
        for kind, start, end in self._pending:
            if end.query():
                ms = start.elapsed_time(end)
                if kind == "score":
                    self.score_gpu_ms += ms
                elif kind == "compact":
                    self.compact_gpu_ms += ms
                elif kind == "first":
                    self.first_step_gpu_ms = ms
                else:
                    self.step_gpu_ms_max = max(self.step_gpu_ms_max, ms)
            else:
                still.append((kind, start, end))
        self._pending = still

    def snapshot(self) -> dict:
        self.harvest()
        # Not dataclasses.asdict: it deep-copies every field, and the pending spans hold CUDA events, which
        # cannot be copied (a report during a step's GPU work raised inside the scheduler).
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        d["kept_ratio"] = self.kept_ratio
        return d

    def summary(self) -> str:
        self.harvest()
        return (f"AMS compactions: {self.compactions} in {self.launches} steps, tokens freed: {self.tokens_freed}, "
                f"kept ratio: {self.kept_ratio:.3f}, scoring {self.score_gpu_ms:.1f} ms, "
                f"compacting {self.compact_gpu_ms:.1f} ms (GPU), host {self.host_seconds * 1e3:.1f} ms, "
                f"ring waits: {self.ring_waits}, scoring with decode LSE: {self.decode_lse_launches}, "
                f"step peak {self.workspace_peak_bytes / 2**20:.0f} of {self.workspace_bound_bytes / 2**20:.0f} MiB, "
                f"first step {self.first_step_seconds * 1e3:.0f} ms (on the GPU {self.first_step_gpu_ms:.0f} ms), "
                f"longest later {self.step_seconds_max * 1e3:.0f} ms (on the GPU {self.step_gpu_ms_max:.0f} ms)")


class Timer:
    """CUDA events around a span when on a GPU; nothing on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev


def now() -> float:
    return time.perf_counter()
