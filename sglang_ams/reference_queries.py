"""Window-query capture for the reference loop (sglang_ams.reference): a recording attention function registered in
transformers' AttentionInterface (and the matching mask function) stores the post-RoPE query of every layer into a
ring, then calls the model's own sdpa/eager attention unchanged."""
from __future__ import annotations

import contextlib
import sys

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

_RECORDING = "sglang_ams_recording_"      # + the model's own implementation (sdpa, eager, ...)
RING_KWARG = "sglang_ams_query_ring"


class QueryRing:
    """The last W queries of every layer: [L, Hq, W, d], slot = step mod W. Steps count decode steps, or, with a
    prefill window, positions (the prompt's last W queries fill the ring first)."""

    def __init__(self, num_layers: int, num_q_heads: int, window: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.buf = torch.zeros(num_layers, num_q_heads, window, head_dim, dtype=dtype, device=device)
        self.window = window
        self.steps = 0             # decode steps recorded in total (prefill window: the next position)
        self.prefill = False       # the forward running is the prompt's

    def write(self, layer: int, query: torch.Tensor) -> None:
        # query [1, Hq, T, d] post-RoPE, as the attention function receives it: one decode token, or the prompt
        # (positions steps - T .. steps - 1) of which the last W are kept.
        if not self.prefill:
            self.buf[layer, :, self.steps % self.window] = query[0, :, -1]
            return
        m = min(self.window, query.shape[2])
        slots = (self.steps - m + torch.arange(m, device=self.buf.device)) % self.window
        self.buf[layer, :, slots] = query[0, :, -m:]

    def advance(self) -> None:
        self.steps += 1

    def ordered(self) -> torch.Tensor:
        """[L, Hq, W, d], oldest first and newest last (the ScoreInputs order)."""
        return torch.roll(self.buf, shifts=-(self.steps % self.window), dims=2)


def _base_attention(base: str, module):
    if base in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[base]
    # "eager" is not in the registry: each model file defines its own eager_attention_forward.
    return sys.modules[type(module).__module__].eager_attention_forward


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    ring = kwargs.pop(RING_KWARG, None)
    if ring is not None:
        ring.write(module.layer_idx, query)
    if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
        # Per-layer budgets: the mask is sized from layer 0's cache. One decode query with no padding sees every
        # cached key of its own layer, which is what no mask means.
        if query.shape[2] != 1:
            raise RuntimeError("layers of different cache lengths can only run one decode token at a time")
        attention_mask = None
    base = module.config._attn_implementation[len(_RECORDING):]
    return _base_attention(base, module)(module, query, key, value, attention_mask, **kwargs)


def _register_recording(base: str) -> str:
    name = _RECORDING + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _recording_attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


@contextlib.contextmanager
def recording_queries(model):
    config = model.config
    original = config._attn_implementation
    base = original or "eager"
    if base.startswith(_RECORDING):
        raise RuntimeError("a reference loop is already running on this model object")
    if base not in ("sdpa", "eager"):
        raise ValueError(f"the reference loop supports sdpa and eager attention, not {base!r}")
    config._attn_implementation = _register_recording(base)
    try:
        yield
    finally:
        config._attn_implementation = original
