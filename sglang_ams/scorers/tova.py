"""TOVA: attention of the newest query, averaged over all query heads of the layer and shared by every KV head.

Under tensor parallelism a rank holds only some query heads: it sums its own and the sum is taken over the TP
group (ScoreInputs.heads), so every rank scores with the mean over all the model's query heads.
"""
from __future__ import annotations

import dataclasses

from ._common import attention, finish
from .base import Inputs, ScoreInputs, Scorer, register


@register
@dataclasses.dataclass
class TovaScorer(Scorer):
    name = "tova"
    inputs = Inputs(last_row=True)

    def score(self, inputs: ScoreInputs):
        last = attention(inputs, self.name).last_row            # [N, L, H*G, T]
        heads = inputs.heads
        if heads is None or heads.q_count == heads.model_q_heads:
            return finish(last.mean(dim=2, keepdim=True), inputs)
        total = heads.sum_over_ranks(last.float().sum(dim=2, keepdim=True).contiguous())
        return finish(total / heads.model_q_heads, inputs)
