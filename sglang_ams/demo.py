"""`sglang-ams demo`: full KV, global top-k and AMS side by side on a small real model, on the CPU.

The default run is the setting where the method's claim shows: needle in a haystack, ~1000 tokens of Paul Graham
essays with a pass key sentence at five depths (five prompts), a key-only scorer (keydiff) at a budget of 10 % of
each prompt. Global top-k ranks every token of the sequence against every other and, at that budget, drops the
needle sentence in most (layer, head) pairs; AMS cuts the sequence into segments of equal attention mass and gives
every segment a quota, so some of the needle region survives. Measured on the 30-prompt grid these five come from
(benchmarks/results/quality-qwen2.5-coder-0.5b-cpu/needle-30-prefill-window/): top-k 4/30, AMS 29/30.

The answer would come in the first decode steps, before any compaction, so its start ("I found the important
information hidden in the text. The pass key is") is given and prefilled with the prompt, as a server receives it
(one prefill serves all three policies). With the prefill window (PolicyConfig.prefill_window, the engine's
--ams-prefill-window) the prompt's last W queries fill AMS's query window and it compacts two decode steps later;
key-only top-k needs no queries and compacts before the first decode step. Either way the pass key has to come
out of the compressed cache.

--gsm8k adds the older example: one GSM8K test question after a few worked examples, compacted every `interval`
tokens while the model reasons (budget 256 tokens, snapkv, PolicyConfig defaults).

Data comes from $SGLANG_AMS_DATA (default: ../shared/data next to the repo or the working directory); without it,
a built-in question and a synthetic filler text are used, so the demo runs anywhere. The PNG (sglang_ams.demo_plot)
shows, per policy and prompt, which positions are still in the cache at the end: the shade is the fraction of
(layer, KV head) pairs that kept the token.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Callable

import torch

from .config import PolicyConfig
from .data import find_data_dir
# (the tasks are part of the demo's interface: the quality harness and the tests use them from here)
from .demo_tasks import (  # noqa: F401
    NEEDLE_ANSWER_PREFIX, NEEDLE_PROMPTS, NEEDLE_QUESTION, NEEDLE_TOKENS, Task, _last_number, gsm8k_task,
    needle_prompts, needle_task)
from .reference import ReferenceResult, generate_reference, prefill_reference

GSM8K_BUDGET = 256
NEEDLE_SCORER = "keydiff"
NEEDLE_BUDGET = 0.10                      # fraction of each prompt (+ answer start), or tokens when >= 1
# The measured CPU needle runs' settings (benchmarks/quality HARNESS_DEFAULTS with --set delta=0.02 --set
# prefill_window=true; tests/test_reference.py checks they still agree). Sized for budgets of ~100 tokens: with
# PolicyConfig's defaults (keep_lastn 32, lmin 32) AMS would have room for only a segment or two.
NEEDLE_SETTINGS = {"window": 8, "sink": 4, "keep_lastn": 16, "lmin": 4, "qmin": 2, "delta": 0.02, "lmax": 1024,
                   "prefill_window": True}


# ---------------------------------------------------------------------------------------------------------------
# Policies

def default_interval(budget: int, window: int | None = None) -> int:
    return max(window or PolicyConfig().window, budget // 4)


def demo_policies(budget: int, interval: int | None = None, scorer: str = "snapkv",
                  **settings) -> dict[str, PolicyConfig]:
    """Full KV, global top-k and AMS with one budget, interval, scorer and settings."""
    interval = interval or default_interval(budget, settings.get("window"))
    base = PolicyConfig(policy="none", budget=budget, interval=interval, scorer=scorer, **settings)
    return {"full KV": base, "top-k": base.replace(policy="topk"), "AMS": base.replace(policy="ams")}


def budget_tokens(budget: float, basis: int, settings: dict = NEEDLE_SETTINGS) -> int:
    """A budget below 1 is a fraction of `basis` tokens (rounded, as the quality harness does), else a token count;
    never below the smallest valid budget (sink + keep_lastn + 1)."""
    floor = settings["sink"] + settings["keep_lastn"] + 1
    tokens = int(round(budget * basis)) if budget < 1 else int(budget)
    return max(floor, tokens)


def needle_policies(task: Task, scorer: str = NEEDLE_SCORER, budget: float = NEEDLE_BUDGET,
                    interval: int | None = None) -> dict[str, PolicyConfig]:
    """The needle runs' policies for one prompt: the budget refers to the prompt plus the forced answer start."""
    tokens = budget_tokens(budget, len(task.prompt_ids) + len(task.forced_ids))
    return demo_policies(tokens, interval, scorer, **NEEDLE_SETTINGS)


