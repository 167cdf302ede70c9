"""`sglang-ams demo`: full KV, global top-k and AMS side by side on a small real model, on the CPU.

Two prompts, both longer than budget + interval so that compaction really happens:
  * GSM8K: one test question after a few worked examples from the train split; compaction starts after W decode
    steps and then runs every `interval` tokens while the model reasons;
  * needle in a haystack: ~1.5k tokens of Paul Graham essays with a pass key sentence inserted at mid-depth. The
    answer would come within the first W decode steps, i.e. before the first compaction, so the start of the
    answer ("I found the important information hidden in the text. The pass key is") is teacher-forced: its first
    W tokens fill the query window, compaction runs, and the pass key has to come out of the compressed cache.
Data comes from $SGLANG_AMS_DATA (default: ../shared/data next to the repo or the working directory); without it,
a built-in question and a synthetic filler text are used, so the demo runs anywhere.

The PNG shows, per prompt and policy, which logical positions are still in the cache at the end: the shade is the
fraction of (layer, KV head) pairs that kept the token.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Callable

import torch

from .config import PolicyConfig
from .data import find_data_dir
from .reference import ReferenceResult, generate_reference

GSM8K_SHOTS = 3
NEEDLE_TOKENS = 1500
NEEDLE_DEPTH = 0.5

# GSM8K test question 0 (openai/grade-school-math, MIT), and two worked examples written for this fallback.
BUILTIN_QUESTION = ("Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
                    "muffins for her friends every day with four. She sells the remainder at the farmers' market "
                    "daily for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' "
                    "market?", "18")
BUILTIN_SHOTS = (
    ("A baker makes 24 rolls in the morning and 18 in the afternoon. He sells 30 rolls. How many rolls are left?",
     "He makes 24 + 18 = 42 rolls.\nAfter selling 30 he has 42 - 30 = 12 rolls left.\nThe answer is 12."),
    ("Tom buys 3 notebooks at $4 each and a pen for $2. How much does he spend?",
     "The notebooks cost 3 * 4 = $12.\nWith the pen he spends 12 + 2 = $14.\nThe answer is 14."),
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE_INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                      "Find it and memorize it. I will quiz you about it.")
# Teacher-forced start of the answer (the passkey test's usual answer format): more than W tokens, so the window
# queries are taken and compaction runs before the model emits the first digit. (Prefixes that repeat the question
# derail SmolLM2-135M even with full KV.)
NEEDLE_ANSWER_PREFIX = "I found the important information hidden in the text. The pass key is"


# ---------------------------------------------------------------------------------------------------------------
# Data

def _read_jsonl(path: Path, count: int) -> list[dict]:
    rows = []
    with open(path) as fh:
        for line in fh:
            if len(rows) >= count:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _gsm8k_solution(answer: str) -> tuple[str, str]:
    """(worked solution without calculator annotations ending 'The answer is N.', N)."""
    body, _, final = answer.partition("####")
    final = final.strip().replace(",", "")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe answer is {final}.", final


def gsm8k_examples(data_dir: Path | None, index: int, shots: int):
    """(question, gold answer, [(shot question, shot solution)]), with the built-in fallback."""
    test = data_dir / "gsm8k" / "test.jsonl" if data_dir else None
    train = data_dir / "gsm8k" / "train.jsonl" if data_dir else None
    if test is None or not test.is_file() or not train.is_file():
        return BUILTIN_QUESTION[0], BUILTIN_QUESTION[1], list(BUILTIN_SHOTS[:shots]), "built-in"
    row = _read_jsonl(test, index + 1)[index]
    examples = [(r["question"], _gsm8k_solution(r["answer"])[0]) for r in _read_jsonl(train, shots)]
    return row["question"], _gsm8k_solution(row["answer"])[1], examples, str(test)


def haystack_text(data_dir: Path | None, tokenizer, tokens: int) -> tuple[str, str]:
    """About `tokens` tokens of essay text (or synthetic filler), and where it came from."""
    folder = data_dir / "niah_paulgraham_essays" / "essays" if data_dir else None
    files = sorted(folder.glob("*.txt")) if folder is not None and folder.is_dir() else []
    source = str(folder) if files else "synthetic filler"
    text = ""
    for path in files or [None] * (1 + tokens // 8):
        piece = path.read_text() if path is not None else FILLER
        text += " ".join(piece.split()) + " "
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= tokens:
            break
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    text = tokenizer.decode(ids)
    return text[:text.rfind(". ") + 1] if ". " in text else text, source


# ---------------------------------------------------------------------------------------------------------------
# Tasks

@dataclasses.dataclass
class Task:
    name: str
    description: str
    prompt_ids: list[int]
    forced_ids: list[int]                   # teacher-forced start of the answer (see generate_reference)
    gold: str
    check: Callable[[str], bool]
    max_new_tokens: int
    spans: dict[str, tuple[int, int]]       # named token ranges [start, end) of the prompt, drawn in the PNG


def _render(tokenizer, turns: list[tuple[str, str]]) -> str:
    """The prompt text: the chat template when the tokenizer has one, a plain transcript otherwise."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": role, "content": content} for role, content in turns]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    names = {"user": "Question", "assistant": "Answer"}
    return "".join(f"{names[role]}: {content}\n\n" for role, content in turns) + "Answer:"


