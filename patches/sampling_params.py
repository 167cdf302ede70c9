"""Hook on sglang.srt.sampling.sampling_params: the per-request override is validated where SGLang
validates sampling parameters, so a bad value is an HTTP 400 and never reaches the scheduler.

Requests carry it as custom_params {"kv_policy": {"budget": 512}} (native /generate: inside
sampling_params; OpenAI endpoints: the extra body field custom_params)."""
from __future__ import annotations

from sglang_ams.config import ConfigError, request_override
from sglang_ams.layer_budget import engine_refusal
from sglang_ams.engine.request_state import REQUEST_KEY
from sglang_ams.engine import settings as ams_settings


def verify_hook(result, self, *args, **kwargs):
    """Refuse a malformed override with a message naming the field (HTTP 400). Everything else is upstream's
    business: custom_params that is not a dict carries no override, and a server without a policy ignores the
    field, exactly as SGLang without the plugin does."""
    params = self.custom_params
    if not isinstance(params, dict) or REQUEST_KEY not in params:
        return result
    server = ams_settings.current()
    if server is None or not server.enabled:
        return result
    try:
        cfg = request_override(server.policy, params[REQUEST_KEY])
    except ConfigError as err:
        raise ValueError(f"custom_params.{REQUEST_KEY}: {err}") from None
    refusal = engine_refusal(cfg)
    if refusal is not None:
        raise ValueError(f"custom_params.{REQUEST_KEY}: {refusal}")
    if cfg.needs_queries and not server.policy.needs_queries:
        raise ValueError(f"custom_params.{REQUEST_KEY}: policy {cfg.policy!r} with scorer {cfg.scorer!r} needs "
                         "window queries, but this server was started with a query-free policy (no query ring)")
    return result


HOOKS = [
    ("sglang.srt.sampling.sampling_params.SamplingParams.verify", verify_hook, "after"),
]
