"""H2O over the window: attention a token receives from the window queries, per query that can see it.

A variant, named honestly: H2O accumulates the attention of every query since the prompt; this scorer sees only the
last W queries (the engine keeps no more), so it scores every token exactly as SnapKV with pool_kernel 1 does, except
the newest W - 1, which the per-viewer normalisation below lifts.

Query w of request n sits at key index len - W + w and sees keys up to it, so key t is seen by
min(W, len - t) queries: all W for old tokens, fewer for the newest W - 1. Dividing the summed attention by that
count (kvpress's ObservedAttentionPress normalisation) keeps the newest tokens from being penalised for having been
seen by fewer queries. Then mean over each KV head's query group.
"""
from __future__ import annotations

import dataclasses

import torch

from ._common import attention, by_kv_head, finish, window_size
from .base import Inputs, ScoreInputs, Scorer, register


@register
@dataclasses.dataclass
class H2OScorer(Scorer):
    name = "h2o"
    inputs = Inputs(attention=True)

    def score(self, inputs: ScoreInputs):
        attn = attention(inputs, self.name)
        w = window_size(inputs, self.name)
        t = torch.arange(inputs.keys.shape[3], device=inputs.keys.device)
        seen_by = (inputs.lengths[:, None] - t[None, :]).clamp(min=0, max=w)        # [N, T]
        total = attn.mean_rows.float() * w                                          # sum over the window rows
        per_query = total / seen_by.clamp(min=1)[:, None, None, :].float()
        return finish(by_kv_head(per_query, inputs.num_kv_heads).mean(dim=3), inputs)
