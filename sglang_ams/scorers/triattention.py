"""TriAttention: score post-RoPE keys by the attention that calibrated query statistics predict at future offsets.

Per (layer, query head, frequency pair f) the pre-RoPE query statistics are E[q_f] (complex) and E|q_f|. For a
post-RoPE key with complex pairs k'_f, the newest query position p_now and ω_f = inv_freq[f]:
    S(k, δ) = Re Σ_f E[q_f] · conj(k'_f) · exp(i ω_f (p_now + δ))  +  Σ_f (E|q_f| − |E[q_f]|) · |k'_f|,
    score(k) = mean over δ ∈ {1, 2, 4, …, 2^16} of S(k, δ).
Why this is the paper's form: the key was rotated at its own position, k'_f = k_f·exp(i ω_f p_k), and a future query
at p_now + δ is E[q_f]·exp(i ω_f (p_now + δ)). Their 2-D dot product is Re(q'·conj(k')) =
|E[q_f]||k_f| cos(ω_f (p_now − p_k + δ) + arg E[q_f] − arg k_f) = |E[q_f]||k_f| cos(ω_f(Δ+δ) + φ_f), and
|k'_f| = |k_f|. So post-RoPE keys need no positions, and since S is linear in exp(i ω_f δ) the mean over δ folds into
one complex factor per (request, f) (rope.mean_phasor).
GQA: each query head's scores are z-scored over the request's valid tokens (population std), then max over the group.

Statistics: from cfg.triattention_stats (see triattention_calib) when set, this process's query heads taken from
the file's model-wide ones (ScoreInputs.heads: a tensor-parallel rank holds a slice); else estimated per request
from its window queries, un-rotated to pre-RoPE and averaged over the window. Without a stats file the scorer needs
the queries; with one it needs only query_pos (for p_now).
"""
from __future__ import annotations

import dataclasses

import torch

from ..rope import mean_phasor, to_complex, unrotate
from ._common import by_kv_head, finish, require, token_mask
from .base import Inputs, ScoreInputs, Scorer, config_field, register


@register
@dataclasses.dataclass
class TriAttentionScorer(Scorer):
    name = "triattention"
    stats: str = config_field("triattention_stats")     # calibration file; empty: statistics from the window
    max_log2_offset: int = 16      # δ ∈ {2^0, …, 2^16}
    zscore_eps: float = 1e-6
    _calibrated: tuple | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @property
    def needs(self) -> Inputs:
        # The newest position always; the window queries only when no stats file supplies the statistics.
        return Inputs(keys=True, rope=True, positions=True, queries=not self.stats)

    def transient_bytes(self, group, window, head_dim):
        return 13 * head_dim + 16 * group + 64                        # complex keys, per-query-head scores

    def _calibration(self, inputs: ScoreInputs):
        if self._calibrated is None:
            from .triattention_calib import load_stats
            stats = load_stats(self.stats)
            self._calibrated = (stats.q_mean, stats.q_abs_mean, stats.style)
        q_mean, q_abs, style = self._calibrated
        if style != inputs.rope.style:
            raise ValueError(f"triattention stats {self.stats!r} pair dims {style}-style; the "
                             f"model's RoPE is {inputs.rope.style}-style")
        n, nl, h = inputs.keys.shape[:3]
        freqs = inputs.rope.inv_freq.numel()
        model_layers = inputs.model_layers or nl
        heads = inputs.heads
        # The file covers the model's query heads; a TP rank takes its own slice of them.
        q_heads = slice(None) if heads is None else slice(heads.q_start, heads.q_start + heads.q_count)
        want = f"{heads.model_q_heads}" if heads is not None else f"a multiple of {h}"
        if q_mean.shape[0] != model_layers or q_mean.shape[2] != freqs or \
                (q_mean.shape[1] % h if heads is None else q_mean.shape[1] != heads.model_q_heads):
            raise ValueError(f"triattention stats {self.stats!r} have [layers, q heads, freqs] = "
                             f"{list(q_mean.shape)}; the model needs {model_layers} layers, {want} q heads and "
                             f"{freqs} frequency pairs")
        device = inputs.keys.device
        layers = slice(inputs.layer_start, inputs.layer_start + nl)
        return q_mean[layers, q_heads].to(device)[None], q_abs[layers, q_heads].to(device)[None]   # [1, L, Hq, F]

    def _window_statistics(self, inputs: ScoreInputs):
        require(inputs, "queries", self.name, "no cfg.triattention_stats, so query statistics come from the window")
        pre = unrotate(inputs.queries.float(), inputs.query_pos[:, None, None, :], inputs.rope)
        pairs = to_complex(pre, inputs.rope)                                           # [N, L, Hq, W, F]
        return pairs.mean(dim=3), pairs.abs().mean(dim=3)

    def score(self, inputs: ScoreInputs):
        require(inputs, "rope", self.name, "the model's RoPE frequencies")
        require(inputs, "query_pos", self.name, "the newest query position")
        rope = inputs.rope
        q_mean, q_abs = self._calibration(inputs) if self.stats else self._window_statistics(inputs)
        offsets = 2 ** torch.arange(self.max_log2_offset + 1, device=inputs.query_pos.device)
        future = mean_phasor(inputs.query_pos[:, -1], offsets, rope)[:, None, None, :]   # [N, 1, 1, F]
        centre = q_mean * future.to(q_mean.device, q_mean.dtype)                    # [N, L, Hq, F]
        spread = q_abs - q_mean.abs()

        # Re(c · conj(k)) = Re c Re k + Im c Im k: one real contraction over [Re, Im, |·|] features.
        keys = to_complex(inputs.keys.float(), rope)                                   # [N, L, H, T, F]
        key_feat = torch.cat([keys.real, keys.imag, keys.abs()], dim=-1)
        query_feat = torch.cat([centre.real, centre.imag, spread.expand_as(centre.real)], dim=-1)
        h = inputs.num_kv_heads
        raw = torch.einsum("nlhtf,nlhgf->nlhgt", key_feat, by_kv_head(query_feat, h))   # [N, L, H, G, T]
        return finish(self._zscore(raw, inputs).amax(dim=3), inputs)

    def _zscore(self, raw: torch.Tensor, inputs: ScoreInputs) -> torch.Tensor:
        valid = token_mask(inputs)[:, :, :, None]                                      # [N, 1, 1, 1, T]
        count = inputs.lengths.clamp(min=1).float().view(-1, 1, 1, 1, 1)
        mean = torch.where(valid, raw, 0.0).sum(-1, keepdim=True) / count
        var = torch.where(valid, (raw - mean).square(), 0.0).sum(-1, keepdim=True) / count
        z = (raw - mean) / (var.sqrt() + self.zscore_eps)
        return torch.where(valid, z, float("-inf"))
