"""Which of the model's attention heads this process holds, and how to sum a quantity over all of them.

SGLang's tensor parallelism (QKVParallelLinear, layers/linear.py) gives TP rank r of t the query heads
[r * Hq/t, (r+1) * Hq/t) and, when t <= Hkv, the KV heads [r * Hkv/t, (r+1) * Hkv/t); with more ranks than KV
heads each rank holds one KV head, r // (t / Hkv), replicated on t / Hkv ranks. The KV pool of a rank holds only
its heads, so everything indexed by a model-wide head id (calibration statistics, per-head random streams) takes
the rank's offset, and a quantity defined over all heads of a layer (TOVA's mean over query heads) is summed over
the TP group. Without tensor parallelism (and in the dense reference loop) the range is the whole model.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class HeadRange:
    kv_start: int            # model-wide id of this process's first KV head
    kv_count: int            # KV heads here (the pool's head_num)
    model_kv_heads: int
    q_start: int             # model-wide id of the first query head
    q_count: int
    model_q_heads: int
    # Sums a tensor over the TP group in place and returns it (the same result on every rank); None: one rank.
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def full(cls, kv_heads: int, q_heads: int) -> "HeadRange":
        return cls(0, kv_heads, kv_heads, 0, q_heads, q_heads)

    @classmethod
    def of_rank(cls, tp_rank: int, tp_size: int, model_kv_heads: int, model_q_heads: int,
                all_reduce=None) -> "HeadRange":
        """SGLang's sharding rule (QKVParallelLinear: q shard tp_rank, KV shard tp_rank // replicas)."""
        if model_q_heads % tp_size or (model_kv_heads % tp_size if tp_size <= model_kv_heads
                                       else tp_size % model_kv_heads):
            raise ValueError(f"{model_q_heads} query / {model_kv_heads} KV heads do not shard over {tp_size} ranks")
        q_count = model_q_heads // tp_size
        if tp_size <= model_kv_heads:
            kv_count = model_kv_heads // tp_size
            kv_start = tp_rank * kv_count
        else:
            kv_count, kv_start = 1, tp_rank // (tp_size // model_kv_heads)
        return cls(kv_start, kv_count, model_kv_heads, tp_rank * q_count, q_count, model_q_heads,
                   all_reduce if tp_size > 1 else None)

    @property
    def is_full(self) -> bool:
        return self.kv_count == self.model_kv_heads and self.q_count == self.model_q_heads

    @property
    def replicated(self) -> bool:
        """KV heads are copied on several ranks (more ranks than KV heads): each copy serves part of the group."""
        return self.q_count * self.model_kv_heads < self.model_q_heads * self.kv_count

    def kv_ids(self, device=None) -> torch.Tensor:
        """Model-wide ids of the KV heads here [kv_count] (int64)."""
        return torch.arange(self.kv_start, self.kv_start + self.kv_count, device=device)

    def sum_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over every rank of the TP group (x itself when this process holds every head)."""
        if self.all_reduce is None:
            if not self.is_full:
                raise ValueError("a sum over all heads needs the TP group's all-reduce (HeadRange.all_reduce)")
            return x
        return self.all_reduce(x)
