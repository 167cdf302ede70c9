"""Hooks on sglang.srt.managers.schedule_batch: a retracted request starts over (it is re-prefilled from its
tokens, so its logical and physical positions agree again); with a prefill window, requests whose prompt already
reaches their trigger take a query-ring row before their prefill runs."""
from __future__ import annotations

from sglang_ams.engine import request_state
from sglang_ams.engine import runtime as ams_runtime


def reset_for_retract_hook(result, self, *args, **kwargs):
    request_state.reset(self)
    return result


def prepare_for_extend_hook(result, self, *args, **kwargs):
    rt = ams_runtime.get()
    if rt is not None:
        from sglang_ams.engine.compactor import take_prefill_rows     # (it checks the flag and the ring)
        take_prefill_rows(rt, self)
    return result


HOOKS = [
    ("sglang.srt.managers.schedule_batch.Req.reset_for_retract", reset_for_retract_hook, "after"),
    ("sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend", prepare_for_extend_hook, "after"),
]