# ---------------------------------------------------------------------------------------------------------------
# Running

@dataclasses.dataclass
class TaskOutcome:
    task: Task
    policies: dict[str, PolicyConfig]
    results: dict[str, ReferenceResult]
    seconds: dict[str, float]               # per policy, after the prefill
    prefills: int = 0                       # prefill forwards run (shared by the policies that prefill the same)
    prefill_seconds: float = 0.0

    def answer(self, policy: str) -> str:
        return self.results[policy].text or ""

    def correct(self, policy: str) -> bool:
        return self.task.check(self.answer(policy))

    def survival(self, policy: str) -> torch.Tensor:
        return survival(self.results[policy])

    def short_answer(self, policy: str) -> str:
        return short_answer(self, policy)

    def span_kept(self, policy: str, span: str) -> float | None:
        """Mean fraction of (layer, KV head) pairs keeping the tokens of a marked span at the end."""
        if span not in self.task.spans:
            return None
        start, end = self.task.spans[span]
        return float(survival(self.results[policy])[start:end].mean())


def run_inputs(task: Task, cfg: PolicyConfig) -> tuple[list[int], list[int]]:
    """(tokens prefilled, tokens forced in decode steps) for one policy. The answer start is prefilled with the
    prompt, as a server receives it, unless the policy reads window queries and has no prefill window: then its
    first W tokens are decoded to fill the window, so that compaction runs before the model answers. Policies that
    prefill the same tokens share one prefill forward (the demo's main cost on a CPU)."""
    if cfg.enabled and cfg.needs_queries and not cfg.prefill_window:
        return task.prompt_ids, task.forced_ids
    return task.prompt_ids + task.forced_ids, []


def run_task(model, tokenizer, task: Task, policies: dict[str, PolicyConfig],
             stop_ids: set[int]) -> TaskOutcome:
    """Every policy on one task; policies that prefill the same tokens share one prefill forward."""
    results, seconds, prefills, prefill_seconds = {}, {}, {}, 0.0
    for name, cfg in policies.items():
        prompt, forced = run_inputs(task, cfg)
        key = (tuple(prompt), cfg.window)
        if key not in prefills:
            start = time.perf_counter()
            prefills[key] = prefill_reference(model, prompt, cfg.window)
            prefill_seconds += time.perf_counter() - start
        start = time.perf_counter()
        results[name] = generate_reference(model, prompt, cfg, task.max_new_tokens, tokenizer=tokenizer,
                                           eos_token_ids=stop_ids, forced_tokens=forced, prefill=prefills[key])
        seconds[name] = time.perf_counter() - start
    return TaskOutcome(task, policies, results, seconds, len(prefills), prefill_seconds)


def stop_token_ids(model, tokenizer) -> set[int]:
    """The generation config's eos plus the tokenizer's end-of-turn tokens (GGUF tokenizers disagree on eos)."""
    ids = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>") if t in vocab)
    return ids


def survival(result: ReferenceResult) -> torch.Tensor:
    """[logical length] fraction of (layer, KV head) pairs holding each token at the end of generation."""
    length = result.prompt_length + len(result.decode_positions)
    frac = torch.ones(length)
    if result.compactions:
        last = result.compactions[-1]
        nl, h, _ = last.kept.shape
        counts = torch.zeros(length)
        counts.index_add_(0, last.kept.flatten(), torch.ones(last.kept.numel()))
        frac[:last.logical_length] = counts[:last.logical_length] / (nl * h)
    return frac


