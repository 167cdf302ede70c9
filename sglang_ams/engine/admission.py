"""Admission arithmetic: a request under a policy never holds more than its cap, so the scheduler should
reserve that much for it, not its whole max_new_tokens (R-KV's SGLang port plateaued at 411 running
requests where 885 fit because it did not)."""
from __future__ import annotations

from ..config import PolicyConfig


def admission_new_tokens(prompt_len: int, pinned_prefix: int, remaining_new: int, cfg: PolicyConfig,
                         overdue_wait: int = 0) -> int:
    """New tokens to reserve for a request about to be admitted: its growth beyond the prompt is bounded by
    the cap, or by the lead when the prompt and the lead pass it. Such a request may become ready only past its
    trigger, and pacing may then let it wait `overdue_wait` tokens more (EngineSettings.overdue_wait)."""
    cap = cfg.trigger_len(pinned_prefix)
    growth = max(cap - prompt_len, cfg.lead_tokens + _wait(prompt_len, cap, cfg, overdue_wait))
    return max(0, min(remaining_new, growth))


def running_reservation(committed: int, pinned_prefix: int, cfg: PolicyConfig, overdue_wait: int = 0) -> int:
    """Upper bound of the tokens a running request may still add before compaction brings it back down."""
    cap = cfg.trigger_len(pinned_prefix)
    return max(cap - committed, cfg.lead_tokens + _wait(committed, cap, cfg, overdue_wait))


def _wait(length: int, cap: int, cfg: PolicyConfig, overdue_wait: int) -> int:
    # Within a lead of the cap a request may become ready only past it: the overdue wait applies from there.
    return overdue_wait if length + cfg.lead_tokens > cap else 0
