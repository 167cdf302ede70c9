"""One compaction on dense tensors: score, select, gather. The CPU reference loop uses it directly;
the engine does the same steps with the Triton kernels on SGLang's KV pool."""
from __future__ import annotations

import torch

from .config import PolicyConfig
from .scorers.base import ScoreInputs, Scorer
from .scorers.builtin import make_scorer
from .selection import Selection


def scorer_for(cfg: PolicyConfig) -> Scorer:
    """The scorer a policy runs (its selector may fix one: streaming ignores the configured scorer)."""
    return make_scorer(cfg, cfg.scorer_name)


def plan(cfg: PolicyConfig, scorer: Scorer, inputs: ScoreInputs, n_pinned: torch.Tensor, n_keep: torch.Tensor,
         credit: torch.Tensor | None = None, k_max: int | None = None, kernel: bool = False) -> Selection:
    """Keep indices [N, L, H, K] for a batch of requests: the scorer's scores, then the policy's selector
    (kernel: AMS selects in one Triton launch where its rows fit)."""
    return cfg.selector.select(scorer.score(inputs), inputs, n_pinned, n_keep, credit, k_max, kernel)


def gather_kept(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x [N, L, H, T, d] → [N, L, H, K, d] with head h's j-th kept token in slot j (composite slots).
    Padding indices (-1) gather token 0; callers only read the first n_keep slots."""
    idx = indices.clamp(min=0)[..., None].expand(*indices.shape, x.shape[-1])
    return torch.gather(x, 3, idx)
