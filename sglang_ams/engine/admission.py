"""Admission arithmetic: a request under a policy never holds more than its cap, so the scheduler should
reserve that much for it, not its whole max_new_tokens (R-KV's SGLang port plateaued at 411 running
requests where 885 fit because it did not)."""
from __future__ import annotations

from ..config import PolicyConfig


def admission_new_tokens(prompt_len: int, pinned_prefix: int, remaining_new: int, cfg: PolicyConfig) -> int:
    """New tokens to reserve for a request about to be admitted: its growth beyond the prompt is bounded by
    the cap, or by the lead when the prompt alone already reaches it."""
    growth = max(cfg.trigger_len(pinned_prefix) - prompt_len, cfg.lead_tokens)
    return max(0, min(remaining_new, growth))


def running_reservation(committed: int, pinned_prefix: int, cfg: PolicyConfig) -> int:
    """Upper bound of the tokens a running request may still add before compaction brings it back down."""
    return max(cfg.trigger_len(pinned_prefix) - committed, cfg.lead_tokens)
