"""The policies that choose tokens from scores: one dataclass each (its hyper-parameters are its fields, taken from
the PolicyConfig), in one registry. Each declares the inputs it reads beyond its scorer's, whether it carries
credit, and its memory per (row, token); the compactor and the reference loop only ask."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from .scorers.base import Inputs, ScoreInputs
from .selection import Selection, select_ams, select_topk
from .window_attention import attention_evidence


@dataclasses.dataclass(frozen=True)
class Selector:
    name: ClassVar[str]
    scorer: ClassVar[str | None] = None     # a scorer the policy always uses (None: cfg.scorer)
    select_bytes: ClassVar[int] = 48        # selection's peak per (row, token), measured (top-k ~37)
    keep_lastn: int = 32

    @classmethod
    def from_config(cls, cfg) -> "Selector":
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    @property
    def needs(self) -> Inputs:
        return Inputs()

    @property
    def uses_credit(self) -> bool:
        return False

    def transient_bytes(self, group: int) -> int:
        """Bytes per (request, layer, KV head, token) of selection and what it adds to the scorer's inputs."""
        return self.select_bytes

    def select(self, scores: torch.Tensor, inputs: ScoreInputs, n_pinned: torch.Tensor, n_keep: torch.Tensor,
               credit: torch.Tensor | None = None, k_max: int | None = None, kernel: bool = False) -> Selection:
        return select_topk(scores, inputs.lengths, n_pinned, n_keep, self.keep_lastn, k_max)


SELECTORS: dict[str, type[Selector]] = {}


def register(cls: type[Selector]) -> type[Selector]:
    SELECTORS[cls.name] = cls
    return cls


@register
@dataclasses.dataclass(frozen=True)
class TopK(Selector):
    """Global top-k of the scorer's scores over the compressible tokens."""
    name = "topk"


@register
@dataclasses.dataclass(frozen=True)
class AMS(Selector):
    """Adaptive mass-segmented selection (selection.select_ams): its fields are the AMS settings."""
    name = "ams"
    select_bytes = 160                       # measured ~130
    pool_kernel: int = 5
    delta: float = 0.02
    lmin: int = 32
    lmax: int = 1024
    qmin: int = 8
    credit_decay: float = 0.8
    mass_mix: float = 0.7
    segmenter: str = "equal_mass"
    use_credit: bool = True
    use_mass: bool = True

    @property
    def needs(self) -> Inputs:
        # The mass is window attention. The window queries are collected even with use_mass off, so the mass
        # ablation compacts at the same points as AMS.
        return Inputs(queries=True, attention=self.use_mass)

    @property
    def uses_credit(self) -> bool:
        return self.use_credit

    def transient_bytes(self, group: int) -> int:
        extra = 4 * group + 4 if self.use_mass else 0      # evidence: pooled mean rows, mean over the group
        return self.select_bytes + extra + (4 if self.use_credit else 0)   # credit laid out over the tokens

    def select(self, scores, inputs, n_pinned, n_keep, credit=None, k_max=None, kernel=False):
        evidence = None
        if self.use_mass:
            evidence = attention_evidence(inputs.window_attention(), inputs.num_kv_heads, self.pool_kernel)
        return select_ams(scores, evidence, inputs.lengths, n_pinned, n_keep, self, credit, k_max, kernel)


@register
@dataclasses.dataclass(frozen=True)
class Streaming(TopK):
    """StreamingLLM: the sink and the most recent tokens, by top-k of the recency scorer."""
    name = "streaming"
    scorer = "streaming"
