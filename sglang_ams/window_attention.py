"""Torch reference of window attention: the Triton scoring kernel is checked against this."""
from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass
class WindowAttention:
    """Softmax probabilities of the window queries over all keys, reduced the ways the scorers need."""
    mean_rows: torch.Tensor         # [N, L, H*G, T] mean over the W rows
    last_row: torch.Tensor          # [N, L, H*G, T] the newest query's row


def causal_window_mask(lengths: torch.Tensor, window: int, num_tokens: int) -> torch.Tensor:
    """[N, W, T]: query w of request n sees key t iff t < lengths[n] and t <= lengths[n] - W + w."""
    t = torch.arange(num_tokens, device=lengths.device)
    last_seen = lengths[:, None] - window + torch.arange(window, device=lengths.device)[None, :]
    return t[None, None, :] <= last_seen[:, :, None]


def _masked_logits(keys: torch.Tensor, queries: torch.Tensor, lengths: torch.Tensor, scale: float | None):
    """Scaled logits [N, L, H, G, W, T] of every window query, -inf where the causal window mask hides a key."""
    n, nl, h, t, d = keys.shape
    hq, w = queries.shape[2], queries.shape[3]
    scale = d ** -0.5 if scale is None else scale
    q = queries.float().reshape(n, nl, h, (hq // h) * w, d)
    logits = torch.einsum("nlhrd,nlhtd->nlhrt", q, keys.float()) * scale
    logits = logits.view(n, nl, h, hq // h, w, t)
    mask = causal_window_mask(lengths, w, t)[:, None, None, None]        # [N,1,1,1,W,T]
    return logits.masked_fill(~mask, float("-inf"))


def window_attention(keys: torch.Tensor, queries: torch.Tensor, lengths: torch.Tensor,
                     scale: float | None = None) -> WindowAttention:
    n, nl, hq, w = queries.shape[:4]
    probs = torch.softmax(_masked_logits(keys, queries, lengths, scale), dim=-1).nan_to_num(0.0)
    probs = probs.reshape(n, nl, hq, w, keys.shape[3])
    return WindowAttention(mean_rows=probs.mean(dim=3), last_row=probs[:, :, :, -1])


def window_row_lse(keys: torch.Tensor, queries: torch.Tensor, lengths: torch.Tensor,
                   scale: float | None = None) -> torch.Tensor:
    """[N, L, Hq, W]: each window query's log2-sum-exp2 of its scaled logits over the keys it sees (FlashInfer's
    decode LSE convention, log2 units); -inf for a row that sees no key."""
    lse = torch.logsumexp(_masked_logits(keys, queries, lengths, scale), dim=-1) / math.log(2.0)
    return lse.reshape(queries.shape[:4])


def pool1d(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average pooling along the last dim, same length, zero padded (counted in the mean, as kvpress does)."""
    if kernel <= 1:
        return x
    shape = x.shape
    y = torch.nn.functional.avg_pool1d(x.reshape(-1, 1, shape[-1]), kernel, stride=1, padding=kernel // 2)
    return y.reshape(shape)


def attention_evidence(attn: WindowAttention, num_kv_heads: int, pool_kernel: int) -> torch.Tensor:
    """AMS evidence e[n, l, h, t]: window mean, 1-D average pool, mean over the G query heads of each KV head."""
    m = pool1d(attn.mean_rows, pool_kernel)
    n, nl, hq, t = m.shape
    return m.view(n, nl, num_kv_heads, hq // num_kv_heads, t).mean(dim=3)
