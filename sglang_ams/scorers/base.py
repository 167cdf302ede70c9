"""The contract every scorer follows.

Shapes (N requests padded to T tokens, L layers, H KV heads, G query heads per KV head, W window queries):
  keys, values  [N, L, H, T, d]   post-RoPE keys as stored in the KV cache, in physical (slot) order per head
  lengths       [N]               valid tokens per request; positions >= lengths[n] are padding
  queries       [N, L, H*G, W, d] post-RoPE window queries; query w sits at key index lengths[n] - W + w and
                                  sees keys up to that index (causal); query head h*G + g belongs to KV head h
  query_pos     [N, W]            logical positions of the window queries (the last one is "now")
  heads                           which of the model's heads H and H*G are (tensor parallelism holds a slice;
                                  None: all of them). Per-head data indexed by a model-wide head id takes its
                                  offsets, and a quantity over all heads of a layer is summed over the TP group.
A scorer returns float32 [N, L, H, T]: higher means more worth keeping. Values at padding positions are ignored.
It declares what it reads (`Inputs`): the compactor and the reference loop build only that, and a test gives every
scorer only its declared inputs. Its hyper-parameters are dataclass fields (`config_field`: from the PolicyConfig).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..heads import HeadRange
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
    heads: HeadRange | None = None   # the model's heads that keys (and queries) hold; None: all of them

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


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a scorer or a selector reads. The compactor and the reference loop build only what is declared;
    ScoreInputs.keys and values are always there for their shape and device, undeclared ones may hold no data."""
    keys: bool = False          # post-RoPE keys from the KV cache
    values: bool = False
    queries: bool = False       # the last W post-RoPE queries (and their positions)
    positions: bool = False     # the window queries' logical positions only (query_pos)
    attention: bool = False     # window attention, mean over the W rows
    last_row: bool = False      # window attention of the newest query
    rope: bool = False          # the model's RoPE frequencies

    def __or__(self, other: "Inputs") -> "Inputs":
        return Inputs(**{f.name: getattr(self, f.name) or getattr(other, f.name) for f in dataclasses.fields(self)})

    @property
    def runs_attention(self) -> bool:
        """Whether window attention is computed (the engine's Triton kernel)."""
        return self.attention or self.last_row

    @property
    def reads_window(self) -> bool:
        """Whether the last W queries are needed (the engine's query ring): directly or for window attention."""
        return self.queries or self.runs_attention


def config_field(name: str, default=dataclasses.MISSING, **kwargs):
    """A hyper-parameter set from PolicyConfig.<name> (the user-facing setting) by `from_config`."""
    return dataclasses.field(default=default, metadata={"config": name}, **kwargs)


@dataclasses.dataclass
class Scorer:
    """A scorer is a dataclass of its hyper-parameters; fields made with config_field come from the PolicyConfig,
    the others are the method's constants."""
    name: ClassVar[str]
    inputs: ClassVar[Inputs] = Inputs()

    @classmethod
    def from_config(cls, cfg) -> "Scorer":
        return cls(**{f.name: getattr(cfg, f.metadata["config"]) for f in dataclasses.fields(cls)
                      if "config" in f.metadata})

    @property
    def needs(self) -> Inputs:
        """The inputs this instance reads (a scorer whose needs depend on its fields overrides it)."""
        return self.inputs

    @property
    def fixed_bytes(self) -> int:
        """Temporaries of score() that do not grow with the inputs (R-KV's tile)."""
        return 0

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
