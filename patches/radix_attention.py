"""Hook on sglang.srt.layers.radix_attention: decode queries go into the query ring.

Runs inside decode CUDA-graph capture and replay: only tensor ops on buffers allocated before capture. An eager
decode step with no ring row lent stores nothing (QueryRing.records). While the layer's attention runs,
`ring.pending` tells the FlashInfer decode hook (flashinfer_decode.py) where to put the LSE of these queries.
"""
from __future__ import annotations

from sglang_ams.engine import runtime as ams_runtime


def forward_hook(orig, self, q, k, v, forward_batch, *args, **kwargs):
    rt = ams_runtime.get()
    if rt is None or rt.ring is None or not forward_batch.forward_mode.is_decode():
        return orig(self, q, k, v, forward_batch, *args, **kwargs)
    layer = self.layer_id - rt.shape.start_layer
    if not rt.ring.records(layer):
        return orig(self, q, k, v, forward_batch, *args, **kwargs)
    rt.ring.write(layer, q, forward_batch.req_pool_indices, forward_batch.positions)
    if rt.settings.scoring_lse == "decode":
        rt.ring.pending = (layer, forward_batch.req_pool_indices, forward_batch.positions)
    try:
        return orig(self, q, k, v, forward_batch, *args, **kwargs)
    finally:
        rt.ring.pending = None


HOOKS = [
    ("sglang.srt.layers.radix_attention.RadixAttention.forward", forward_hook, "around"),
]
