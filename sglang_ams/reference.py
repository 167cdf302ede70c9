"""The reference decode loop (CPU, or the model's device): greedy generation on HF transformers with a KV policy
applied to the cache.

This is the oracle the SGLang path is compared with, so it favours exactness over speed:
  * with policy "none" (or a budget no request reaches) it runs exactly the forwards `model.generate(do_sample=False)`
    runs (same inputs, same cache class, same masks), so its tokens are identical;
  * compaction follows DESIGN.md §2-§4: it runs between decode steps, once the physical KV length reaches
    budget + interval and (for policies that read queries) at least W decode steps happened since prefill or the
    last compaction; every (layer, KV head) keeps `budget` tokens in composite slots (head h's j-th kept token in
    slot j), and the AMS credit moves with its tokens;
  * positions stay logical: each new token gets position_ids = its logical position while the cache holds fewer
    physical entries. transformers 5.12 sizes the causal mask from the cache's physical length (there is no
    cache_position any more), so the attention mask we pass is physical length + new tokens long.

Window queries are captured by running the model under a recording attention function registered in transformers'
AttentionInterface (and the matching mask function in AttentionMaskInterface): it stores the post-RoPE query of
every layer at each decode step into a ring, then calls the model's own sdpa/eager attention unchanged. The model's
`config._attn_implementation` is switched for the duration of the call and restored after, so do not run two
reference loops on the same model object concurrently.

Batch 1: one prompt per call.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .compaction import gather_kept, plan, scorer_for
from .config import PolicyConfig
from .layer_budget import plan_layers
from .reference_queries import RING_KWARG, QueryRing, recording_queries
from .rope import RopeSpec, rope_from_hf_model
from .scorers.base import ScoreInputs


@dataclasses.dataclass
class Compaction:
    """One compaction: when it ran and what every (layer, KV head) kept."""
    step: int                  # decode forwards done when it ran (it acts right before the next one)
    logical_length: int        # tokens in the sequence so far (prompt + fed decode tokens)
    physical_before: int       # KV entries per head before; afterwards there are `kept.shape[-1]`
    kept: torch.Tensor         # [L, H, K] int64 LOGICAL positions kept, ascending per (layer, head)


@dataclasses.dataclass
class ReferenceResult:
    prompt_length: int
    token_ids: list[int]       # generated tokens (the eos that stopped generation included, as generate() does)
    text: str | None           # decoded token_ids (skip_special_tokens) when a tokenizer was given
    compactions: list[Compaction]
    kv_lengths: list[int]      # physical KV length per head after each forward (prefill first; the mean over
                               # layers under per-layer budgets)
    decode_positions: list[int]  # logical position_ids given to each decode forward
    forced_prefilled: int = 0    # forced tokens prefilled at the end of the prompt (prefill window)

    @property
    def num_compactions(self) -> int:
        return len(self.compactions)

    @property
    def kept_indices(self) -> list[torch.Tensor]:
        return [c.kept for c in self.compactions]

    @property
    def peak_kv_length(self) -> int:
        return max(self.kv_lengths)

    @property
    def final_kv_length(self) -> int:
        # Compaction only runs right before a forward, so the last forward's length is the final one.
        return self.kv_lengths[-1]


# --------------------------------------------------------------------------------------------------------------
# The KV cache seen as [1, L, H, T, d] with logical positions per slot

class _CompactedCache:
    """A DynamicCache plus what compaction needs to know about it: the logical position held by every
    (layer, head, slot) and the AMS credit carried by the kept tokens."""

    def __init__(self, model, num_layers: int, num_kv_heads: int):
        self.cache = DynamicCache(config=model.config)
        self.device = model.device
        odd = [type(layer).__name__ for layer in self.cache.layers if type(layer) is not DynamicLayer]
        if odd:
            raise ValueError(f"the reference loop needs full-attention layers only; this model's cache has {odd}")
        self.positions = torch.zeros(num_layers, num_kv_heads, 0, dtype=torch.long, device=model.device)
        self.credit: torch.Tensor | None = None       # [1, L, H, K] from the last compaction
        # Per-layer budgets: tokens of each layer [L] (positions padded with -1 past them); None: all equal.
        self.layer_lengths: torch.Tensor | None = None

    @property
    def physical_length(self) -> int:
        return self.cache.get_seq_length()

    @property
    def mean_length(self) -> int:
        """KV entries per head averaged over layers: the physical length, unless layers differ (then the total
        is layers x budget + appended tokens, so the mean is still an integer)."""
        if self.layer_lengths is None:
            return self.physical_length
        return int(self.layer_lengths.sum()) // self.layer_lengths.numel()

    def appended(self, logical_positions: torch.Tensor) -> None:
        """Record the logical positions of tokens a forward just appended (same for every layer and head)."""
        nl, h, _ = self.positions.shape
        new = logical_positions.view(1, 1, -1).expand(nl, h, -1)
        if self.layer_lengths is None:
            self.positions = torch.cat([self.positions, new], dim=-1)
            return
        k = new.shape[-1]
        grown = torch.nn.functional.pad(self.positions, (0, k), value=-1)
        at = (self.layer_lengths.view(nl, 1, 1) + torch.arange(k, device=grown.device)).expand(nl, h, k)
        self.positions = grown.scatter(-1, at, new)
        self.layer_lengths = self.layer_lengths + k

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layer_lengths is not None:          # layers of different lengths: zero-padded to the longest
            t = max(layer.keys.shape[-2] for layer in self.cache.layers)
            pad = [(0, 0, 0, t - layer.keys.shape[-2]) for layer in self.cache.layers]
            keys = torch.stack([torch.nn.functional.pad(layer.keys, p)
                                for layer, p in zip(self.cache.layers, pad)], dim=1)
            values = torch.stack([torch.nn.functional.pad(layer.values, p)
                                  for layer, p in zip(self.cache.layers, pad)], dim=1)
            return keys, values
        keys = torch.stack([layer.keys for layer in self.cache.layers], dim=1)      # [1, L, H, T, d]
        values = torch.stack([layer.values for layer in self.cache.layers], dim=1)
        return keys, values

    def lengths_per_layer(self) -> torch.Tensor:
        if self.layer_lengths is not None:
            return self.layer_lengths
        return torch.full((self.positions.shape[0],), self.physical_length, dtype=torch.long, device=self.device)

    def credit_for(self, length: int) -> torch.Tensor | None:
        """Carried credit aligned with the current slots: new tokens start at 0."""
        if self.credit is None:
            return None
        return torch.nn.functional.pad(self.credit, (0, length - self.credit.shape[-1]))

    def keep(self, indices: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
             credit: torch.Tensor | None) -> None:
        """Replace the cache by the kept tokens: indices [1, L, H, K] physical slots, ascending."""
        kept_k, kept_v = gather_kept(keys, indices), gather_kept(values, indices)
        for layer_idx, layer in enumerate(self.cache.layers):
            layer.keys = kept_k[:, layer_idx].contiguous()
            layer.values = kept_v[:, layer_idx].contiguous()
        self.positions = self.positions.gather(-1, indices[0])
        self.credit = credit

    def keep_layers(self, indices: torch.Tensor, budgets: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    credit: torch.Tensor | None) -> None:
        """keep() with budgets [L] tokens per layer: indices [1, L, H, K] ascending, -1 past a layer's budget."""
        kept_k, kept_v = gather_kept(keys, indices), gather_kept(values, indices)
        for layer_idx, (layer, b) in enumerate(zip(self.cache.layers, budgets.tolist())):
            layer.keys = kept_k[:, layer_idx, :, :b].contiguous()
            layer.values = kept_v[:, layer_idx, :, :b].contiguous()
        self.positions = self.positions.gather(-1, indices[0].clamp(min=0)).masked_fill(indices[0] < 0, -1)
        self.layer_lengths = budgets.to(self.device)
        self.credit = credit


