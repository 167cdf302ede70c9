"""Hook on sglang.srt.model_executor.forward_batch_info: decode positions follow the logical position.

SGLang derives decode positions from the (physical) sequence length; after compaction a request's position
offset (logical - physical) is added on the GPU from a table indexed by req_pool_idx. This runs before the
CUDA-graph runner copies positions into its static buffer, so graphs need no change.
"""
from __future__ import annotations

from sglang_ams.engine import runtime as ams_runtime


def init_new_hook(ret, cls, batch, model_runner, *args, **kwargs):
    rt = ams_runtime.get()
    if rt is None or not rt.counters.compactions or not ret.forward_mode.is_decode():
        return ret
    offsets = rt.pos_offsets[ret.req_pool_indices]
    ret.positions = ret.positions + offsets.to(ret.positions.dtype)
    return ret


HOOKS = [
    ("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", init_new_hook, "after"),
]
