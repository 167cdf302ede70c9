"""The contract every scorer follows.

Shapes (N requests padded to T tokens, L layers, H KV heads, G query heads per KV head, W window queries):
  keys, values  [N, L, H, T, d]   post-RoPE keys as stored in the KV cache, in physical (slot) order per head
  lengths       [N]               valid tokens per request; positions >= lengths[n] are padding
  queries       [N, L, H*G, W, d] post-RoPE window queries; query w sits at key index lengths[n] - W + w and
                                  sees keys up to that index (causal); query head h*G + g belongs to KV head h
  query_pos     [N, W]            logical positions of the window queries (the last one is "now")
A scorer returns float32 [N, L, H, T]: higher means more worth keeping. Values at padding positions are ignored.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..config import PolicyConfig
from ..rope import RopeSpec
from ..window_attention import WindowAttention, window_attention


@dataclasses.dataclass
class ScoreInputs:
    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor
    queries: torch.Tensor | None = None
    query_pos: torch.Tensor | None = None
    rope: RopeSpec | None = None
    scale: float | None = None      # attention scale; None means 1/sqrt(d)
    attn: WindowAttention | None = None   # precomputed (the Triton kernel in the engine); else computed here
    layer_start: int = 0            # the model layer of keys[:, 0] (the engine may score a range of layers)
    model_layers: int | None = None  # layers of the whole model when keys hold a range of them

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[2]

    @property
    def group_size(self) -> int:
        if self.queries is None:
            raise ValueError("this scorer needs window queries; none were given")
        return self.queries.shape[2] // self.keys.shape[2]

    @property
    def sm_scale(self) -> float:
        return self.scale if self.scale is not None else self.keys.shape[-1] ** -0.5

    def window_attention(self) -> WindowAttention:
        if self.attn is None:
            if self.queries is None:
                raise ValueError("this scorer needs window queries; none were given")
            self.attn = window_attention(self.keys, self.queries, self.lengths, self.sm_scale)
        return self.attn

    def valid_mask(self) -> torch.Tensor:
        """[N, T] True where a token exists."""
        t = torch.arange(self.keys.shape[3], device=self.keys.device)
        return t[None, :] < self.lengths[:, None]


class Scorer:
    name: ClassVar[str]
    needs_queries: ClassVar[bool] = False
    reads_kv: ClassVar[bool] = True     # False: only the shape/device of keys is used (the engine skips gathering)
    fixed_bytes: ClassVar[int] = 0      # temporaries of score() that do not grow with the inputs (R-KV's tile)

    def __init__(self, cfg: PolicyConfig):
        self.cfg = cfg

    def transient_bytes(self, group: int, window: int, head_dim: int) -> int:
        """Most bytes score() holds at once per (request, layer, KV head, token), its output included; the
        compaction step's memory bound is built from it (engine/workspace.py; measured in tests)."""
        return 4 * group + 8

    def score(self, inputs: ScoreInputs) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


REGISTRY: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    REGISTRY[cls.name] = cls
    return cls


def make_scorer(cfg: PolicyConfig) -> Scorer:
    from . import builtin  # noqa: F401  (registers every scorer)
    return REGISTRY[cfg.scorer](cfg)
