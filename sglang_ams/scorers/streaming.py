"""StreamingLLM: recency. The sink tokens are pinned by selection; the scorer only prefers recent tokens."""
from __future__ import annotations

import dataclasses

import torch

from ._common import finish
from .base import Inputs, ScoreInputs, Scorer, register


@register
@dataclasses.dataclass
class StreamingScorer(Scorer):
    name = "streaming"
    inputs = Inputs()

    def transient_bytes(self, group, window, head_dim):
        return 8

    def score(self, inputs: ScoreInputs):
        t = torch.arange(inputs.keys.shape[3], device=inputs.keys.device, dtype=torch.float32)
        return finish(t.view(1, 1, 1, -1), inputs)