# --------------------------------------------------------------------------------------------------------------
# The loop

def _model_shape(model) -> tuple[int, int, int, int]:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim


def _attention_scale(model) -> float | None:
    for module in model.modules():
        if hasattr(module, "scaling") and hasattr(module, "layer_idx"):
            return float(module.scaling)
    return None


def _eos_ids(model, eos_token_ids) -> set[int]:
    if eos_token_ids is None:
        eos_token_ids = getattr(model.generation_config, "eos_token_id", None)
    if eos_token_ids is None:
        return set()
    if isinstance(eos_token_ids, int):
        return {eos_token_ids}
    return {int(t) for t in eos_token_ids}


def _prompt_tensor(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"one prompt at a time: input_ids must be [T] or [1, T], got {tuple(ids.shape)}")
    return ids


class _Compactor:
    """Builds ScoreInputs from the cache and the query ring, plans, and rewrites the cache."""

    def __init__(self, model, cfg: PolicyConfig):
        self.cfg = cfg
        self.scorer = scorer_for(cfg)
        self.rope: RopeSpec = rope_from_hf_model(model)
        self.scale = _attention_scale(model)
        self.device = model.device
        self.n_pinned = torch.tensor([cfg.pinned_len(0)], device=self.device)     # no radix-shared prefix here
        self.n_keep = torch.tensor([cfg.kept_len(0)], device=self.device)

    def due(self, kv: _CompactedCache, ring: QueryRing | None, steps_since: int) -> bool:
        if kv.mean_length < self.cfg.trigger_len(0):
            return False
        return ring is None or steps_since >= ring.window

    def run(self, kv: _CompactedCache, ring: QueryRing | None, logical_length: int) -> torch.Tensor:
        if self.cfg.layer_budget == "adaptive":
            return self.run_layers(kv, ring, logical_length)
        keys, values = kv.stacked()           # (both always: the kept ones are gathered from them)
        length, w, need = keys.shape[3], self.cfg.window, self.cfg.inputs
        positions = torch.arange(logical_length - w, logical_length, device=self.device)[None]
        inputs = ScoreInputs(
            keys=keys, values=values, lengths=torch.tensor([length], device=self.device),
            queries=ring.ordered()[None] if need.reads_window else None,
            query_pos=positions if need.reads_window or need.positions else None,
            rope=self.rope if need.rope else None, scale=self.scale)
        selection = plan(self.cfg, self.scorer, inputs, self.n_pinned, self.n_keep,
                         credit=kv.credit_for(length), k_max=self.cfg.budget)
        k = int(selection.n_keep[0])
        indices = selection.indices[..., :k]
        credit = None if selection.credit is None else selection.credit[..., :k]
        kv.keep(indices, keys, values, credit)
        return kv.positions.cpu()

    def run_layers(self, kv: _CompactedCache, ring: QueryRing, logical_length: int) -> torch.Tensor:
        """Per-layer budgets (layer_budget.py): layer l is request l of the batch, with its own length."""
        keys, values = kv.stacked()
        nl, length, w = keys.shape[1], keys.shape[3], self.cfg.window
        inputs = ScoreInputs(
            keys=keys.transpose(0, 1).contiguous(), values=values.transpose(0, 1).contiguous(),
            lengths=kv.lengths_per_layer(), queries=ring.ordered()[:, None].contiguous(),
            query_pos=torch.arange(logical_length - w, logical_length, device=self.device)[None].expand(nl, w),
            rope=self.rope, scale=self.scale)
        credit = kv.credit_for(length)
        selection, budgets = plan_layers(self.cfg, self.scorer, inputs, self.n_pinned,
                                         None if credit is None else credit.transpose(0, 1).contiguous())
        indices = selection.indices.transpose(0, 1)                       # [1, L, H, K]
        carried = None if selection.credit is None else selection.credit.transpose(0, 1).contiguous()
        kv.keep_layers(indices, budgets, keys, values, carried)
        return kv.positions.cpu()


