"""Hook on sglang.srt.layers.radix_attention: decode queries go into the query ring, and with a prefill window
the last W queries of each prompt in an extend batch too.

The decode path runs inside CUDA-graph capture and replay: only tensor ops on buffers allocated before capture.
While the layer's attention runs, `ring.pending` tells the FlashInfer decode hook (flashinfer_decode.py) where
to put the LSE of these queries. The extend path runs eagerly; its queries come without LSE.
"""
from __future__ import annotations

import torch

from sglang_ams.engine import runtime as ams_runtime

TAIL_ATTR = "_ams_prompt_tail"


def prompt_tail(forward_batch, window: int):
    """(token index [R, W], ring-row owner req_pool_idx [R, W], valid [R, W]) of the last min(W, extend length)
    tokens of each request in an extend batch; computed once per forward batch, without host syncs."""
    cached = getattr(forward_batch, TAIL_ATTR, None)
    if cached is not None:
        return cached
    start, length = forward_batch.extend_start_loc.long(), forward_batch.extend_seq_lens.long()
    offsets = torch.arange(window, device=start.device)
    first = start + length - window                                      # may precede the request's tokens
    idx = first[:, None] + offsets[None, :]
    valid = idx >= start[:, None]
    idx = torch.where(valid, idx, start[:, None].expand_as(idx))
    owners = forward_batch.req_pool_indices[:, None].expand_as(idx)
    tail = (idx, owners, valid)
    setattr(forward_batch, TAIL_ATTR, tail)
    return tail


def forward_hook(orig, self, q, k, v, forward_batch, *args, **kwargs):
    rt = ams_runtime.get()
    if rt is None or rt.ring is None:
        return orig(self, q, k, v, forward_batch, *args, **kwargs)
    mode = forward_batch.forward_mode
    layer = self.layer_id - rt.shape.start_layer
    if mode.is_extend():
        if rt.settings.policy.prefill_window and forward_batch.extend_start_loc is not None:
            idx, owners, valid = prompt_tail(forward_batch, rt.ring.window)
            rt.ring.write_tail(layer, q, idx, owners, valid, forward_batch.positions)
        return orig(self, q, k, v, forward_batch, *args, **kwargs)
    if not mode.is_decode():
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
