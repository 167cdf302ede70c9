"""Hooks registered on SGLang (installed as sglang_ams.patches), grouped by the SGLang module they touch.

Flag hooks are registered in every process. Engine hooks are registered only in processes started with a
policy on (the scheduler processes, which see AMS_KV_CONFIG), so with --kv-policy none SGLang runs untouched.
Each module's hook list is chosen for the SGLang it runs on (engine/sglang_compat.py detects the behaviours), and
an SGLang outside the supported range gets no hooks at all.
"""
from __future__ import annotations

import logging

from sglang_ams.engine import settings as ams_settings
from sglang_ams.engine import sglang_compat

logger = logging.getLogger("sglang_ams")

_KINDS = {"before", "after", "around", "replace"}


def flag_hooks() -> list:
    from . import beam_search, sampling_params, server_args
    return server_args.hooks() + sampling_params.HOOKS + beam_search.HOOKS


def engine_hooks() -> list:
    from . import (flashinfer_decode, forward_batch, mem_cache, prefill_window, radix_attention, schedule_batch,
                   schedule_policy, scheduler)
    return (scheduler.HOOKS + schedule_batch.HOOKS + mem_cache.HOOKS + mem_cache.tree_hooks() + forward_batch.HOOKS
            + radix_attention.HOOKS + flashinfer_decode.HOOKS + prefill_window.HOOKS + schedule_policy.HOOKS)


def wanted_hooks() -> list:
    settings = ams_settings.current()
    hooks = flag_hooks()
    if settings is not None and settings.enabled:
        hooks = hooks + engine_hooks()
    return hooks


def supported_sglang() -> bool:
    """Whether this SGLang is in the supported range (logs why not, or that it is untested)."""
    version = sglang_compat.sglang_version()
    status = sglang_compat.version_status(version)
    if status == "unsupported":
        logger.warning("sglang-ams: SGLang %s is outside the supported range (%s); the plugin registers no hooks "
                       "and --kv-policy is not available", version, sglang_compat.SUPPORTED_SPEC)
        return False
    if status == "untested":
        logger.warning("sglang-ams: SGLang %s is inside the supported range (%s) but untested (tested: %s)",
                       version, sglang_compat.SUPPORTED_SPEC,
                       ", ".join(".".join(map(str, v)) for v in sglang_compat.TESTED))
    return True


def register_all() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    if not supported_sglang():
        return
    for target, fn, kind in wanted_hooks():
        assert kind in _KINDS, kind
        HookRegistry.register(target, fn, HookType(kind))
    if sglang_compat.features().struct_server_args:
        from .server_args import take_first_engine_call
        take_first_engine_call()


def missing_hooks(hooks: list | None = None) -> list[str]:
    """Targets of our hooks that SGLang did not patch (it only logs such failures)."""
    from sglang.srt.plugins.hook_registry import HookRegistry
    targets = {t for t, _, _ in (hooks if hooks is not None else wanted_hooks())}
    return sorted(t for t in targets if t not in HookRegistry._patched)


def _runs(wrapper, fn) -> bool:
    """Whether fn is in the chain of HookRegistry wrappers (each closes over its hook and its original)."""
    while wrapper is not None:
        if any(cell.cell_contents is fn for cell in (getattr(wrapper, "__closure__", None) or ())):
            return True
        wrapper = getattr(wrapper, "__wrapped__", None)
    return False


def dead_hooks(hooks: list | None = None) -> list[str]:
    """Targets HookRegistry records as patched whose hook can never run: the attribute is not our wrapper (it
    was replaced again), or the class never calls it (a msgspec Struct's __init__ and __post_init__ are C slots
    fixed when the class was made)."""
    import pkgutil
    from sglang.srt.plugins.hook_registry import HookRegistry
    dead = []
    for target, fn, _ in (hooks if hooks is not None else wanted_hooks()):
        if target not in HookRegistry._patched:
            continue
        owner_path, attr = target.rsplit(".", 1)
        owner = pkgutil.resolve_name(owner_path)
        raw = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
        raw = getattr(raw, "__func__", raw)                  # classmethod / staticmethod
        if isinstance(owner, type) and hasattr(owner, "__struct_fields__") and attr in ("__init__", "__new__",
                                                                                         "__post_init__"):
            dead.append(f"{target} (a msgspec Struct never calls a Python {attr})")
        elif not _runs(raw, fn):
            dead.append(f"{target} (the attribute is no longer the hook's wrapper)")
    return sorted(set(dead))


def verify_applied(hooks: list | None = None, where: str = "this process") -> None:
    missing = missing_hooks(hooks)
    dead = dead_hooks(hooks)
    if dead:
        raise RuntimeError(f"sglang-ams: {len(dead)} hook(s) applied in {where} can never run: {', '.join(dead)}. "
                           "The plugin refuses to run with a policy half-installed.")
    if missing:
        raise RuntimeError(f"sglang-ams: {len(missing)} hook(s) failed to apply in {where}: {', '.join(missing)}. "
                           "SGLang's log shows why; the plugin refuses to run with a policy half-installed.")