@dataclasses.dataclass
class Prefill:
    """One prompt's prefill forward, to start several generate_reference calls on the same tokens without running
    it again (the demo runs three policies per prompt). It holds what the forward leaves behind: the prompt's K/V,
    the token it predicts, and the ring a prefill window starts with (the prompt's last W queries)."""
    input_ids: torch.Tensor               # [1, T]
    keys: list[torch.Tensor]              # per layer [1, H, T, d]
    values: list[torch.Tensor]
    queries: torch.Tensor                 # [L, Hq, W, d]: QueryRing.buf after a prefill-window prefill
    predicted: int

    def restore(self, kv: _CompactedCache, ring: QueryRing | None, prompt: torch.Tensor) -> int:
        """Put the prefill into a fresh cache (and ring); return the predicted token, as _forward would."""
        if not torch.equal(prompt.cpu(), self.input_ids.cpu()):
            raise ValueError("this Prefill was made from other tokens than the prompt (+ prefilled answer start)")
        if ring is not None:
            if ring.buf.shape != self.queries.shape:
                raise ValueError(f"this Prefill holds {self.queries.shape[2]} window queries; the policy needs "
                                 f"{ring.buf.shape[2]} (make it with window=cfg.window)")
            ring.buf.copy_(self.queries)
        for layer_idx, (keys, values) in enumerate(zip(self.keys, self.values)):
            kv.cache.update(keys, values, layer_idx)          # concatenates onto an empty layer: a copy
        kv.appended(torch.arange(prompt.shape[1], device=kv.device))
        return self.predicted


@torch.inference_mode()
def prefill_reference(model, input_ids: Sequence[int] | torch.Tensor, window: int = PolicyConfig.window) -> Prefill:
    """The prefill generate_reference runs for `input_ids` (with the answer start appended when the policy
    prefills it), recorded for reuse: pass it as generate_reference(..., prefill=...) with the same tokens."""
    prompt = _prompt_tensor(input_ids).to(model.device)
    num_layers, num_q_heads, num_kv_heads, head_dim = _model_shape(model)
    kv = _CompactedCache(model, num_layers, num_kv_heads)
    ring = QueryRing(num_layers, num_q_heads, window, head_dim, model.dtype, model.device)
    ring.steps, ring.prefill = prompt.shape[1], True
    with recording_queries(model):
        predicted = _forward(model, kv, prompt, torch.arange(prompt.shape[1], device=model.device), ring)
    return Prefill(prompt, [layer.keys for layer in kv.cache.layers], [layer.values for layer in kv.cache.layers],
                   ring.buf, predicted)


