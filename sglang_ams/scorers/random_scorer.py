"""Random baseline: uniform scores from a generator seeded once with cfg.seed (deterministic sequence per scorer)."""
from __future__ import annotations

import dataclasses

import torch

from ._common import finish
from .base import Inputs, ScoreInputs, Scorer, config_field, register


@register
@dataclasses.dataclass
class RandomScorer(Scorer):
    name = "random"
    inputs = Inputs()
    seed: int = config_field("seed")
    _generators: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def transient_bytes(self, group, window, head_dim):
        return 16

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def score(self, inputs: ScoreInputs):
        device = inputs.keys.device
        scores = torch.rand(inputs.keys.shape[:4], generator=self._generator(device), device=device)
        return finish(scores, inputs)
