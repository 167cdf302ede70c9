"""SnapKV: window-mean attention, 1-D average pool (cfg.pool_kernel), mean over each KV head's query group."""
from __future__ import annotations

import dataclasses

from ..window_attention import attention_evidence
from ._common import attention, finish
from .base import Inputs, ScoreInputs, Scorer, config_field, register


@register
@dataclasses.dataclass
class SnapKVScorer(Scorer):
    name = "snapkv"
    inputs = Inputs(attention=True)
    pool_kernel: int = config_field("pool_kernel")

    def score(self, inputs: ScoreInputs):
        attn = attention(inputs, self.name)
        return finish(attention_evidence(attn, inputs.num_kv_heads, self.pool_kernel), inputs)