# ---------------------------------------------------------------------------------------------------------------
# Reporting

def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "\u2026"


RIGHT, WRONG = "\u2713", "\u2717"


def short_answer(outcome: TaskOutcome, policy: str) -> str:
    """The pass key / final number the answer gives, and a mark (the PNG shows it: digits only, no odd glyphs)."""
    text = outcome.answer(policy)
    found = re.search(r"\d+", text) if outcome.task.name == "needle" else None
    value = found.group(0) if found else (_last_number(text) or "(no number)")
    return f"{value} {RIGHT if outcome.correct(policy) else WRONG}"


def format_outcome(outcome: TaskOutcome, width: int = 64) -> str:
    """One prompt, one line per policy (the GSM8K example)."""
    task = outcome.task
    lines = [f"== {task.name}: {task.description}; prompt {len(task.prompt_ids)} tokens, gold {task.gold}; "
             f"{outcome.prefills} shared prefill(s), {outcome.prefill_seconds:.1f} s"]
    lines.append(f"{'policy':<8} {'KV kept / seen':>15} {'peak':>5} {'compact.':>8} {'s':>6}  ok  answer")
    for name, res in outcome.results.items():
        seen = res.prompt_length + len(res.decode_positions)
        lines.append(f"{name:<8} {f'{res.final_kv_length}/{seen}':>15} {res.peak_kv_length:>5} "
                     f"{res.num_compactions:>8} {outcome.seconds[name]:>6.1f}  "
                     f"{'yes' if outcome.correct(name) else 'no ':<3} {_one_line(outcome.answer(name), width)}")
    return "\n".join(lines)


def describe_settings(outcomes: list[TaskOutcome], budget: float) -> str:
    cfg = outcomes[0].policies["AMS"]
    basis = [len(o.task.prompt_ids) + len(o.task.forced_ids) for o in outcomes]
    share = f"{budget:.0%} of each prompt" if budget < 1 else f"{int(budget)} tokens"
    source = "the prompt's" if cfg.prefill_window else "the decode steps'"
    window = f"{source} last {cfg.window} queries"
    return (f"KV budget {share}: {cfg.budget} of {basis[0]} tokens per (layer, KV head) "
            + (f"(prompts {min(basis)}-{max(basis)} tokens) " if min(basis) != max(basis) else "")
            + f"+ up to {cfg.interval} before a compaction; scorer {cfg.scorer}; query window: {window}")


def format_needle(outcomes: list[TaskOutcome], budget: float) -> str:
    """Per prompt the answer of every policy and how much of the needle it kept; the counts; one full answer each."""
    policies = list(outcomes[0].results)
    task = outcomes[0].task
    source = task.description[task.description.rfind("(") + 1:-1]
    lines = [f"== needle in a haystack: {len(outcomes)} prompts of {len(task.prompt_ids)} tokens ({source})",
             describe_settings(outcomes, budget), "",
             f"{'prompt':<15} {'gold':<7}" + "".join(f" {n:<22}" for n in policies)]
    for o in outcomes:
        cells = [f"{short_answer(o, n)} (needle {o.span_kept(n, 'needle'):.0%})" for n in policies]
        lines.append(f"{o.task.label:<15} {o.task.gold:<7}" + "".join(f" {c:<22}" for c in cells))
    counts = [f"{sum(o.correct(n) for o in outcomes)}/{len(outcomes)} correct" for n in policies]
    lines.append(f"{'':<23}" + "".join(f" {c:<22}" for c in counts))
    seconds = [f"{sum(o.seconds[n] for o in outcomes):.0f} s decoding" for n in policies]
    lines.append(f"{'':<23}" + "".join(f" {c:<22}" for c in seconds))
    lines.append(f"{'':<23} after {sum(o.prefills for o in outcomes)} prefill forwards that the policies share: "
                 f"{sum(o.prefill_seconds for o in outcomes):.0f} s")
    first = outcomes[0]
    lines += ["", "(needle N %: share of the needle sentence's (token, layer, head) entries still cached)",
              f"answers to '{first.task.label}' after the given start \"{NEEDLE_ANSWER_PREFIX}\":"]
    lines += [f"  {n:<8} {first.answer(n)!r}" for n in policies]
    return "\n".join(lines)