def _forward(model, kv: _CompactedCache, tokens: torch.Tensor, positions: torch.Tensor, ring):
    extra = {} if ring is None else {RING_KWARG: ring}
    mask = torch.ones(1, kv.physical_length + tokens.shape[1], dtype=torch.long, device=kv.device)
    out = model(input_ids=tokens, position_ids=positions[None], attention_mask=mask,
                past_key_values=kv.cache, use_cache=True, logits_to_keep=1, **extra)
    kv.appended(positions)
    return int(out.logits[0, -1].float().argmax())


@torch.inference_mode()
def generate_reference(model, input_ids: Sequence[int] | torch.Tensor, cfg: PolicyConfig,
                       max_new_tokens: int, tokenizer=None,
                       eos_token_ids: int | Iterable[int] | None = None,
                       forced_tokens: Sequence[int] = (), prefill: Prefill | None = None) -> ReferenceResult:
    """Greedy generation of one prompt under a KV policy.

    eos_token_ids: generation stops after emitting one of these (default: model.generation_config's, like
    generate()); pass () to always produce max_new_tokens.
    forced_tokens: fed one per decode step, in place of the model's choice, before greedy generation starts
    (teacher forcing an answer prefix). They count as decode steps, so compaction can run before the model answers;
    they are not part of token_ids. With cfg.prefill_window they are prefilled with the prompt instead (as a
    server receives them) and the prompt's last W queries start the window: the first compaction may run after
    MIN_DECODE_STEPS decode steps, as in the engine.
    prefill: a prefill_reference of the tokens this call prefills (the prompt, plus forced_tokens with a prefill
    window), used instead of running that forward again; the result is the same.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    device = model.device
    prompt = _prompt_tensor(input_ids).to(device)
    eos = _eos_ids(model, eos_token_ids)
    num_layers, num_q_heads, num_kv_heads, head_dim = _model_shape(model)
    kv = _CompactedCache(model, num_layers, num_kv_heads)
    compactor = _Compactor(model, cfg) if cfg.enabled else None
    ring = QueryRing(num_layers, num_q_heads, cfg.window, head_dim, model.dtype, device) \
        if compactor is not None and cfg.needs_queries else None

    generated: list[int] = []
    compactions: list[Compaction] = []
    decode_positions: list[int] = []
    forced = [int(t) for t in forced_tokens]
    prefill_window = ring is not None and cfg.prefill_window
    forced_prefilled = 0
    if prefill_window and forced:
        prompt = torch.cat([prompt, torch.tensor([forced], dtype=prompt.dtype, device=device)], dim=1)
        forced_prefilled, forced = len(forced), []
    logical = prompt.shape[1]
    steps_since = 0
    if prefill_window:
        # The prompt supplies min(W, T) window queries; the engine compacts no earlier than MIN_DECODE_STEPS.
        decode_steps_needed = max(cfg.MIN_DECODE_STEPS, cfg.window - min(cfg.window, logical))
        steps_since = cfg.window - decode_steps_needed
        ring.steps, ring.prefill = logical, True

    with recording_queries(model):
        if prefill is None:
            predicted = _forward(model, kv, prompt, torch.arange(logical, device=device),
                                 ring if prefill_window else None)
        else:
            predicted = prefill.restore(kv, ring if prefill_window else None, prompt)
        if ring is not None:
            ring.prefill = False
        kv_lengths = [kv.mean_length]
        while True:
            if forced:
                token = forced.pop(0)
            else:
                token = predicted
                generated.append(token)
                if len(generated) >= max_new_tokens or token in eos:
                    break
            if compactor is not None and compactor.due(kv, ring, steps_since):
                before = kv.mean_length
                kept = compactor.run(kv, ring, logical)
                compactions.append(Compaction(len(decode_positions), logical, before, kept))
                steps_since = 0
            decode_positions.append(logical)
            predicted = _forward(model, kv, torch.tensor([[token]], device=device),
                                 torch.tensor([logical], device=device), ring)
            kv_lengths.append(kv.mean_length)
            if ring is not None:
                ring.advance()
            logical += 1
            steps_since += 1

    text = tokenizer.decode(generated, skip_special_tokens=True) if tokenizer is not None else None
    return ReferenceResult(prompt.shape[1], generated, text, compactions, kv_lengths, decode_positions,
                           forced_prefilled)
