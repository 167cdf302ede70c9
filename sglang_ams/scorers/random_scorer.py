"""Random baseline: uniform scores from a generator seeded once with cfg.seed (deterministic sequence per scorer)."""
from __future__ import annotations

import torch

from ._common import finish
from .base import ScoreInputs, Scorer, register


@register
class RandomScorer(Scorer):
    name = "random"
    needs_queries = False
    reads_kv = False

    def transient_bytes(self, group, window, head_dim):
        return 16

    def __init__(self, cfg):
        super().__init__(cfg)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.cfg.seed)
        return self._generators[device]

    def score(self, inputs: ScoreInputs):
        device = inputs.keys.device
        scores = torch.rand(inputs.keys.shape[:4], generator=self._generator(device), device=device)
        return finish(scores, inputs)
