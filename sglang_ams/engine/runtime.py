"""The plugin's state in one scheduler process: what it knows of the model and the KV pool, the query ring,
the per-request position offsets the decode step adds, and the counters.

Built in two steps: `create` right after SGLang allocated the KV pool (before CUDA-graph capture, so the ring
and the offset table have fixed addresses), then `attach_scheduler` once the scheduler owns the radix cache.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from ..heads import HeadRange
from ..kernels.gather import pointer_table
from ..rope import RopeSpec, inv_freq_from_config
from . import ring as ring_mod
from .counters import Counters
from .settings import EngineSettings

logger = logging.getLogger("sglang_ams")

_RUNTIME: "Runtime | None" = None


class Unsupported(RuntimeError):
    """The model or the pool SGLang built cannot be compacted (refused at startup)."""


@dataclasses.dataclass
class ModelShape:
    num_layers: int          # layers in this process's KV pool
    start_layer: int
    num_kv_heads: int        # per TP rank (the pool's head_num)
    num_q_heads: int         # per TP rank
    head_dim: int
    dtype: torch.dtype
    scale: float             # attention softmax scale
    heads: HeadRange | None = None   # which of the model's heads the pool holds (default: all of them)

    def __post_init__(self):
        if self.heads is None:
            self.heads = HeadRange.full(self.num_kv_heads, self.num_q_heads)
        elif (self.heads.kv_count, self.heads.q_count) != (self.num_kv_heads, self.num_q_heads):
            raise Unsupported(f"the pool holds {self.num_kv_heads} KV / {self.num_q_heads} query heads, SGLang's "
                              f"tensor-parallel sharding gives this rank {self.heads.kv_count} / {self.heads.q_count}")

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def kv_dims(self) -> dict:
        """The numbers the workspace bound is computed from (engine/workspace.py)."""
        return dict(num_kv_heads=self.num_kv_heads, group=self.group_size, head_dim=self.head_dim,
                    elem_size=self.dtype.itemsize)


class Runtime:
    def __init__(self, settings: EngineSettings, shape: ModelShape, kv_pool, req_to_token_pool, allocator,
                 rope, ring_rows: int):
        self.settings = settings
        self.shape = shape
        self.kv_pool = kv_pool
        self.req_to_token_pool = req_to_token_pool
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.rope = rope
        self.device = kv_pool.k_buffer[0].device
        self.k_ptrs = pointer_table(kv_pool.k_buffer)
        self.v_ptrs = pointer_table(kv_pool.v_buffer)
        self.slot_stride = kv_pool.k_buffer[0].stride(0)
        self.heads = shape.heads
        req_slots = req_to_token_pool.req_to_token.shape[0]
        # logical - physical position per req_pool_idx, added to decode positions on the GPU
        self.pos_offsets = torch.zeros(req_slots, dtype=torch.int64, device=self.device)
        self.ring = None
        if settings.policy.needs_queries:
            self.ring = ring_mod.QueryRing(shape.num_layers, ring_rows, settings.policy.window, shape.num_q_heads,
                                           shape.head_dim, req_slots, shape.dtype, self.device)
            if settings.ring_store == "triton":
                self.ring.compile_store()
        self.counters = Counters()
        self.decode_lse_ok = None       # None: not checked yet; False: the decode LSE disagreed, recompute it
        self.decode_lse_check = None    # the first comparison, settled at the next step (checks.PendingLseCheck)
        self.tree_cache = None
        self.forward_stream = None
        self.overlap = False
        self.workspace_bytes = 1 << 62      # until set_workspace: unbounded (tests that do not care)

    @classmethod
    def from_model_runner(cls, settings: EngineSettings, model_runner) -> "Runtime":
        """The runtime of a ModelRunner whose KV pool SGLang just allocated; raises Unsupported for a pool, model or
        layer compaction cannot handle."""
        kv_pool, allocator = model_runner.token_to_kv_pool, model_runner.token_to_kv_pool_allocator
        check_pool(kv_pool, allocator)
        check_model_config(model_runner.model_config)
        rope = RopeSpec(inv_freq=inv_freq_from_config(model_runner.model_config.hf_config).to(model_runner.device))
        return cls(settings, model_shape(model_runner), kv_pool, model_runner.req_to_token_pool, allocator, rope,
                   ring_rows_for(settings, model_runner.max_total_num_tokens))

    def set_workspace(self, bound: int) -> None:
        """The most transient GPU memory a compaction step may allocate (reserved from the KV budget)."""
        self.workspace_bytes = bound
        self.counters.workspace_bound_bytes = bound

    def attach_scheduler(self, scheduler) -> None:
        self.tree_cache = scheduler.tree_cache
        self.overlap = bool(getattr(scheduler, "enable_overlap", False))
        self.forward_stream = getattr(scheduler, "forward_stream", None)

    def overhead_bytes(self) -> int:
        ring = self.ring.nbytes() if self.ring is not None else 0
        return ring + self.pos_offsets.numel() * 8

    def kv_pool_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.kv_pool.k_buffer + self.kv_pool.v_buffer)


def get() -> Runtime | None:
    return _RUNTIME


def install(rt: Runtime | None) -> None:
    global _RUNTIME
    _RUNTIME = rt


def ring_rows_for(settings: EngineSettings, pool_tokens: int) -> int:
    if settings.ring_rows:
        return settings.ring_rows
    p = settings.policy
    return ring_mod.rows_for_pool(pool_tokens, p.budget, p.interval - settings.slack_tokens(p.interval), p.window)


def check_pool(kv_pool, allocator) -> None:
    """Refuse pools whose layout compaction does not understand."""
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    if type(kv_pool) is not MHATokenToKVPool:
        raise Unsupported(f"the KV pool is {type(kv_pool).__name__}; compaction needs SGLang's MHATokenToKVPool "
                          "(models with MLA, sliding-window, Mamba or quantised pools are not supported)")
    if getattr(kv_pool, "use_hnd", False) or (getattr(kv_pool, "kv_cache_layout", None) not in (None, "nhd", "NHD")):
        raise Unsupported("compaction needs the NHD KV layout (unset SGLANG_USE_HND_KVCACHE)")
    if type(allocator) not in (TokenToKVPoolAllocator, PagedTokenToKVPoolAllocator):
        raise Unsupported(f"the KV allocator is {type(allocator).__name__}; compaction needs the token or paged "
                          "allocator")
    if kv_pool.k_buffer[0].dtype not in (torch.bfloat16, torch.float16):
        raise Unsupported(f"KV dtype {kv_pool.k_buffer[0].dtype} is not supported (bf16 and fp16 are)")


def attention_layers(model) -> list:
    from sglang.srt.layers.radix_attention import RadixAttention
    return [m for m in model.modules() if isinstance(m, RadixAttention)]


def model_shape(model_runner) -> ModelShape:
    kv = model_runner.token_to_kv_pool
    layers = attention_layers(model_runner.model)
    if not layers:
        raise Unsupported("found no RadixAttention layers in the model")
    for layer in layers:
        if (layer.sliding_window_size or -1) > 0:
            raise Unsupported(f"layer {layer.layer_id} uses a sliding window; compaction reorders keys per head, "
                              "which sliding windows cannot follow")
        if getattr(layer, "is_cross_attention", False):
            raise Unsupported("cross-attention (encoder-decoder) models are not supported")
        if getattr(layer, "logit_cap", 0) not in (0, 0.0, None):
            raise Unsupported("attention logit soft-capping is not supported by the scoring kernel")
    first = layers[0]
    return ModelShape(num_layers=kv.layer_num, start_layer=getattr(kv, "start_layer", 0) or 0,
                      num_kv_heads=kv.head_num, num_q_heads=first.tp_q_head_num, head_dim=kv.head_dim,
                      dtype=kv.k_buffer[0].dtype, scale=float(first.scaling),
                      heads=head_range(model_runner))


def tp_rank_size(model_runner) -> tuple[int, int]:
    """(rank, size) of the group that shards attention heads: SGLang's TP group (DP attention is refused)."""
    ps = getattr(model_runner, "ps", None)          # SGLang 0.5.17: ParallelState; older: attributes
    src = ps if ps is not None else model_runner
    return int(getattr(src, "tp_rank", 0) or 0), int(getattr(src, "tp_size", 1) or 1)


