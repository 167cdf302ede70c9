"""Hooks registered on SGLang (installed as sglang_ams.patches), grouped by the SGLang module they touch.

Flag hooks are registered in every process. Engine hooks are registered only in processes started with a
policy on (the scheduler processes, which see AMS_KV_CONFIG), so with --kv-policy none SGLang runs untouched.
"""
from __future__ import annotations

from sglang_ams.engine import settings as ams_settings

_KINDS = {"before", "after", "around", "replace"}


def flag_hooks() -> list:
    from . import sampling_params, server_args
    return server_args.HOOKS + sampling_params.HOOKS


def engine_hooks() -> list:
    from . import (flashinfer_decode, forward_batch, mem_cache, prefill_window, radix_attention, schedule_batch,
                   schedule_policy, scheduler)
    return (scheduler.HOOKS + schedule_batch.HOOKS + mem_cache.HOOKS + forward_batch.HOOKS
            + radix_attention.HOOKS + flashinfer_decode.HOOKS + prefill_window.HOOKS + schedule_policy.HOOKS)


def wanted_hooks() -> list:
    settings = ams_settings.from_environment()
    hooks = flag_hooks()
    if settings is not None and settings.enabled:
        hooks = hooks + engine_hooks()
    return hooks


def register_all() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    for target, fn, kind in wanted_hooks():
        assert kind in _KINDS, kind
        HookRegistry.register(target, fn, HookType(kind))


def missing_hooks(hooks: list | None = None) -> list[str]:
    """Targets of our hooks that SGLang did not patch (it only logs such failures)."""
    from sglang.srt.plugins.hook_registry import HookRegistry
    targets = {t for t, _, _ in (hooks if hooks is not None else wanted_hooks())}
    return sorted(t for t in targets if t not in HookRegistry._patched)


def verify_applied(hooks: list | None = None, where: str = "this process") -> None:
    missing = missing_hooks(hooks)
    if missing:
        raise RuntimeError(f"sglang-ams: {len(missing)} hook(s) failed to apply in {where}: {', '.join(missing)}. "
                           "SGLang's log shows why; the plugin refuses to run with a policy half-installed.")
