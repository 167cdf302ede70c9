"""Expected Attention: the attention a key should get from the *future* queries, in expectation.

Model the pre-RoPE queries as Gaussian with the window's mean μ and covariance Σ (per query head). A future query at
position p_now + δ is R(p_now + δ) q; averaging the rotation over the next n_future positions gives the block-diagonal
mean rotation R̄ (2x2 blocks, one per frequency pair), so the future query has mean μ' = R̄μ and covariance
Σ' = R̄ΣR̄ᵀ. With the attention scale s, the Gaussian moment generating function gives
    E[exp(s q·k)] = exp(s μ'·k + s² kᵀΣ'k / 2),
so the expected (unnormalised) attention has logit s μ'·k + s²/2 kᵀΣ'k; for s = 1/√d that is kvpress's
k·μ'/√d + kᵀΣ'k/(2d). Softmax over the request's keys, mean over the query group, then weight by ‖v‖ because a
token's output contribution scales with its value norm: (score + ε)·‖v_j‖.

A variant, named honestly: μ and Σ are the moments of the last W window queries only (the engine keeps no more),
not of a longer query history.
"""
from __future__ import annotations

import dataclasses

import torch

from ..rope import mean_phasor, multiply_pairs, unrotate
from ._common import by_kv_head, finish, require, token_mask
from .base import Inputs, ScoreInputs, Scorer, register


@register
@dataclasses.dataclass
class ExpectedAttentionScorer(Scorer):
    name = "expected_attention"
    inputs = Inputs(keys=True, values=True, queries=True, rope=True)
    n_future: int = 512         # future positions the rotation is averaged over
    epsilon: float = 1e-2       # keeps a small floor so ‖v‖ still ranks tokens with negligible expected attention

    def transient_bytes(self, group, window, head_dim):
        return 9 * head_dim + 8 * group * window + 16 * group + 16     # fp32 keys, per-query projections

    def score(self, inputs: ScoreInputs):
        require(inputs, "queries", self.name, "window queries give the query statistics")
        require(inputs, "query_pos", self.name, "positions to un-rotate the queries and to place the future")
        require(inputs, "rope", self.name, "the model's RoPE, to un-rotate queries")
        rope, s = inputs.rope, inputs.sm_scale
        pos = inputs.query_pos
        pre = unrotate(inputs.queries.float(), pos[:, None, None, :], rope)          # [N, L, Hq, W, d]
        offsets = torch.arange(1, self.n_future + 1, device=pos.device)
        mean_rot = mean_phasor(pos[:, -1], offsets, rope).to(pre.device)[:, None, None, None, :]  # [N,1,1,1,F]
        # R̄ is linear, so R̄ applied to each query has mean R̄μ and (biased, 1/W) covariance R̄ΣR̄ᵀ: rotating the
        # W queries and taking their moments is exact and costs O(W d) per head instead of O(d²).
        future = multiply_pairs(pre, mean_rot, rope)
        mu = future.mean(dim=3)                                                      # [N, L, Hq, d]
        centred = future - mu[:, :, :, None]                                         # [N, L, Hq, W, d]

        h = inputs.num_kv_heads
        keys = inputs.keys.float()
        mean_term = torch.einsum("nlhtd,nlhgd->nlhgt", keys, by_kv_head(mu, h))
        # kᵀΣ'k = (1/W) Σ_w (k·c_w)² with c_w the centred rotated queries.
        proj = torch.einsum("nlhtd,nlhgwd->nlhgwt", keys, by_kv_head(centred, h))
        var_term = proj.square().mean(dim=4)
        logits = s * mean_term + 0.5 * s * s * var_term                              # [N, L, H, G, T]
        logits = logits.masked_fill(~token_mask(inputs)[:, :, :, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(dim=3)            # [N, L, H, T]
        return finish((probs + self.epsilon) * inputs.values.float().norm(dim=-1), inputs)
