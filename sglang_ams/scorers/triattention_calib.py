"""Offline query statistics for the TriAttention scorer: gather, save, load.

What is gathered, per (layer, query head, frequency pair f) of a transformers causal LM:
  q_mean[l, h, f]     = E[q_f], the mean of the complex pair q_f = q[i] + i q[j] of the *pre-RoPE* query
                        (pairs laid out as the model's RoPE pairs them, see sglang_ams.rope)
  q_abs_mean[l, h, f] = E|q_f|
over every non-padding token of the calibration text.

How: a forward hook on each attention layer's query projection captures the pre-RoPE queries. If the layer
normalises queries before RoPE (`q_norm`, e.g. Qwen3) the hook sits on q_norm's output, else on q_proj's output
reshaped to [batch, seq, heads, head_dim]. Only the forward pass is run (no gradients, no generation). Sums are kept
in float64 and divided by the token count at the end.

File format (torch.save of a dict of plain tensors, loadable with weights_only=True):
  {"q_mean": float32 [L, Hq, F, 2] (real, imag), "q_abs_mean": float32 [L, Hq, F], "num_tokens": int64 [],
   "style": "neox"|"gptj" (as a uint8 tensor of its bytes)}

CLI:  python -m sglang_ams.scorers.triattention_calib --model M --text calib.txt --out stats.pt [--max-length 4096]
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Iterable, Mapping

import torch

from ..rope import RopeSpec, rope_from_hf_model, to_complex


@dataclasses.dataclass
class TriAttentionStats:
    q_mean: torch.Tensor        # [L, Hq, F] complex64
    q_abs_mean: torch.Tensor    # [L, Hq, F] float32
    num_tokens: int
    style: str = "neox"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.q_mean.shape)


def save_stats(stats: TriAttentionStats, path: str) -> None:
    torch.save({
        "q_mean": torch.view_as_real(stats.q_mean.to(torch.complex64)).contiguous(),
        "q_abs_mean": stats.q_abs_mean.float().contiguous(),
        "num_tokens": torch.tensor(stats.num_tokens, dtype=torch.int64),
        "style": torch.tensor(list(stats.style.encode()), dtype=torch.uint8),
    }, path)


def load_stats(path: str, num_layers: int | None = None, num_q_heads: int | None = None,
               num_freqs: int | None = None) -> TriAttentionStats:
    """Load and check a stats file; the optional sizes must match when given."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"q_mean", "q_abs_mean", "num_tokens", "style"} - set(data)
    if missing:
        raise ValueError(f"{path}: not a TriAttention stats file (missing {sorted(missing)})")
    q_mean, q_abs = data["q_mean"], data["q_abs_mean"]
    if q_mean.dim() != 4 or q_mean.shape[-1] != 2 or q_abs.shape != q_mean.shape[:3]:
        raise ValueError(f"{path}: q_mean {list(q_mean.shape)} and q_abs_mean {list(q_abs.shape)} must be "
                         "[L, Hq, F, 2] and [L, Hq, F]")
    for label, want, got in (("layers", num_layers, q_abs.shape[0]), ("query heads", num_q_heads, q_abs.shape[1]),
                             ("frequency pairs", num_freqs, q_abs.shape[2])):
        if want is not None and want != got:
            raise ValueError(f"{path}: stats have {got} {label}, the model has {want}")
    return TriAttentionStats(q_mean=torch.view_as_complex(q_mean.float().contiguous()), q_abs_mean=q_abs.float(),
                             num_tokens=int(data["num_tokens"]), style=bytes(data["style"].tolist()).decode())


def _attention_layers(model) -> list:
    layers = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "head_dim")]
    if not layers:
        raise ValueError("no attention layers with a q_proj found in the model")
    return layers


class _Accumulator:
    """Float64 sums of the complex query pairs and their magnitudes, over the tokens the current mask allows."""

    def __init__(self, num_layers: int, rope: RopeSpec):
        self.rope = rope
        self.sum = [None] * num_layers
        self.abs_sum = [None] * num_layers
        self.tokens = 0
        self.mask: torch.Tensor | None = None   # [B, S] of the batch being run

    def hook(self, layer: int, head_dim: int):
        def capture(module, args, output):
            q = output.reshape(*output.shape[:2], -1, head_dim).double()          # [B, S, Hq, hd]
            pairs = to_complex(q, self.rope)                                      # [B, S, Hq, F]
            weight = torch.ones(pairs.shape[:2], dtype=torch.float64, device=q.device) if self.mask is None \
                else self.mask.to(device=q.device, dtype=torch.float64)
            s = torch.einsum("bs,bshf->hf", weight.to(pairs.dtype), pairs)
            a = torch.einsum("bs,bshf->hf", weight, pairs.abs())
            self.sum[layer] = s if self.sum[layer] is None else self.sum[layer] + s
            self.abs_sum[layer] = a if self.abs_sum[layer] is None else self.abs_sum[layer] + a
        return capture


@torch.no_grad()
def gather_stats(model, batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
                 rope: RopeSpec | None = None) -> TriAttentionStats:
    """Run the model over `batches` (input_ids [B, S], or dicts with input_ids and attention_mask) and return the
    pre-RoPE query statistics of every attention layer."""
    rope = rope or rope_from_hf_model(model)
    layers = _attention_layers(model)
    acc = _Accumulator(len(layers), rope)
    handles = []
    for i, attn in enumerate(layers):
        source = attn.q_norm if hasattr(attn, "q_norm") else attn.q_proj
        handles.append(source.register_forward_hook(acc.hook(i, attn.head_dim)))
    device = next(model.parameters()).device
    try:
        for batch in batches:
            batch = {"input_ids": batch} if isinstance(batch, torch.Tensor) else dict(batch)
            batch = {k: v.to(device) for k, v in batch.items()}
            acc.mask = batch.get("attention_mask")
            acc.tokens += int(acc.mask.sum()) if acc.mask is not None else batch["input_ids"].numel()
            model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if acc.tokens == 0 or acc.sum[0] is None:
        raise ValueError("no calibration tokens were seen")
    q_mean = torch.stack(acc.sum) / acc.tokens
    q_abs = torch.stack(acc.abs_sum) / acc.tokens
    return TriAttentionStats(q_mean=q_mean.to(torch.complex64).cpu(), q_abs_mean=q_abs.float().cpu(),
                             num_tokens=acc.tokens, style=rope.style)


def gather_stats_from_texts(model, tokenizer, texts: Iterable[str], max_length: int = 4096) -> TriAttentionStats:
    """Tokenise each text (truncated to max_length tokens) and gather statistics one text at a time."""
    batches = (tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length) for text in texts)
    return gather_stats(model, ({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
                                for b in batches))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="HF model id or path")
    parser.add_argument("--text", required=True, nargs="+", help="calibration text file(s), one document each")
    parser.add_argument("--out", required=True, help="where to write the stats (.pt)")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(args.device).eval()
    texts = [open(path, encoding="utf-8").read() for path in args.text]
    stats = gather_stats_from_texts(model, tokenizer, texts, args.max_length)
    save_stats(stats, args.out)
    print(f"wrote {args.out}: [layers, q heads, freqs] = {list(stats.shape)} from {stats.num_tokens} tokens")


if __name__ == "__main__":
    main()
