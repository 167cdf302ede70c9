"""Hook on SGLang's FlashInfer backend `forward_extend`: with --ams-prefill-window, each prompt's last W queries
of an extend batch go into the query ring (rows were lent by the prepare_for_extend hook; other requests write to
the trash row).

Why here and not in the RadixAttention hook: SGLang 0.5.17 captures prefills in CUDA graphs ("breakable") whose
attention runs eagerly between captured segments. The backend call is that eager part: it sees the real batch at
every replay, while code in RadixAttention.forward would be replayed from capture-time inputs.
"""
from __future__ import annotations

import torch

from sglang_ams.engine import runtime as ams_runtime

TARGET = "sglang.srt.layers.attention.flashinfer_backend.FlashInferAttnBackend.forward_extend"
TAIL_ATTR = "_ams_prompt_tail"


def prompt_tail(forward_batch, window: int):
    """(token index [R, W], ring-row owner req_pool_idx [R, W], valid [R, W]) of the last min(W, extend length)
    tokens of each request in an extend batch; computed once per forward batch, without host syncs."""
    cached = getattr(forward_batch, TAIL_ATTR, None)
    if cached is not None:
        return cached
    start, length = forward_batch.extend_start_loc.long(), forward_batch.extend_seq_lens.long()
    offsets = torch.arange(window, device=start.device)
    idx = (start + length - window)[:, None] + offsets[None, :]          # may precede the request's tokens
    valid = idx >= start[:, None]
    idx = torch.where(valid, idx, start[:, None].expand_as(idx))
    owners = forward_batch.req_pool_indices[:, None].expand_as(idx)
    tail = (idx, owners, valid)
    setattr(forward_batch, TAIL_ATTR, tail)
    return tail


def forward_extend_before(self, q, k, v, layer, forward_batch, *args, **kwargs):
    rt = ams_runtime.get()
    if rt is None or rt.ring is None or not rt.settings.policy.prefill_window \
            or forward_batch.extend_start_loc is None:
        return None
    idx, owners, valid = prompt_tail(forward_batch, rt.ring.window)
    rt.ring.write_tail(layer.layer_id - rt.shape.start_layer, q, idx, owners, valid, forward_batch.positions)
    return None


HOOKS = [(TARGET, forward_extend_before, "before")]
