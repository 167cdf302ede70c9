"""Everything that differs between the SGLang releases the plugin supports (0.5.17 - 0.5.23), in one place.

Behaviours are detected from SGLang's own classes (fields, attributes, signatures), never from version strings:
a release between the tested ends gets whichever code path its classes show. The version is read only for the
range gate (`version_status`). Importing this module needs neither torch nor SGLang; `features()` imports SGLang
the first time it is called (inside the processes that run SGLang anyway).

What moved (read in both wheels):
* 0.5.19: `req_pool_idx`, `kv_committed_len`, `cache_protected_len` moved from Req onto its KV record `req.kv`
  (ReqKvInfo, always present; in 0.5.17 only `kv_allocated_len` lives there and `req.kv` is None once released);
  the default tree cache is UnifiedRadixCache (0.5.17/18: RadixCache).
* 0.5.20: ServerArgs is a msgspec Struct: its `__init__` / `__post_init__` are C slots that hooks cannot reach,
  and `object.__setattr__` raises on it.
* 0.5.21: `RadixCache.cache_finished_req` is gone (release_kv_cache calls `tree_cache.insert_req`).
* 0.5.22: `cache_unfinished_req` is gone too: `BasePrefixCache.checkpoint(req, *, up_to)`, called through
  `common.checkpoint_kv_cache` and `release_kv_cache(req, tree_cache, *, checkpoint)`; `mem_cache.chunk_cache`
  is gone; `req.prefix_indices` / `req.extend_range` became `req.prefix_len` / `req.extend_end`.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect

LOWEST = (0, 5, 17)          # supported: LOWEST <= version < BEYOND (pyproject: sglang>=0.5.17,<0.5.24)
BEYOND = (0, 5, 24)
TESTED = ((0, 5, 17), (0, 5, 23))
SUPPORTED_SPEC = "sglang>=0.5.17,<0.5.24"


@dataclasses.dataclass(frozen=True)
class Features:
    kv_record: bool           # pool index / committed / protected lengths live on req.kv
    prefix_len: bool          # req.prefix_len and req.extend_end (no prefix_indices / extend_range)
    checkpoint: bool          # tree caches take checkpoint(req, *, up_to); release_kv_cache(..., *, checkpoint)
    unfinished_req: bool      # RadixCache.cache_unfinished_req exists (hooked for private prompts)
    finished_req: bool        # RadixCache.cache_finished_req exists (hooked for compacted requests)
    struct_server_args: bool  # ServerArgs is a msgspec Struct (hook sglang.Engine for keyword arguments)
    release_flag: str = "is_insert"   # release_kv_cache's keyword that lets the tree keep the request's KV


# --- version gate --------------------------------------------------------------------------------------------
def parse_version(text: str) -> tuple:
    """(0, 5, 23) from '0.5.23', '0.5.23.post1', '0.5.23rc1', '0.5.23+cu13'."""
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def version_status(text: str) -> str:
    """'tested', 'untested' (inside the range) or 'unsupported'."""
    v = parse_version(text)
    if not LOWEST <= v < BEYOND:
        return "unsupported"
    return "tested" if v in TESTED else "untested"


def sglang_version() -> str:
    from sglang.version import __version__
    return __version__


# --- detection -----------------------------------------------------------------------------------------------
def detect(req_kv_cls, req_cls, prefix_cache_cls, radix_cls, release_fn, server_args_cls) -> Features:
    """The behaviours of the SGLang whose classes these are (separate from `features` so tests can feed it)."""
    kv_fields = {f.name for f in dataclasses.fields(req_kv_cls)}
    release = inspect.signature(release_fn).parameters
    return Features(
        kv_record="req_pool_idx" in kv_fields,
        prefix_len=isinstance(inspect.getattr_static(req_cls, "extend_len", None), property),
        checkpoint=hasattr(prefix_cache_cls, "checkpoint") and "checkpoint" in release,
        unfinished_req=hasattr(radix_cls, "cache_unfinished_req"),
        finished_req=hasattr(radix_cls, "cache_finished_req"),
        struct_server_args=hasattr(server_args_cls, "__struct_fields__"),
        release_flag="checkpoint" if "checkpoint" in release else "is_insert",
    )


@functools.cache
def features() -> Features:
    from sglang.srt.managers.schedule_batch import Req, ReqKvInfo
    from sglang.srt.mem_cache.base_prefix_cache import BasePrefixCache
    from sglang.srt.mem_cache.common import release_kv_cache
    from sglang.srt.mem_cache.radix_cache import RadixCache
    from sglang.srt.server_args import ServerArgs
    return detect(ReqKvInfo, Req, BasePrefixCache, RadixCache, release_kv_cache, ServerArgs)


# --- request fields ------------------------------------------------------------------------------------------
def _record(req):
    return req.kv if features().kv_record else req


def pool_idx(req):
    """The request's req_to_token row (None once its KV is released)."""
    return _record(req).req_pool_idx


