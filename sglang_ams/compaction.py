"""One compaction on dense tensors: score, select, gather. The CPU reference loop uses it directly;
the engine does the same steps with the Triton kernels on SGLang's KV pool."""
from __future__ import annotations

import torch

from .config import PolicyConfig
from .scorers.base import ScoreInputs, Scorer, make_scorer
from .selection import Selection, select
from .window_attention import attention_evidence


def scorer_for(cfg: PolicyConfig) -> Scorer:
    """The scorer a policy uses: streaming ignores the configured scorer."""
    return make_scorer(cfg.replace(scorer="streaming") if cfg.policy == "streaming" else cfg)


def plan(cfg: PolicyConfig, scorer: Scorer, inputs: ScoreInputs, n_pinned: torch.Tensor, n_keep: torch.Tensor,
         credit: torch.Tensor | None = None, k_max: int | None = None) -> Selection:
    """Keep indices [N, L, H, K] for a batch of requests (see selection.select)."""
    scores = scorer.score(inputs)
    evidence = None
    if cfg.policy == "ams" and cfg.use_mass:
        evidence = attention_evidence(inputs.window_attention(), inputs.num_kv_heads, cfg.pool_kernel)
    return select(cfg, scores, inputs.lengths, n_pinned, n_keep, evidence, credit, k_max)


def gather_kept(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x [N, L, H, T, d] → [N, L, H, K, d] with head h's j-th kept token in slot j (composite slots).
    Padding indices (-1) gather token 0; callers only read the first n_keep slots."""
    idx = indices.clamp(min=0)[..., None].expand(*indices.shape, x.shape[-1])
    return torch.gather(x, 3, idx)
