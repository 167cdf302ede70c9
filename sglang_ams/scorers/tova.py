"""TOVA: attention of the newest query, averaged over all query heads and shared by every KV head."""
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
        return finish(last.mean(dim=2, keepdim=True), inputs)