@dataclasses.dataclass
class DemoReport:
    needle: list[TaskOutcome]
    gsm8k: TaskOutcome | None
    pngs: list[Path]
    text: str

    def counts(self) -> dict[str, int]:
        """Correct needle answers per policy."""
        names = list(self.needle[0].results) if self.needle else []
        return {n: sum(o.correct(n) for o in self.needle) for n in names}


def run_demo(model, tokenizer, scorer: str = NEEDLE_SCORER, budget: float = NEEDLE_BUDGET,
             interval: int | None = None, prompts: int = NEEDLE_PROMPTS, needle_tokens: int = NEEDLE_TOKENS,
             gsm8k: bool = False, out: str | os.PathLike | None = "demo.png", data_dir: Path | None = None,
             title: str = "", gsm8k_index: int = 0, gsm8k_new_tokens: int = 256,
             echo: Callable[[str], None] = print) -> DemoReport:
    """The needle prompts under full KV, global top-k and AMS (and, with gsm8k, the GSM8K example), with an
    already-loaded model; writes the PNG(s) when `out` is given."""
    from .demo_plot import plot_kept
    data_dir = data_dir if data_dir is not None else find_data_dir()
    stops = stop_token_ids(model, tokenizer)
    tasks = needle_prompts(tokenizer, data_dir, prompts, needle_tokens) if prompts else []
    for task in tasks:      # every config is checked before the first (slow) run
        needle_policies(task, scorer, budget, interval)
    needle = []
    for i, task in enumerate(tasks):
        echo(f"prompt {i + 1}/{len(tasks)} ({task.label}, {len(task.prompt_ids)} tokens): "
             + ", ".join(needle_policies(task, scorer, budget, interval)) + " ...")
        needle.append(run_task(model, tokenizer, task, needle_policies(task, scorer, budget, interval), stops))
    blocks, pngs = [], []
    if needle:
        blocks.append(format_needle(needle, budget))
        echo(blocks[-1])
        if out:
            pngs.append(plot_kept(needle, out, f"{title}needle in a haystack, {len(needle)} prompts: which tokens "
                                  f"each policy still caches at the end\n{describe_settings(needle, budget)}"))
    math = None
    if gsm8k:
        task = gsm8k_task(tokenizer, data_dir, gsm8k_index, max_new_tokens=gsm8k_new_tokens)
        echo(f"GSM8K example ({task.description}): full KV, top-k, AMS ...")
        math = run_task(model, tokenizer, task, demo_policies(GSM8K_BUDGET, scorer="snapkv"), stops)
        blocks.append(format_outcome(math))
        echo(blocks[-1])
        if out:
            path = Path(out)
            pngs.append(plot_kept([math], path.with_name(f"{path.stem}-gsm8k{path.suffix}"),
                                  f"{title}GSM8K, budget {GSM8K_BUDGET} tokens, snapkv"))
    for png in pngs:
        echo(f"wrote {png}")
    return DemoReport(needle, math, pngs, "\n".join(blocks))


def load_model(name: str, dtype: torch.dtype = torch.float32, progress: bool = True):
    """(model, tokenizer) of a named real model, built on first use (see sglang_ams.models).

    float32 by default: the folder holds bf16 values, which float32 represents exactly, and CPU bf16 matmuls are
    about 2.4x slower than float32 ones on the 2-core development machine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import build_model
    folder = build_model(name, progress=progress)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(folder)
