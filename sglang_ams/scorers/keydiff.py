"""KeyDiff: keys least aligned with the head's mean key direction are the most distinctive, so score = -cos(k, anchor).

anchor = mean over the request's valid tokens of the unit-normalised keys, per (layer, KV head). Query-free.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ._common import finish, token_mask
from .base import Inputs, ScoreInputs, Scorer, register


@register
@dataclasses.dataclass
class KeyDiffScorer(Scorer):
    name = "keydiff"
    inputs = Inputs(keys=True)

    def transient_bytes(self, group, window, head_dim):
        return 8 * head_dim + 16            # fp32 unit keys and their product with the anchor

    def score(self, inputs: ScoreInputs):
        unit = F.normalize(inputs.keys.float(), dim=-1)                              # [N, L, H, T, d]
        valid = token_mask(inputs)[..., None].float()                                # [N, 1, 1, T, 1]
        count = inputs.lengths.clamp(min=1).float().view(-1, 1, 1, 1)
        anchor = (unit * valid).sum(dim=3) / count                                   # [N, L, H, d]
        cos = torch.einsum("nlhtd,nlhd->nlht", unit, F.normalize(anchor, dim=-1))
        return finish(-cos, inputs)
