"""SnapKV: window-mean attention, 1-D average pool (cfg.pool_kernel), mean over each KV head's query group."""
from __future__ import annotations

from ..window_attention import attention_evidence
from ._common import attention, finish
from .base import ScoreInputs, Scorer, register


@register
class SnapKVScorer(Scorer):
    name = "snapkv"
    needs_queries = True
    reads_kv = False

    def score(self, inputs: ScoreInputs):
        attn = attention(inputs, self.name)
        return finish(attention_evidence(attn, inputs.num_kv_heads, self.cfg.pool_kernel), inputs)
