"""R-KV: attention importance minus key redundancy, score = λ·imp − (1−λ)·red.

imp: window-mean attention, 1-D max pool (kernel 7, same length), max over the KV head's query group.
red, per (request, layer, KV head) over the valid keys: cosine-similarity matrix S with zero diagonal; in every
row i, the most recent other token j (largest index) with S[i, j] > 0.5 is exempted (S[i, j] := 0, R-KV's
retain_direction="last": the newest near-duplicate is the copy to keep); red_j = softmax_j(mean_i S[i, j]), the mean
over the len rows. A row with no neighbour above the threshold exempts nothing (R-KV's reference code would then
zero column 0 of that row, an artefact of taking the max of a zero-filled index tensor).

S is O(T²) per head, so it is built in tiles of (heads, rows) under a fixed memory cap (`max_tile_bytes`): every
step is row-local except the column mean, which is accumulated across tiles. That loop runs over memory chunks only.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ._common import attention, by_kv_head, finish
from .base import Inputs, ScoreInputs, Scorer, register


@register
@dataclasses.dataclass
class RKVScorer(Scorer):
    name = "rkv"
    inputs = Inputs(keys=True, attention=True)
    pool_kernel: int = 7                # max pool of the importance (R-KV's own, not cfg.pool_kernel)
    importance_weight: float = 0.1      # λ (R-KV README)
    similarity_threshold: float = 0.5
    max_tile_bytes: int = 256 << 20
    _bytes_per_entry = 16               # similarity (4) + index (8) + masks, per S entry in a tile

    @property
    def fixed_bytes(self) -> int:
        return 3 * self.max_tile_bytes // 2

    def transient_bytes(self, group, window, head_dim):
        return 4 * head_dim + 8 * group + 64                          # unit keys; pooled attention

    def score(self, inputs: ScoreInputs):
        attn = attention(inputs, self.name)
        n, nl, hq, t = attn.mean_rows.shape
        pooled = F.max_pool1d(attn.mean_rows.float().reshape(-1, 1, t), self.pool_kernel, stride=1,
                              padding=self.pool_kernel // 2).reshape(n, nl, hq, t)
        imp = by_kv_head(pooled, inputs.num_kv_heads).amax(dim=3)
        lam = self.importance_weight
        return finish(lam * imp - (1.0 - lam) * self.redundancy(inputs), inputs)

    def redundancy(self, inputs: ScoreInputs) -> torch.Tensor:
        n, nl, h, t, d = inputs.keys.shape
        unit = F.normalize(inputs.keys.float(), dim=-1).reshape(n * nl * h, t, d)
        lengths = inputs.lengths.repeat_interleave(nl * h)                           # [R]
        tokens = torch.arange(t, device=unit.device)
        column_sum = torch.zeros(unit.shape[0], t, device=unit.device)

        entries = max(1, self.max_tile_bytes // self._bytes_per_entry)
        rows_per_tile = max(1, min(t, entries // max(t, 1)))
        heads_per_tile = max(1, entries // (rows_per_tile * max(t, 1)))
        for h0 in range(0, unit.shape[0], heads_per_tile):
            keys = unit[h0:h0 + heads_per_tile]
            length = lengths[h0:h0 + heads_per_tile, None, None]
            for i0 in range(0, t, rows_per_tile):
                rows = tokens[i0:i0 + rows_per_tile]
                sim = keys[:, i0:i0 + rows_per_tile] @ keys.transpose(1, 2)           # [c, r, T]
                outside = (rows[None, :, None] >= length) | (tokens[None, None, :] >= length) | \
                    (rows[:, None] == tokens[None, :])[None]
                sim = sim.masked_fill(outside, 0.0)
                similar = sim > self.similarity_threshold
                newest = torch.where(similar, tokens, -1).amax(dim=-1, keepdim=True)    # [c, r, 1], -1: none
                sim = sim.masked_fill(tokens == newest, 0.0)
                column_sum[h0:h0 + heads_per_tile] += sim.sum(dim=1)
        mean_sim = column_sum / lengths.clamp(min=1)[:, None].float()
        mean_sim = mean_sim.masked_fill(tokens[None, :] >= lengths[:, None], float("-inf"))
        return torch.softmax(mean_sim, dim=-1).nan_to_num(0.0).view(n, nl, h, t)
