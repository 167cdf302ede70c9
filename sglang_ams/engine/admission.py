"""Admission arithmetic: a request under a policy never holds more than its cap, so the scheduler should
reserve that much for it, not its whole max_new_tokens (R-KV's SGLang port plateaued at 411 running
requests where 885 fit because it did not)."""
from __future__ import annotations

from ..config import PolicyConfig

MIN_DECODE_STEPS = 2   # why: compactor.py (defined here so the admission arithmetic needs no Triton import)


def lead_tokens(cfg: PolicyConfig) -> int:
    """Tokens a request may decode past its trigger before it can compact: MIN_DECODE_STEPS steps before it may
    take a query-ring row, then a full window of queries written after that (the two add up, they don't overlap)."""
    return cfg.window + MIN_DECODE_STEPS if cfg.needs_queries else MIN_DECODE_STEPS


def cap(pinned_prefix: int, cfg: PolicyConfig) -> int:
    """Physical length that triggers compaction."""
    return pinned_prefix + cfg.budget + cfg.interval


def admission_new_tokens(prompt_len: int, pinned_prefix: int, remaining_new: int, cfg: PolicyConfig) -> int:
    """New tokens to reserve for a request about to be admitted: its growth beyond the prompt is bounded by
    the cap, or by the lead when the prompt alone already reaches it."""
    growth = max(cap(pinned_prefix, cfg) - prompt_len, lead_tokens(cfg))
    return max(0, min(remaining_new, growth))


def running_reservation(committed: int, pinned_prefix: int, cfg: PolicyConfig) -> int:
    """Upper bound of the tokens a running request may still add before compaction brings it back down."""
    return max(cap(pinned_prefix, cfg) - committed, lead_tokens(cfg))