def committed_len(req) -> int:
    return _record(req).kv_committed_len


def allocated_len(req) -> int:
    return req.kv.kv_allocated_len


def protected_len(req) -> int:
    """Tokens of the row the tree cache owns (the matched prefix, or what was inserted)."""
    return _record(req).cache_protected_len


def set_protected_len(req, value: int) -> None:
    _record(req).cache_protected_len = value


def set_kv_lengths(req, committed: int, allocated: int | None = None) -> None:
    """Committed and allocated KV lengths (a fresh KV record in 0.5.17, where it is None until allocated)."""
    allocated = committed if allocated is None else allocated
    if features().kv_record:
        req.kv.kv_committed_len, req.kv.kv_allocated_len = committed, allocated
        return
    from sglang.srt.managers.schedule_batch import ReqKvInfo
    if req.kv is None:
        req.kv = ReqKvInfo(**_kv_defaults(ReqKvInfo, kv_allocated_len=allocated))
    req.kv.kv_allocated_len = allocated
    req.kv_committed_len = committed


def _kv_defaults(cls, **given) -> dict:
    """Values for a 0.5.17 ReqKvInfo's required fields (swa_evicted_seqlen has no default there)."""
    out = dict(given)
    for f in dataclasses.fields(cls):
        if f.name not in out and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            out[f.name] = 0
    return out


def shrink_kv(req, dropped: int) -> None:
    """Compaction freed `dropped` tokens at the end of the request's row."""
    rec = _record(req)
    rec.kv_committed_len -= dropped
    req.kv.kv_allocated_len -= dropped


def prefix_len(req) -> int:
    """Tokens at the start of the row that the next extend does not recompute (matched or kept from a chunk)."""
    return req.prefix_len if features().prefix_len else len(req.prefix_indices)


def extend_end(req) -> int:
    return req.extend_end if features().prefix_len else req.extend_range.end


def set_matched_prefix(req, indices, last_node) -> None:
    """What a prefix match leaves on a request (the tree lock is the caller's)."""
    req.last_node = last_node
    if features().prefix_len:
        req.prefix_len = len(indices)
    else:
        req.prefix_indices = indices
    set_protected_len(req, len(indices))


def keep_extend_private(req, req_to_token) -> None:
    """After a prefill chunk, without inserting it into the tree: the next chunk resumes after it (what ChunkCache
    and a request barred from the tree do)."""
    end = extend_end(req)
    if features().prefix_len:
        req.prefix_len = end
    else:
        import torch
        req.prefix_indices = req_to_token[pool_idx(req), :end].to(torch.int64, copy=True)


# --- tree cache --------------------------------------------------------------------------------------------
def tree_cache_classes() -> tuple:
    """The prefix caches the plugin runs with: the default one of this SGLang, and the no-sharing one."""
    from sglang.srt.mem_cache.radix_cache import RadixCache
    classes = [RadixCache]
    try:
        from sglang.srt.mem_cache.chunk_cache import ChunkCache      # gone in 0.5.2x
        classes.append(ChunkCache)
    except ImportError:
        pass
    if features().checkpoint:
        from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache   # the default there
        classes.append(UnifiedRadixCache)
    return tuple(classes)


