"""Hook on sglang.srt.sampling.sampling_params: with a KV policy on, a request asking for beam search
(`beam_width` > 1, SGLang 0.5.2x) is refused where SGLang validates sampling parameters (an HTTP 400): beams fork
and share a request's KV rows, which compaction would move under the other beams."""
from __future__ import annotations

from sglang_ams.engine import settings as ams_settings


def verify_hook(result, self, *args, **kwargs):
    width = getattr(self, "beam_width", None)        # (an SGLang without beam search has no such field)
    if width is None or width <= 1:
        return result
    server = ams_settings.current()
    if server is not None and server.enabled:
        raise ValueError(f"beam_width={width}: this server runs with --kv-policy {server.policy.policy}, which "
                         "cannot be combined with beam search (beams share KV that compaction moves)")
    return result


HOOKS = [
    ("sglang.srt.sampling.sampling_params.SamplingParams.verify", verify_hook, "after"),
]
