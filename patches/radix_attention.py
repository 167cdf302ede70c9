"""Hook on sglang.srt.layers.radix_attention: decode queries go into the query ring.

Runs inside decode CUDA-graph capture and replay: only tensor ops on buffers allocated before capture. An eager
decode step with no ring row lent stores nothing (QueryRing.records). While the layer's attention runs,
`ring.pending` tells the FlashInfer decode hook (flashinfer_decode.py) where to put the LSE of these queries
(and, with --ams-ring-store triton, the queries too: one fused store after the attention).
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
    ring, rpi, pos = rt.ring, forward_batch.req_pool_indices, forward_batch.positions
    fused = rt.settings.ring_store == "triton"
    if not fused:
        ring.write(layer, q, rpi, pos)              # the LSE follows from the attention call
    ring.pending = (layer, rpi, pos) if rt.settings.scoring_lse == "decode" else None
    try:
        out = orig(self, q, k, v, forward_batch, *args, **kwargs)
    finally:
        unconsumed, ring.pending = ring.pending, None
    if fused and (unconsumed is not None or rt.settings.scoring_lse != "decode"):
        ring.store(layer, q, None, rpi, pos)        # no LSE came (recompute, or no FlashInfer decode call)
    return out


HOOKS = [
    ("sglang.srt.layers.radix_attention.RadixAttention.forward", forward_hook, "around"),
]
