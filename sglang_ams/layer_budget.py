"""Per-layer KV budgets: split a request's total (layers x budget) across its layers from attention evidence.

Weight of a layer = the attention mass its uniform budget would miss: per KV head, the evidence over the
compressible region C normalised to a distribution, minus the mass of its best (budget - pinned - recent) tokens,
averaged over heads. A layer that attends to a few tokens misses little and gives tokens away; a layer whose
attention is spread misses much and receives them. The missed mass is Schur-convex in the distribution, so a more
spread layer never weighs less.

Split: every layer first gets max(floor, its pinned + recent tokens), capped at its length; the rest of the total
is apportioned by D'Hondt (the k-th extra token of layer l has priority w_l / (k + 1)), capped at each layer's
length. D'Hondt is exact in total and monotone in a layer's own weight; equal weights give a round-robin, so
uniform evidence gives the uniform split. All of it is tensor work over [requests, layers, heads, tokens].

Only the reference loop (sglang_ams.reference) applies these budgets: SGLang's KV pool addresses all layers
with one slot index, so the engine keeps equal counts per layer (docs/layer-budgets.md).
"""
from __future__ import annotations

import torch

from .config import ConfigError, PolicyConfig

FLOOR_FRACTION = 0.25        # every layer keeps at least this fraction of the uniform budget


def engine_refusal(cfg: PolicyConfig) -> ConfigError | None:
    """The error the SGLang engine raises for a policy it cannot run (adaptive layer budgets), else None."""
    if cfg.layer_budget == "uniform":
        return None
    return ConfigError("ams_layer_budget", cfg.layer_budget,
                       "uniform in the SGLang engine (its KV pool keeps the same token count in every layer); "
                       "adaptive runs in the reference loop only (sglang_ams.reference)")


def compressible(lengths: torch.Tensor, n_pinned: torch.Tensor, keep_lastn: int, t: int):
    """lengths [N, L], n_pinned [N] → (valid, comp) [N, L, T]: existing tokens, and the region C between the
    pinned front and the recent tail (as selection._regions, per layer)."""
    pos = torch.arange(t, device=lengths.device)
    length = lengths[..., None]
    valid = pos < length
    comp = (pos >= n_pinned.view(-1, 1, 1)) & (pos < length - keep_lastn)
    return valid, comp


def missed_mass(evidence: torch.Tensor, comp: torch.Tensor, keep_c: torch.Tensor) -> torch.Tensor:
    """[N, L] mean over heads of the evidence mass over C outside each head's best keep_c [N, L] tokens.

    evidence [N, L, H, T]; negative and non-finite values count as no mass; a head with no mass is uniform."""
    m = comp[:, :, None, :]
    e = torch.where(m & torch.isfinite(evidence), evidence.double(), 0.0).clamp(min=0.0)
    total = e.sum(-1, keepdim=True)
    uniform = m.double() / m.sum(-1, keepdim=True).clamp(min=1)
    p = torch.where(total > 0, e / total.clamp(min=1e-300), uniform)
    top = torch.sort(p, dim=-1, descending=True).values.cumsum(-1)
    k = keep_c.clamp(min=0, max=p.shape[-1])[:, :, None, None].expand(*p.shape[:3], 1)
    captured = torch.where(k > 0, top.gather(-1, (k - 1).clamp(min=0)), 0.0).squeeze(-1)
    has_c = comp.any(-1)
    return torch.where(has_c, (1.0 - captured).clamp(min=0.0).mean(-1), 0.0)


def apportion(weights: torch.Tensor, base: torch.Tensor, capacity: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """[N, L] int64: base + a D'Hondt share of total - sum(base) by weights, each layer capped at capacity.

    Ties (equal priorities) go to the smaller extra index first, then the lower layer: equal weights and room
    give a round-robin. Sums to min(total, sum(capacity)) when base <= capacity and sum(base) <= total."""
    n, nl = weights.shape
    w = torch.nan_to_num(weights.double(), nan=0.0, posinf=1e300, neginf=0.0).clamp(min=0.0)
    room = (capacity - base).clamp(min=0)
    rest = (total - base.sum(-1)).clamp(min=0)                                   # [N]
    m = int(torch.minimum(room.amax(-1), rest).max()) if n else 0
    if m == 0:
        return base.clone()
    k = torch.arange(m, device=w.device)
    prio = w[:, None, :] / (k[None, :, None] + 1).double()                       # [N, M, L], extra-major
    prio = torch.where(k[None, :, None] < room[:, None, :], prio, float("-inf")).reshape(n, m * nl)
    order = torch.sort(prio, dim=-1, descending=True, stable=True).indices
    take = torch.arange(m * nl, device=w.device)[None, :] < rest[:, None]
    take = take & torch.isfinite(prio.gather(1, order))
    chosen = torch.zeros(n, m * nl, dtype=torch.long, device=w.device).scatter_(1, order, take.long())
    return base + chosen.view(n, m, nl).sum(1)


def layer_budgets(evidence: torch.Tensor, lengths: torch.Tensor, n_pinned: torch.Tensor, keep_lastn: int,
                  budget: torch.Tensor | int, floor_fraction: float | None = None) -> torch.Tensor:
    """Tokens each layer keeps [N, L] (pinned and recent included) so that a request keeps L x budget in all.

    evidence [N, L, H, T] attention evidence (selection's AMS evidence) of every layer's current tokens;
    lengths [N, L] tokens per layer; n_pinned [N]; budget: the uniform per-layer budget [N] or an int;
    floor_fraction: default FLOOR_FRACTION (read at call time)."""
    floor_fraction = FLOOR_FRACTION if floor_fraction is None else floor_fraction
    n, nl, _, t = evidence.shape
    lengths = lengths.long()
    budget = torch.as_tensor(budget, dtype=torch.long, device=lengths.device).expand(n)
    valid, comp = compressible(lengths, n_pinned.long(), keep_lastn, t)
    forced = (valid & ~comp).sum(-1)                                             # pinned + recent per layer
    floor = torch.ceil(budget.double() * floor_fraction).long()[:, None].expand_as(forced)
    base = torch.minimum(torch.maximum(floor, forced), lengths)
    weights = missed_mass(evidence, comp, budget[:, None] - forced)
    return apportion(weights, base, lengths, budget * nl)


def plan_layers(cfg: PolicyConfig, scorer, inputs, n_pinned: torch.Tensor, credit: torch.Tensor | None = None):
    """One compaction with per-layer budgets; the reference loop's layers travel as the batch dimension.

    inputs: ScoreInputs whose keys are [L, 1, H, T, d] (layer l as request l, lengths [L] its own length), so the
    scorers, window attention and selection run unchanged with per-layer lengths. Returns (Selection [L, 1, H, K],
    budgets [L])."""
    from .window_attention import attention_evidence

    scores = scorer.score(inputs)
    evidence = attention_evidence(inputs.window_attention(), inputs.num_kv_heads, cfg.pool_kernel)
    pinned = n_pinned.reshape(1)
    budgets = layer_budgets(evidence.transpose(0, 1), inputs.lengths[None], pinned, cfg.keep_lastn,
                            cfg.budget)[0]
    selection = cfg.selector.select(scores, inputs, pinned.expand(budgets.shape[0]), budgets, credit,
                                    int(budgets.max()))
    return selection, budgets


def total_is_exact(budgets: torch.Tensor, lengths: torch.Tensor, budget: int) -> bool:
    """Whether a split keeps exactly layers x budget (or every token when the layers hold fewer)."""
    want = min(budgets.shape[-1] * budget, int(lengths.sum()))
    return int(budgets.sum()) == want and bool((budgets <= lengths).all())