def _encode_with_spans(tokenizer, text: str, marks: dict[str, str]) -> tuple[list[int], dict[str, tuple[int, int]]]:
    """Token ids of `text` and the token range of the last occurrence of each marked substring."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = {}
    for name, piece in marks.items():
        start = text.rfind(piece)
        if start < 0:
            continue
        end = start + len(piece)
        hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
        if hits:
            spans[name] = (hits[0], hits[-1] + 1)
    return list(enc["input_ids"]), spans


def _last_number(text: str) -> str | None:
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def gsm8k_task(tokenizer, data_dir: Path | None, index: int = 0, shots: int = GSM8K_SHOTS,
               max_new_tokens: int = 256) -> Task:
    question, gold, examples, source = gsm8k_examples(data_dir, index, shots)
    turns = []
    for q, solution in examples:
        turns += [("user", q), ("assistant", solution)]
    turns.append(("user", question))
    ids, spans = _encode_with_spans(tokenizer, _render(tokenizer, turns), {"question": question})

    def check(answer: str) -> bool:
        found = re.search(r"answer is\s*\$?(-?[\d,]+(?:\.\d+)?)", answer)
        value = found.group(1).replace(",", "") if found else _last_number(answer)
        try:
            return value is not None and float(value) == float(gold)
        except ValueError:
            return False

    return Task("gsm8k", f"GSM8K test #{index}, {len(examples)}-shot ({source})", ids, [], gold, check,
                max_new_tokens, spans)


def needle_task(tokenizer, data_dir: Path | None, context_tokens: int = NEEDLE_TOKENS,
                depth: float = NEEDLE_DEPTH, seed: int = 0, max_new_tokens: int = 12) -> Task:
    passkey = str(random.Random(seed).randint(10000, 99999))
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key."
    context, source = haystack_text(data_dir, tokenizer, context_tokens)
    cut = context.find(". ", int(len(context) * depth))
    cut = len(context) if cut < 0 else cut + 2
    context = f"{context[:cut]}{needle} {context[cut:]}"
    user = f"{NEEDLE_INSTRUCTION}\n\n{context}\n\nWhat is the pass key? Answer with the number only."
    ids, spans = _encode_with_spans(tokenizer, _render(tokenizer, [("user", user)]), {"needle": needle})
    forced = tokenizer(NEEDLE_ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    return Task("needle", f"pass key at depth {depth:.0%} of ~{context_tokens} tokens ({source})", ids,
                list(forced), passkey, lambda answer: passkey in answer, max_new_tokens, spans)


# ---------------------------------------------------------------------------------------------------------------
# Running and reporting

def demo_policies(budget: int, interval: int) -> dict[str, PolicyConfig]:
    base = PolicyConfig(policy="none", budget=budget, interval=interval, scorer="snapkv")
    return {"full KV": base, "top-k": base.replace(policy="topk"), "AMS": base.replace(policy="ams")}


def default_interval(budget: int) -> int:
    return max(PolicyConfig().window, budget // 4)


@dataclasses.dataclass
class TaskOutcome:
    task: Task
    results: dict[str, ReferenceResult]
    seconds: dict[str, float]

    def answer(self, policy: str) -> str:
        return self.results[policy].text or ""

    def correct(self, policy: str) -> bool:
        return self.task.check(self.answer(policy))


def run_task(model, tokenizer, task: Task, policies: dict[str, PolicyConfig],
             stop_ids: set[int]) -> TaskOutcome:
    results, seconds = {}, {}
    for name, cfg in policies.items():
        start = time.perf_counter()
        results[name] = generate_reference(model, task.prompt_ids, cfg, task.max_new_tokens, tokenizer=tokenizer,
                                           eos_token_ids=stop_ids, forced_tokens=task.forced_ids)
        seconds[name] = time.perf_counter() - start
    return TaskOutcome(task, results, seconds)


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


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "\u2026"


def format_outcome(outcome: TaskOutcome, width: int = 64) -> str:
    task = outcome.task
    lines = [f"== {task.name}: {task.description}; prompt {len(task.prompt_ids)} tokens, gold {task.gold}"]
    lines.append(f"{'policy':<8} {'KV kept / seen':>15} {'peak':>5} {'compact.':>8} {'s':>6}  ok  answer")
    for name, res in outcome.results.items():
        seen = res.prompt_length + len(res.decode_positions)
        lines.append(f"{name:<8} {f'{res.final_kv_length}/{seen}':>15} {res.peak_kv_length:>5} "
                     f"{res.num_compactions:>8} {outcome.seconds[name]:>6.1f}  "
                     f"{'yes' if outcome.correct(name) else 'no ':<3} {_one_line(outcome.answer(name), width)}")
    return "\n".join(lines)


def plot_survival(outcomes: list[TaskOutcome], budget: int, interval: int, out: str | os.PathLike,
                  title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(outcomes), 1, figsize=(12, 1.6 + 1.3 * len(outcomes) * 1.6), squeeze=False)
    image = None
    for ax, outcome in zip(axes[:, 0], outcomes):
        names = list(outcome.results)
        rows = [survival(outcome.results[n]) for n in names]
        width = max(r.numel() for r in rows)
        grid = torch.full((len(rows), width), float("nan"))
        for i, r in enumerate(rows):
            grid[i, :r.numel()] = r
        image = ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1,
                          extent=(0, width, len(rows) - 0.5, -0.5))
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"{n} ({'ok' if outcome.correct(n) else 'wrong'})" for n in names])
        prompt_len = len(outcome.task.prompt_ids)
        ax.axvline(prompt_len, color="white", lw=1.2, ls="--")
        ax.text(prompt_len, -0.6, " generation \u2192", color="black", fontsize=8, va="bottom")
        for label, (start, end) in outcome.task.spans.items():
            ax.axvspan(start, end, color="red", alpha=0.25, lw=0)
            ax.text((start + end) / 2, len(rows) - 0.45, label, color="red", fontsize=8, ha="center", va="top")
        ax.set_title(f"{outcome.task.name}: {outcome.task.description}", fontsize=9)
        ax.set_xlabel("logical token position")
    fig.suptitle(f"{title}KV kept at the end of generation, budget {budget} + interval {interval} "
                 "(shade: fraction of layer/KV-head pairs keeping the token)", fontsize=10)
    fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.02, pad=0.01)
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


@dataclasses.dataclass
class DemoReport:
    outcomes: list[TaskOutcome]
    png: Path | None
    text: str


def run_demo(model, tokenizer, budget: int = 256, interval: int | None = None, out: str | os.PathLike | None =
             "demo.png", tasks: tuple[str, ...] = ("gsm8k", "needle"), data_dir: Path | None = None,
             needle_tokens: int = NEEDLE_TOKENS, gsm8k_new_tokens: int = 256, gsm8k_index: int = 0,
             title: str = "",
             echo: Callable[[str], None] = print) -> DemoReport:
    """Run every task under full KV, global top-k and AMS (SnapKV scores) with an already-loaded model."""
    interval = interval or default_interval(budget)
    policies = demo_policies(budget, interval)
    data_dir = data_dir if data_dir is not None else find_data_dir()
    builders = {"gsm8k": lambda: gsm8k_task(tokenizer, data_dir, gsm8k_index, max_new_tokens=gsm8k_new_tokens),
                "needle": lambda: needle_task(tokenizer, data_dir, needle_tokens)}
    unknown = set(tasks) - set(builders)
    if unknown:
        raise ValueError(f"unknown demo task(s) {sorted(unknown)}; known: {', '.join(builders)}")
    stops = stop_token_ids(model, tokenizer)
    outcomes, blocks = [], []
    for name in tasks:
        outcome = run_task(model, tokenizer, builders[name](), policies, stops)
        outcomes.append(outcome)
        blocks.append(format_outcome(outcome))
        echo(blocks[-1])
    png = plot_survival(outcomes, budget, interval, out, title) if out else None
    if png:
        echo(f"wrote {png}")
    return DemoReport(outcomes, png, "\n".join(blocks))


def load_model(name: str, dtype: torch.dtype = torch.float32, progress: bool = True):
    """(model, tokenizer) of a named real model, built on first use (see sglang_ams.models).

    float32 by default: the folder holds bf16 values, which float32 represents exactly, and CPU bf16 matmuls are
    about 2.4x slower than float32 ones on the 2-core development machine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import build_model
    folder = build_model(name, progress=progress)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(folder)
