"""Small helpers the scorers share: clear errors for missing inputs, GQA grouping, output finishing."""
from __future__ import annotations

import torch

from ..window_attention import WindowAttention
from .base import ScoreInputs


def require(inputs: ScoreInputs, field: str, scorer: str, why: str) -> None:
    if getattr(inputs, field) is None:
        raise ValueError(f"scorer {scorer!r} needs ScoreInputs.{field} ({why}); none was given")


def attention(inputs: ScoreInputs, scorer: str) -> WindowAttention:
    """Window attention, precomputed (the engine's kernel) or computed here from the window queries."""
    if inputs.attn is None:
        require(inputs, "queries", scorer, "the last W queries of each request, to compute window attention")
    return inputs.window_attention()


def window_size(inputs: ScoreInputs, scorer: str) -> int:
    if inputs.queries is not None:
        return inputs.queries.shape[3]
    if inputs.query_pos is not None:
        return inputs.query_pos.shape[1]
    raise ValueError(f"scorer {scorer!r} needs the window size: give ScoreInputs.queries or query_pos")


def by_kv_head(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[N, L, H*G, ...] → [N, L, H, G, ...]: query head h*G + g belongs to KV head h."""
    n, nl, hq = x.shape[:3]
    return x.reshape(n, nl, num_kv_heads, hq // num_kv_heads, *x.shape[3:])


def token_mask(inputs: ScoreInputs) -> torch.Tensor:
    """[N, 1, 1, T] True on valid tokens, broadcastable over layers and heads."""
    return inputs.valid_mask()[:, None, None, :]


def finish(scores: torch.Tensor, inputs: ScoreInputs) -> torch.Tensor:
    """float32 [N, L, H, T], contiguous, 0 on padding (ignored downstream, but kept finite)."""
    n, nl, h, t = inputs.keys.shape[:4]
    scores = scores.float().expand(n, nl, h, t)
    return torch.where(token_mask(inputs), scores, 0.0).contiguous()
