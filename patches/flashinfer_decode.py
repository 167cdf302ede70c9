"""Hook on flashinfer.decode (SGLang's FlashInfer attention backend calls it for every decode layer): when the
RadixAttention hook has marked a decode call (ring.pending), run the same attention with return_lse=True and
store the LSE next to the ring's queries. The output is the same tensor SGLang would get; the LSE costs one
fp32 per query head. Inside CUDA-graph capture this is captured like the query write.
"""
from __future__ import annotations

from sglang_ams.engine import runtime as ams_runtime

TARGET = "flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper.forward"


def forward_hook(orig, self, q, paged_kv_cache, pos_encoding_mode="NONE", q_scale=None, k_scale=None, v_scale=None,
                 window_left=-1, logits_soft_cap=None, sm_scale=None, rope_scale=None, rope_theta=None):
    rt = ams_runtime.get()
    pending = rt.ring.pending if rt is not None and rt.ring is not None else None
    if pending is None:
        return orig(self, q, paged_kv_cache, pos_encoding_mode, q_scale, k_scale, v_scale, window_left,
                    logits_soft_cap, sm_scale, rope_scale, rope_theta)
    rt.ring.pending = None
    # What the deprecated forward() does, with the LSE asked for (run() takes the settings from the wrapper).
    self._pos_encoding_mode = pos_encoding_mode
    self._window_left = window_left
    self._logits_soft_cap = logits_soft_cap
    self._sm_scale = sm_scale
    self._rope_scale = rope_scale
    self._rope_theta = rope_theta
    out, lse = self.run(q, paged_kv_cache, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale, return_lse=True)
    layer, req_pool_indices, positions = pending
    if rt.settings.ring_store == "triton":
        rt.ring.store(layer, q, lse, req_pool_indices, positions)
    else:
        rt.ring.write_lse(layer, lse, req_pool_indices, positions)
    return out


HOOKS = [(TARGET, forward_hook, "around")]
