"""TOVA: attention of the newest query, averaged over all query heads and shared by every KV head."""
from __future__ import annotations

from ._common import attention, finish
from .base import ScoreInputs, Scorer, register


@register
class TovaScorer(Scorer):
    name = "tova"
    needs_queries = True
    reads_kv = False

    def score(self, inputs: ScoreInputs):
        last = attention(inputs, self.name).last_row            # [N, L, H*G, T]
        return finish(last.mean(dim=2, keepdim=True), inputs)