def head_range(model_runner) -> HeadRange | None:
    """This rank's heads, by SGLang's sharding rule, with the TP group's all-reduce when there are several ranks;
    None without tensor parallelism (the pool holds every head)."""
    rank, size = tp_rank_size(model_runner)
    if size == 1:
        return None
    config = model_runner.model_config
    try:
        return HeadRange.of_rank(rank, size, config.get_total_num_kv_heads(), config.num_attention_heads,
                                 tp_all_reduce)
    except ValueError as err:
        raise Unsupported(str(err)) from None


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over SGLang's TP group (NCCL through torch.distributed: every rank gets the same sum)."""
    from sglang.srt.distributed import get_tp_group
    torch.distributed.all_reduce(x, group=get_tp_group().device_group)
    return x


def check_model_config(model_config) -> None:
    hf = model_config.hf_config
    if getattr(model_config, "is_multimodal", False) or getattr(hf, "rope_scaling", None) and \
            (hf.rope_scaling or {}).get("type") in ("mrope", "default_mrope"):
        raise Unsupported("multimodal / M-RoPE models are not supported yet")
    if getattr(model_config, "is_encoder_decoder", False):
        raise Unsupported("encoder-decoder models are not supported")
    if getattr(hf, "alibi", False) or getattr(hf, "position_embedding_type", "rope") == "alibi":
        raise Unsupported("ALiBi models index keys by position; compaction needs RoPE")