def make_radix_cache(req_to_token_pool, allocator, page_size: int, disable: bool = False):
    """The default tree cache of this SGLang, for a plain MHA pool (tests; the server builds its own)."""
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    params = CacheInitParams(disable=disable, req_to_token_pool=req_to_token_pool,
                             token_to_kv_pool_allocator=allocator, page_size=page_size)
    if features().checkpoint:
        from sglang.srt.mem_cache.unified_cache.components import ComponentType
        from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
        params.tree_components = (ComponentType.FULL,)          # what create_unified_radix_cache gives MHA
        return UnifiedRadixCache(params)
    from sglang.srt.mem_cache.radix_cache import RadixCache
    return RadixCache(params)


def release_kv_cache(req, tree_cache, insert: bool = True) -> None:
    """Finish (insert=True) or abort a request's KV, as SGLang's scheduler does."""
    from sglang.srt.mem_cache import common
    common.release_kv_cache(req, tree_cache, **{features().release_flag: insert})


def release_inserts(args: tuple, kwargs: dict) -> bool:
    """Whether a release_kv_cache(req, tree_cache, ...) call inserts into the tree (its own default included)."""
    name = features().release_flag
    default = True if name == "is_insert" else None            # (the keyword-only `checkpoint` has none)
    if name in kwargs:
        return bool(kwargs[name])
    if len(args) > 2:
        return bool(args[2])
    return bool(default)


def release_without_insert(args: tuple, kwargs: dict) -> tuple:
    """The (args, kwargs) of a release_kv_cache call changed so that it does not insert into the tree."""
    name = features().release_flag
    args, kwargs = tuple(args[:2]), dict(kwargs)
    kwargs[name] = False
    return args, kwargs


def match_prefix(tree_cache, tokens) -> tuple:
    """(device indices, last node) of the longest cached prefix of `tokens`."""
    from array import array
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey
    match = tree_cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))
    if hasattr(match, "device_indices"):
        return match.device_indices, match.last_device_node
    indices = tree_cache.path_device_indices(match.last_device_node)[: match.device_prefix_len]
    return indices, match.last_device_node


def insert_prefix(tree_cache, tokens, slots) -> None:
    from array import array
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey
    tree_cache.insert(InsertParams(key=RadixKey(array("q", tokens)), value=slots))


def lock_prefix(tree_cache, req, tokens) -> object:
    """Match `tokens`, lock the match for `req` (as admission does) and adopt it as the request's prefix;
    returns the matched device indices."""
    indices, node = match_prefix(tree_cache, tokens)
    if features().checkpoint:
        req.lock = tree_cache.lock(node)
    else:
        tree_cache.inc_lock_ref(node)
    set_matched_prefix(req, indices, node)
    return indices


def server_args_fields(server_args_cls) -> list:
    """The configuration field names of a dataclass or msgspec ServerArgs."""
    if hasattr(server_args_cls, "__struct_fields__"):
        return list(server_args_cls.__struct_fields__)
    return [f.name for f in dataclasses.fields(server_args_cls)]


def free_page_ids(allocator):
    """Every page (page size 1: slot) the allocator holds free, duplicates kept (tests look for double frees)."""
    import torch
    if hasattr(allocator, "get_all_free_pages"):       # newer SGLang stages paged frees in a list
        return allocator.get_all_free_pages()
    return torch.cat([allocator.free_pages, allocator.release_pages])


def in_free_group(allocator) -> bool:
    """Whether the allocator only stages frees (between free_group_begin and free_group_end)."""
    if hasattr(allocator, "is_not_in_free_group"):       # 0.5.17; newer SGLang: free_group is None outside one
        return not allocator.is_not_in_free_group
    return getattr(allocator, "free_group", None) is not None


def reserved_for_running(adder) -> float:
    """Tokens a PrefillAdder holds back for the running requests' future decode tokens."""
    budget = getattr(adder, "memory_budget", None)       # newer SGLang keeps admission arithmetic there
    return budget.total_offset if budget is not None else adder.rem_total_token_offset


def set_extend(req, start: int, end: int) -> None:
    """The extend a prefill round runs for the request: row positions [start, end)."""
    if features().prefix_len:
        req.prefix_len, req.extend_end = start, end
    else:
        req.set_extend_range(start, end)
    # The tree keys on the fill ids, which lag output_ids until refreshed (a private method in 0.5.17).
    (getattr(req, "refresh_fill_ids", None) or req._refresh_fill_ids)()
