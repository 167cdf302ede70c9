"""The SGLang compatibility layer (engine/sglang_compat.py), the version gate, the per-behaviour hook tables and
the dead-hook check, against whichever SGLang is installed (CI: 0.5.17, then again 0.5.23)."""
from __future__ import annotations

import dataclasses
import logging
import sys
import types
from array import array
from types import SimpleNamespace

import pytest

from sglang_ams.config import PolicyConfig
from sglang_ams.engine import sglang_compat as compat
from sglang_ams.engine.settings import ENV_VAR, EngineSettings


# --- no SGLang needed ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,parsed,status", [
    ("0.5.17", (0, 5, 17), "tested"), ("0.5.23", (0, 5, 23), "tested"), ("0.5.23.post2", (0, 5, 23), "tested"),
    ("0.5.20", (0, 5, 20), "untested"), ("0.5.21rc1", (0, 5, 21), "untested"), ("0.5.19+cu13", (0, 5, 19), "untested"),
    ("0.5.16", (0, 5, 16), "unsupported"), ("0.5.24", (0, 5, 24), "unsupported"), ("0.6", (0, 6, 0), "unsupported"),
    ("1.0.0", (1, 0, 0), "unsupported"),
])
def test_version_status(text, parsed, status):
    assert compat.parse_version(text) == parsed
    assert compat.version_status(text) == status


