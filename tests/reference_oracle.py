"""Tiny random-weight models and the independent oracle for compacted decoding (shared by test_reference.py and
test_layer_budget.py; imported as one module so the attention function registered here reads one mask).

The oracle runs the same model with a FULL cache, logical positions, and an attention function that hides, per
(layer, KV head), every token the policy dropped."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from sglang_ams.config import PolicyConfig

VOCAB = 300
ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def tiny_model(arch: str, seed: int = 0):
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return model_cls(config).eval()


def prompt(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def small_policy(policy: str, **changes) -> PolicyConfig:
    base = dict(policy=policy, budget=48, interval=16, window=8, keep_lastn=8, sink=4, lmin=4, lmax=64, qmin=2,
                scorer="snapkv")
    base.update(changes)
    return PolicyConfig(**base)


def greedy_generate(model, ids: torch.Tensor, n: int) -> list[int]:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
    return out[0, ids.shape[1]:].tolist()


# ------------------------------------------------------------------------------------------------------------------
# The independent oracle

_REPLAY = "sglang_ams_test_masked_replay"
_VISIBLE: dict[str, torch.Tensor] = {}


def _masked_attention(module, query, key, value, attention_mask, **kwargs):
    """Decode attention over the full cache with the dropped tokens hidden per (layer, KV head)."""
    group = query.shape[1] // key.shape[1]
    visible = _VISIBLE["mask"][module.layer_idx, :, :key.shape[2]]            # [H, T]
    mask = visible.repeat_interleave(group, 0)[None, :, None, :]              # [1, Hq, 1, T]
    out = F.scaled_dot_product_attention(query, key.repeat_interleave(group, 1),
                                         value.repeat_interleave(group, 1), attn_mask=mask, scale=module.scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(_REPLAY, _masked_attention)
AttentionMaskInterface.register(_REPLAY, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@torch.inference_mode()
def masked_replay(model, ids: torch.Tensor, result, forced: list[int] = ()) -> list[int]:
    """Greedy tokens of the full-cache, masked run fed with the same tokens as `result`."""
    fed = list(forced) + result.token_ids[:-1]
    total = ids.shape[1] + len(fed)
    nl, h = model.config.num_hidden_layers, model.config.num_key_value_heads
    _VISIBLE["mask"] = torch.ones(nl, h, total, dtype=torch.bool)
    at_step = {c.step: c for c in result.compactions}
    cache = DynamicCache(config=model.config)
    preds = [int(model(ids, past_key_values=cache, use_cache=True).logits[0, -1].argmax())]
    original = model.config._attn_implementation
    model.config._attn_implementation = _REPLAY
    try:
        for step, token in enumerate(fed):
            if step in at_step:
                c = at_step[step]
                visible = torch.zeros(nl, h, total, dtype=torch.bool)
                visible.scatter_(2, c.kept, True)
                visible[..., c.logical_length:] = True
                _VISIBLE["mask"] = visible
            pos = torch.tensor([[ids.shape[1] + step]])
            logits = model(torch.tensor([[token]]), position_ids=pos, past_key_values=cache, use_cache=True).logits
            preds.append(int(logits[0, -1].argmax()))
    finally:
        model.config._attn_implementation = original
    return preds[len(forced):]
