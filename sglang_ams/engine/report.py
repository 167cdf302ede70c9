"""What one compaction step did: the value `Compactor.step` returns, and what the counters, debug mode and
tests read (host values only, except the optional trace and the CUDA events)."""
from __future__ import annotations

import dataclasses

import torch

from ..config import PolicyConfig


@dataclasses.dataclass(frozen=True)
class RequestReport:
    """One request of a chunk, as the compactor saw it before the move."""
    rid: str
    row: int               # req_pool_idx
    length: int            # physical KV length before compaction
    prefix: int            # radix-owned prefix (cache_protected_len)
    keep: int              # tokens kept per (layer, head)
    pinned: int            # max(prefix, sink): positions the selection never moves
    freed: int = 0         # slots given back to the allocator (whole pages); 0 before its last layer chunk

    @property
    def dropped(self) -> int:
        return self.length - self.keep


@dataclasses.dataclass(frozen=True)
class Trace:
    """What the selection got and chose (kept only when the compactor traces: it holds the chunk's workspace)."""
    inputs: object         # scorers.base.ScoreInputs
    n_pinned: torch.Tensor
    n_keep: torch.Tensor
    credit: torch.Tensor | None
    selection: object      # selection.Selection


@dataclasses.dataclass(frozen=True)
class ChunkReport:
    """One launch set: requests of one policy group over a range of layers."""
    cfg: PolicyConfig                  # the group's policy (budget and interval of its first request)
    layers: range
    requests: tuple                    # RequestReport, in launch order
    committed: bool                    # the last layer chunk: tails freed, lengths and offsets fixed
    ring_lse: bool                     # every window query came with its decode-attention LSE
    decode_lse: bool                   # the scoring took that LSE (keys read once)
    workspace_peak: int = 0            # transient GPU bytes above the start (0 on the CPU)
    gpu_marks: tuple = (None, None, None)   # CUDA events: start, scored, moved (None on the CPU)
    trace: Trace | None = None


@dataclasses.dataclass(frozen=True)
class StepReport:
    chunks: tuple = ()                 # ChunkReport, in launch order
    host_seconds: float = 0.0          # scheduler time of the step

    @property
    def requests(self) -> tuple:
        """Every compacted request, once (from the chunk that committed it)."""
        return tuple(r for c in self.chunks if c.committed for r in c.requests)

    @property
    def freed(self) -> int:
        return sum(r.freed for r in self.requests)

    def __bool__(self) -> bool:
        return bool(self.chunks)

    def summary(self) -> str:
        kept = ", ".join(f"{r.rid} {r.length}->{r.keep} (freed {r.freed})" for r in self.requests)
        return f"{len(self.chunks)} chunks, {self.host_seconds * 1e3:.1f} ms host: {kept}"


NOTHING = StepReport()      # a step with nothing due (most decode steps): no allocation
