"""Hook on sglang.srt.layers.radix_attention: decode queries go into the query ring.

Runs inside decode CUDA-graph capture and replay: only tensor ops on buffers allocated before capture.
"""
from __future__ import annotations

from sglang_ams.engine import runtime as ams_runtime


def forward_hook(orig, self, q, k, v, forward_batch, *args, **kwargs):
    rt = ams_runtime.get()
    if rt is not None and rt.ring is not None and forward_batch.forward_mode.is_decode():
        rt.ring.write(self.layer_id - rt.shape.start_layer, q, forward_batch.req_pool_indices,
                      forward_batch.positions)
    return orig(self, q, k, v, forward_batch, *args, **kwargs)


HOOKS = [
    ("sglang.srt.layers.radix_attention.RadixAttention.forward", forward_hook, "around"),
]
