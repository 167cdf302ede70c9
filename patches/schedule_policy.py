"""Hooks on sglang.srt.managers.schedule_policy (PrefillAdder) and Scheduler.init_req_max_new_tokens:
admission counts each policy request's cap, so memory freed by compaction admits new requests."""
from __future__ import annotations

from sglang_ams.engine import admission, request_state
from sglang_ams.engine import sglang_compat as compat

ADDER = "sglang.srt.managers.schedule_policy.PrefillAdder"


def _pinned_at_admission(rt, req) -> int:
    if rt.settings.prompt_cache == "cached":
        return len(req.origin_input_ids) // rt.page_size * rt.page_size   # the prompt will be tree-owned
    return compat.prefix_len(req)


def running_offset_hook(orig, self, req):
    value = orig(self, req)
    rt, st = request_state.lookup(req)
    if st is None:
        return value
    bound = admission.running_reservation(compat.committed_len(req), compat.protected_len(req), st.cfg,
                                          rt.settings.overdue_wait(st.cfg.interval))
    return min(value, bound)


def _clamped(orig, self, req, *args, **kwargs):
    """Run an admission check with max_new_tokens reduced to what the request can really hold."""
    rt, st = request_state.lookup(req)
    if st is None:
        return orig(self, req, *args, **kwargs)
    sp = req.sampling_params
    saved = sp.max_new_tokens
    done = len(req.output_ids)
    prompt_len = len(req.origin_input_ids) + done
    new = admission.admission_new_tokens(prompt_len, _pinned_at_admission(rt, req), max(saved - done, 0), st.cfg,
                                         rt.settings.overdue_wait(st.cfg.interval))
    sp.max_new_tokens = done + new
    try:
        return orig(self, req, *args, **kwargs)
    finally:
        sp.max_new_tokens = saved


def add_one_req_hook(orig, self, req, *args, **kwargs):
    return _clamped(orig, self, req, *args, **kwargs)


def add_chunked_req_hook(orig, self, req, *args, **kwargs):
    return _clamped(orig, self, req, *args, **kwargs)


def init_req_max_new_tokens_hook(orig, self, req):
    """Compaction keeps a request within its cap, so the KV pool size no longer bounds its output length;
    the context length (RoPE positions) still does."""
    requested = req.sampling_params.max_new_tokens
    orig(self, req)
    rt, st = request_state.lookup(req)
    if st is None or getattr(req, "to_finish", None) is not None:     # (newer SGLang aborts prompts too long here)
        return
    limit = requested if requested is not None else 1 << 30
    if self.max_new_tokens_limit:
        limit = min(limit, self.max_new_tokens_limit)
    req.sampling_params.max_new_tokens = max(0, min(limit, self.max_req_len - len(req.origin_input_ids) - 1))


HOOKS = [
    (ADDER + "._get_running_request_total_token_offset", running_offset_hook, "around"),
    (ADDER + ".add_one_req", add_one_req_hook, "around"),
    (ADDER + ".add_chunked_req", add_chunked_req_hook, "around"),
    ("sglang.srt.managers.scheduler.Scheduler.init_req_max_new_tokens", init_req_max_new_tokens_hook, "around"),
]