def test_pyproject_pins_the_same_range():
    import pathlib
    text = (pathlib.Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert f'"{compat.SUPPORTED_SPEC}"' in text


def _fake_sglang(new: bool):
    """Classes shaped like 0.5.17's (new=False) or 0.5.23's (new=True)."""
    @dataclasses.dataclass
    class ReqKvInfo:
        kv_allocated_len: int = 0
        req_pool_idx: int | None = None
    if not new:
        ReqKvInfo = dataclasses.make_dataclass("ReqKvInfo", [("kv_allocated_len", int)])

    class Req:
        if new:
            extend_len = property(lambda self: 0)
        else:
            def set_extend_range(self, start, end):
                pass

    class Cache:
        if new:
            def checkpoint(self, req, *, up_to):
                pass
        else:
            def cache_finished_req(self, req, is_insert=True):
                pass

            def cache_unfinished_req(self, req):
                pass

    def release_new(req, tree_cache, *, checkpoint):
        pass

    def release_old(req, tree_cache, is_insert=True):
        pass

    class Struct:
        __struct_fields__ = ("model_path",)
    return ReqKvInfo, Req, Cache, Cache, release_new if new else release_old, Struct if new else object


def test_detect_old_and_new_layouts():
    old = compat.detect(*_fake_sglang(new=False))
    assert old == compat.Features(kv_record=False, prefix_len=False, checkpoint=False, unfinished_req=True,
                                  finished_req=True, struct_server_args=False, release_flag="is_insert")
    new = compat.detect(*_fake_sglang(new=True))
    assert new == compat.Features(kv_record=True, prefix_len=True, checkpoint=True, unfinished_req=False,
                                  finished_req=False, struct_server_args=True, release_flag="checkpoint")


# --- the installed SGLang ------------------------------------------------------------------------------------
sglang_api = pytest.mark.sglang_api


def _pools(page_size=16):
    import torch
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    kv = MHATokenToKVPool(256, page_size, torch.bfloat16, 2, 8, 1, device="cpu", enable_memory_saver=False)
    req_pool = ReqToTokenPool(size=4, max_context_len=128, device="cpu", enable_memory_saver=False)
    allocator = PagedTokenToKVPoolAllocator(256, page_size, torch.bfloat16, "cpu", kv, need_sort=False)
    return req_pool, allocator


def _request(req_pool, allocator, tokens):
    import torch
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams
    req = Req("r", "", array("q", tokens), SamplingParams(max_new_tokens=8))
    req_pool.alloc([req])
    slots = allocator.alloc(-(-len(tokens) // allocator.page_size) * allocator.page_size)[: len(tokens)]
    req_pool.req_to_token[compat.pool_idx(req), : len(tokens)] = slots.to(torch.int32)
    compat.set_kv_lengths(req, len(tokens))
    return req


@sglang_api
def test_features_match_the_installed_sglang(sglang_context):
    """The detected layout is the one SGLang's own code reads and writes."""
    from sglang.srt.managers.schedule_batch import Req
    f = compat.features()
    req_pool, allocator = _pools()
    req = _request(req_pool, allocator, list(range(40)))
    holder = req.kv if f.kv_record else req
    assert holder.req_pool_idx == compat.pool_idx(req) is not None        # where ReqToTokenPool.alloc put it
    assert compat.committed_len(req) == compat.allocated_len(req) == 40
    compat.shrink_kv(req, 8)
    assert (compat.committed_len(req), compat.allocated_len(req)) == (32, 32)
    own = getattr(req, "owned_kv_len", None) or req.effective_kv_committed_len   # SGLang's reader of the field
    assert own() == 32
    assert compat.prefix_len(req) == 0
    assert isinstance(inspect_attr(Req, "extend_len"), property) == f.prefix_len


def inspect_attr(cls, name):
    import inspect
    return inspect.getattr_static(cls, name, None)


@sglang_api
@pytest.mark.parametrize("mode", ["private", "cached"])
def test_prompt_after_prefill_stays_private_or_enters_the_tree(sglang_context, mode):
    """The hook this SGLang's table holds for the post-prefill tree call (cache_unfinished_req or
    checkpoint_kv_cache) keeps a policy request's prompt out of the tree in private mode only."""
    from sglang.srt.mem_cache import common
    from sglang.srt.mem_cache.radix_cache import RadixCache
    from sglang_ams.engine import runtime as ams_runtime
    from sglang_ams.patches import mem_cache as mem_hooks
    ams_runtime.install(SimpleNamespace(settings=EngineSettings(policy=PolicyConfig(policy="streaming"),
                                                                prompt_cache=mode)))
    req_pool, allocator = _pools()
    tree = compat.make_radix_cache(req_pool, allocator, 16)
    tokens = list(range(100, 140))
    req = _request(req_pool, allocator, tokens)
    compat.lock_prefix(tree, req, tokens)          # an empty match: the root
    compat.set_extend(req, 0, len(tokens))
    targets = [t for t, _, _ in mem_hooks.tree_hooks()]
    if compat.features().checkpoint:
        assert targets == ["sglang.srt.mem_cache.common.checkpoint_kv_cache"]
        mem_hooks.checkpoint_kv_cache_hook(common.checkpoint_kv_cache, req, tree)
    else:
        assert targets == [mem_hooks.RADIX + ".cache_unfinished_req", mem_hooks.RADIX + ".cache_finished_req"]
        mem_hooks.cache_unfinished_req_hook(RadixCache.cache_unfinished_req, tree, req)
    cached = len(compat.match_prefix(tree, tokens)[0])
    assert cached == (0 if mode == "private" else 32)                         # whole pages only
    if mode == "private":               # the next chunk resumes after this one; nothing is pinned
        assert compat.prefix_len(req) == 40 and compat.protected_len(req) == 0


@sglang_api
def test_tree_cache_classes_include_the_default():
    from sglang.srt.mem_cache.radix_cache import RadixCache
    accepted = compat.tree_cache_classes()
    assert RadixCache in accepted
    req_pool, allocator = _pools()
    assert type(compat.make_radix_cache(req_pool, allocator, 16)) in accepted


# --- hook tables, verify_applied, gate -------------------------------------------------------------------
def _apply(target, fn, kind="around"):
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    HookRegistry._apply_target(target, [(HookType(kind), fn, None)])
    HookRegistry._patched.add(target)


@pytest.fixture
def scratch_module(monkeypatch):
    import msgspec
    from sglang.srt.plugins.hook_registry import HookRegistry
    mod = types.ModuleType("ams_scratch")

    def plain(x):
        return x
    mod.plain = plain

    class Record(msgspec.Struct):
        a: int = 0

        def __post_init__(self):
            pass
    mod.Record = Record

    class Klass:
        def __init__(self):
            pass
    mod.Klass = Klass
    monkeypatch.setitem(sys.modules, "ams_scratch", mod)
    before = set(HookRegistry._patched)
    yield mod
    HookRegistry._patched.intersection_update(before)


@sglang_api
def test_dead_hooks_are_caught(scratch_module):
    from sglang_ams.patches import dead_hooks, verify_applied

    def hook(orig, *a, **k):
        return orig(*a, **k)
    hooks = [("ams_scratch.plain", hook, "around"), ("ams_scratch.Klass.__init__", hook, "around"),
             ("ams_scratch.Record.__init__", hook, "around"), ("ams_scratch.Record.__post_init__", hook, "around")]
    for target, fn, kind in hooks:
        _apply(target, fn, kind)
    assert scratch_module.plain(3) == 3
    assert dead_hooks(hooks) == ["ams_scratch.Record.__init__ (a msgspec Struct never calls a Python __init__)",
                                 "ams_scratch.Record.__post_init__ (a msgspec Struct never calls a Python "
                                 "__post_init__)"]
    verify_applied(hooks[:2], "test")
    scratch_module.plain = lambda x: x                      # someone replaced it after us
    assert dead_hooks(hooks[:2]) == ["ams_scratch.plain (the attribute is no longer the hook's wrapper)"]
    with pytest.raises(RuntimeError, match="can never run: ams_scratch.plain"):
        verify_applied(hooks[:2], "test")


@sglang_api
def test_server_args_table_hooks_what_fires():
    """A dataclass ServerArgs is hooked in __init__; a msgspec one through sglang.Engine (its __init__ hook
    would be recorded as patched and never run)."""
    from sglang.srt.server_args import ServerArgs
    from sglang_ams.patches import server_args as sa_hooks
    targets = {t for t, _, _ in sa_hooks.hooks()}
    struct = hasattr(ServerArgs, "__struct_fields__")
    assert compat.features().struct_server_args == struct
    assert (sa_hooks.MODULE + ".__init__" in targets) == (not struct)
    assert (sa_hooks.ENGINE + ".Engine.__init__" in targets) == struct


@sglang_api
def test_msgspec_server_args_init_hook_is_dead(scratch_module):
    from sglang.srt.server_args import ServerArgs
    from sglang_ams.patches import dead_hooks
    from sglang_ams.patches import server_args as sa_hooks
    if not hasattr(ServerArgs, "__struct_fields__"):
        pytest.skip("this SGLang's ServerArgs is a dataclass")
    from sglang.srt.plugins.hook_registry import HookRegistry
    saved = ServerArgs.__dict__.get("__init__")
    _apply(sa_hooks.MODULE + ".__init__", sa_hooks.init_hook)
    try:
        assert dead_hooks(sa_hooks.INIT_HOOKS) == [f"{sa_hooks.MODULE}.__init__ (a msgspec Struct never calls a "
                                                   "Python __init__)"]
    finally:
        HookRegistry._patched.discard(sa_hooks.MODULE + ".__init__")
        if saved is None:
            delattr(ServerArgs, "__init__")
        else:
            setattr(ServerArgs, "__init__", saved)


@sglang_api
@pytest.mark.parametrize("version,registered,message", [
    ("0.5.17", True, None), ("0.5.21", True, "untested"), ("0.5.24", False, "outside the supported range"),
    ("0.5.9", False, "outside the supported range"),
])
def test_version_gate(monkeypatch, caplog, version, registered, message):
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang_ams import patches
    calls = []
    monkeypatch.setattr(compat, "sglang_version", lambda: version)
    monkeypatch.setattr(HookRegistry, "register", classmethod(lambda cls, *a, **k: calls.append(a)))
    monkeypatch.setattr("sglang_ams.patches.server_args.take_first_engine_call", lambda: None)
    monkeypatch.delenv(ENV_VAR, raising=False)
    with caplog.at_level(logging.WARNING, logger="sglang_ams"):
        patches.register_all()
    assert bool(calls) == registered
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert (message is None and not warnings) or any(message in w for w in warnings), warnings


# --- refusals of newer SGLang flags and of beam search ------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("attn_dp_size", 2), ("enable_unified_cache_external_linker", True),
                                        ("disaggregation_decode_enable_offload_kvcache", True),
                                        ("enable_kv_cache_sharding", True)])
def test_newer_flags_are_refused(flag, value):
    from sglang_ams.patches.server_args import UnsupportedFeature, compatible_overrides
    with pytest.raises(UnsupportedFeature, match="--" + flag.replace("_", "-")):
        compatible_overrides(lambda n, d: value if n == flag else d)
    assert compatible_overrides(lambda n, d: 1 if n == "attn_dp_size" else d) == {"attention_backend": "flashinfer"}


@sglang_api
def test_newer_flags_exist_where_they_are_refused():
    """Each refused name is a real ServerArgs field of the SGLang that has the feature (a typo would never fire)."""
    from sglang.srt.server_args import ServerArgs
    fields = set(compat.server_args_fields(ServerArgs))
    newer = ["attn_dp_size", "enable_unified_cache_external_linker", "enable_kv_cache_sharding"]
    if compat.features().checkpoint:            # a 0.5.2x SGLang has them all
        assert set(newer) <= fields
    assert "disaggregation_decode_enable_offload_kvcache" in fields


def test_beam_width_is_refused_with_a_policy(monkeypatch):
    from sglang_ams.patches.beam_search import verify_hook
    monkeypatch.setenv(ENV_VAR, EngineSettings(policy=PolicyConfig(policy="ams")).to_json())
    with pytest.raises(ValueError, match="beam_width=4.*--kv-policy ams"):
        verify_hook(None, SimpleNamespace(beam_width=4), 1000)
    assert verify_hook("ok", SimpleNamespace(beam_width=1), 1000) == "ok"
    assert verify_hook("ok", SimpleNamespace(), 1000) == "ok"          # an SGLang without beam search
    monkeypatch.delenv(ENV_VAR)
    assert verify_hook("ok", SimpleNamespace(beam_width=4), 1000) == "ok"    # policy off: upstream behaviour


@sglang_api
def test_beam_width_on_real_sampling_params(monkeypatch):
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang_ams.patches.beam_search import verify_hook
    import inspect
    if "beam_width" not in inspect.signature(SamplingParams).parameters:
        pytest.skip("this SGLang has no per-request beam search")
    monkeypatch.delenv(ENV_VAR, raising=False)
    sp = SamplingParams(max_new_tokens=8, beam_width=3)
    sp.verify(1000)                         # upstream accepts it (and our hooks, if applied, without a policy)
    monkeypatch.setenv(ENV_VAR, EngineSettings(policy=PolicyConfig(policy="streaming")).to_json())
    with pytest.raises(ValueError, match="beam_width=3"):
        verify_hook(None, sp, 1000)
