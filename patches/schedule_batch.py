"""Hooks on sglang.srt.managers.schedule_batch: a retracted request starts over (it is re-prefilled from its
tokens, so its logical and physical positions agree again)."""
from __future__ import annotations

from sglang_ams.engine import request_state


def reset_for_retract_hook(result, self, *args, **kwargs):
    request_state.reset(self)
    return result


HOOKS = [
    ("sglang.srt.managers.schedule_batch.Req.reset_for_retract", reset_for_retract_hook, "after"),
]
