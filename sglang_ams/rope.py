"""Rotary position embedding (RoPE) on [..., d] tensors, described by a RopeSpec.

Frequency pair f of a head vector is (x[i], x[j]) with (i, j) = (f, f + d_rot/2) for "neox" (HF's rotate_half:
Llama, Qwen, Mistral) or (2f, 2f + 1) for "gptj" (interleaved). RoPE at position p rotates pair f by the angle
p * inv_freq[f]; dims past d_rot are not rotated. Seen as a complex number z_f = x[i] + i x[j], the rotation is
z_f * exp(i p inv_freq[f]).
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class RopeSpec:
    """The model's rotary embedding: inverse frequencies of the rotated pairs and their layout."""
    inv_freq: torch.Tensor          # [d_rot / 2] float32; dims past d_rot are not rotated
    style: str = "neox"             # "neox": pairs (i, i + d_rot/2) (Llama, Qwen); "gptj": pairs (2i, 2i+1)

    def __post_init__(self):
        if self.style not in ("neox", "gptj"):
            raise ValueError(f"RopeSpec.style = {self.style!r}: must be 'neox' or 'gptj'")


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    # float32 like the engines' cos/sin caches (so unrotate inverts exactly what they applied); float64 stays float64.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _split_pairs(x: torch.Tensor, rope: RopeSpec):
    """(first, second, rest): the two members of every frequency pair [..., d_rot/2] and the unrotated tail."""
    half = rope.inv_freq.numel()
    d_rot = 2 * half
    if d_rot > x.shape[-1]:
        raise ValueError(f"RoPE rotates {d_rot} dims but the head has only {x.shape[-1]}")
    rot, rest = x[..., :d_rot], x[..., d_rot:]
    if rope.style == "neox":
        return rot[..., :half], rot[..., half:], rest
    return rot[..., 0::2], rot[..., 1::2], rest


def _join_pairs(first: torch.Tensor, second: torch.Tensor, rest: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    if rope.style == "neox":
        rot = torch.cat([first, second], dim=-1)
    else:
        rot = torch.stack([first, second], dim=-1).flatten(-2)
    return torch.cat([rot, rest.to(rot.dtype)], dim=-1)


def angles(positions: torch.Tensor | int, rope: RopeSpec, dtype=torch.float32, device=None) -> torch.Tensor:
    """[..., d_rot/2] rotation angle of every frequency pair at each position."""
    positions = torch.as_tensor(positions, device=device if device is not None else rope.inv_freq.device)
    inv_freq = rope.inv_freq.to(device=positions.device, dtype=dtype)
    return positions.to(dtype)[..., None] * inv_freq


def _turn_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    """Multiply every frequency pair (as a complex number) by cos + i sin."""
    a, b, rest = _split_pairs(x, rope)
    return _join_pairs(a * cos - b * sin, a * sin + b * cos, rest, rope)


def rotate(x: torch.Tensor, positions: torch.Tensor | int, rope: RopeSpec) -> torch.Tensor:
    """Apply RoPE: x [..., d] at positions broadcastable to x.shape[:-1]. Returns x's dtype."""
    work = _work_dtype(x)
    theta = angles(positions, rope, work, x.device)
    return _turn_pairs(x.to(work), theta.cos(), theta.sin(), rope).to(x.dtype)


def unrotate(x: torch.Tensor, positions: torch.Tensor | int, rope: RopeSpec) -> torch.Tensor:
    """Undo RoPE: the pre-RoPE vector of a key or query that sits at `positions`."""
    return rotate(x, -torch.as_tensor(positions, device=x.device), rope)


def multiply_pairs(x: torch.Tensor, factor: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    """Multiply every frequency pair of x [..., d] by a complex factor [..., d_rot/2] (broadcast): applies the
    block-diagonal matrix whose 2x2 blocks are [[Re, -Im], [Im, Re]] (e.g. a mean of rotations). Dims past d_rot
    are left as they are. Returns x's working dtype (float32, or float64 for float64 input)."""
    work = _work_dtype(x)
    return _turn_pairs(x.to(work), factor.real.to(work), factor.imag.to(work), rope)


def to_complex(x: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    """[..., d_rot/2] complex frequency pairs of x (complex128 for float64 input, else complex64)."""
    work = _work_dtype(x)
    a, b, _ = _split_pairs(x.to(work), rope)
    return torch.complex(a, b)


def mean_phasor(first_position: torch.Tensor, offsets: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    """[..., d_rot/2] complex mean over offsets δ of exp(i ω_f (p + δ)), p = first_position [...].

    This is the (complex form of the) mean of RoPE rotation matrices over future positions: each 2x2 block of the
    mean matrix is [[Re, -Im], [Im, Re]] of this number. Computed in float64 because p * ω can be large.
    """
    p = first_position.to(torch.float64)[..., None, None]                    # [..., 1, 1]
    off = offsets.to(device=p.device, dtype=torch.float64)[:, None]          # [D, 1]
    inv_freq = rope.inv_freq.to(device=p.device, dtype=torch.float64)        # [F]
    theta = (p + off) * inv_freq                                             # [..., D, F]
    return torch.polar(torch.ones_like(theta), theta).mean(dim=-2)


def _rope_parameters(hf_config) -> dict:
    params = getattr(hf_config, "rope_parameters", None) or {}
    if params and "rope_theta" not in params and "rope_type" not in params:
        # Per-layer-type parameters (e.g. sliding vs full attention): the full-attention layers hold the KV we compress.
        if "full_attention" not in params:
            raise ValueError(f"cannot pick RoPE parameters among layer types {sorted(params)}")
        params = params["full_attention"]
    return dict(params)


def inv_freq_from_config(hf_config) -> torch.Tensor:
    """[d_rot/2] float32 inverse frequencies of a transformers (5.x) config.

    Default RoPE is computed here (theta, head_dim, partial_rotary_factor); scaled variants (llama3, yarn, ...) go
    through transformers' own init function. Their attention_scaling (a magnitude factor, 1 for default and llama3)
    is not part of a rotation and is ignored.
    """
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    params = _rope_parameters(text_config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](text_config, "cpu")
        return inv_freq.float()
    theta = params.get("rope_theta", getattr(text_config, "rope_theta", None))
    if theta is None:
        raise ValueError("config has no rope_theta")
    head_dim = getattr(text_config, "head_dim", None) or \
        text_config.hidden_size // text_config.num_attention_heads
    factor = params.get("partial_rotary_factor", getattr(text_config, "partial_rotary_factor", None)) or 1.0
    dim = int(head_dim * factor)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim
    return 1.0 / (theta ** exponents)


# HF model types whose rotary embedding pairs interleaved dims.
_GPTJ_STYLE_MODELS = ("gptj", "cohere", "cohere2", "chatglm", "glm")


def rope_from_hf_model(model, style: str | None = None) -> RopeSpec:
    """RopeSpec of a loaded HF model: the inv_freq buffer of its (first) rotary embedding module."""
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor):
            break
    else:
        return RopeSpec(inv_freq_from_config(model.config), style or "neox")
    if style is None:
        model_type = getattr(model.config, "model_type", "")
        style = "gptj" if model_type in _GPTJ_STYLE_MODELS else "neox"
    return RopeSpec(inv_freq.detach().float().cpu().clone(), style)
