"""Random baseline: uniform scores, a counter-based hash of (call, request, model layer, model KV head, token).

Each call draws one base from a host generator seeded with cfg.seed (a deterministic sequence per scorer, no
device sync), then hashes the indices. The layer and head are the model's (ScoreInputs.layer_start, heads), so a
tensor-parallel rank scores its heads exactly as one process holding every head would, and every rank draws the
same base because every rank makes the same calls (compaction decisions are host state all ranks share).
"""
from __future__ import annotations

import dataclasses

import torch

from ._common import finish
from .base import Inputs, ScoreInputs, Scorer, config_field, register

MASK = (1 << 31) - 1            # hash values stay below 2^31, so products with MIX stay below 2^63 (no overflow)
MIX = 0x45D9F3B                 # odd: the multiply is a bijection mod 2^31


def mix(x: torch.Tensor) -> torch.Tensor:
    """A bijective integer mixer on [0, 2^31) (xor-shift-multiply, in place on int64 tensors)."""
    for _ in range(2):
        x ^= x >> 16
        x.mul_(MIX).bitwise_and_(MASK)
    x ^= x >> 16
    return x


def uniform(base: int, layers: torch.Tensor, heads: torch.Tensor, tokens: int, n: int) -> torch.Tensor:
    """float32 [n, L, H, tokens] in [0, 1): hash of (base, request, layers[l], heads[h], token)."""
    device = layers.device
    x = mix(torch.arange(n, device=device).add_(base & MASK).bitwise_and_(MASK))[:, None, None, None]
    x = mix(x ^ layers[None, :, None, None])
    x = mix(x ^ heads[None, None, :, None])
    x = mix(x ^ torch.arange(tokens, device=device)[None, None, None, :])
    return x.float().mul_(2.0 ** -31)


@register
@dataclasses.dataclass
class RandomScorer(Scorer):
    name = "random"
    inputs = Inputs()
    seed: int = config_field("seed")
    _generator: torch.Generator | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def transient_bytes(self, group, window, head_dim):
        return 20               # int64 hash + its shifted copy, then the float scores and finish's output

    def next_base(self) -> int:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        return int(torch.randint(0, MASK + 1, (1,), generator=self._generator))

    def score(self, inputs: ScoreInputs):
        n, nl, h, t = inputs.keys.shape[:4]
        device = inputs.keys.device
        layers = torch.arange(inputs.layer_start, inputs.layer_start + nl, device=device)
        heads = inputs.heads.kv_ids(device) if inputs.heads is not None else torch.arange(h, device=device)
        return finish(uniform(self.next_base(), layers, heads, t, n), inputs)
