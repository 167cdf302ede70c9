"""The demo's tasks: a GSM8K question after worked examples and a needle (pass key) in a haystack of essays, one
prompt format each (the model's chat template), with the spans the plots mark. Without the data folder, a built-in
question and a synthetic filler text are used. The quality harness (benchmarks/quality) builds its prompts here."""
from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Callable



GSM8K_SHOTS = 3
NEEDLE_TOKENS = 1000
NEEDLE_DEPTH = 0.5
NEEDLE_PROMPTS = 5

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
NEEDLE_QUESTION = "What is the pass key? Answer with the number only."



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
    label: str = ""                         # short row name in tables and the PNG


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
                max_new_tokens, spans, f"GSM8K #{index}")


def needle_task(tokenizer, data_dir: Path | None, context_tokens: int = NEEDLE_TOKENS,
                depth: float = NEEDLE_DEPTH, seed: int = 0, max_new_tokens: int = 12) -> Task:
    passkey = str(random.Random(seed).randint(10000, 99999))
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key."
    context, source = haystack_text(data_dir, tokenizer, context_tokens)
    cut = context.find(". ", int(len(context) * depth))
    cut = len(context) if cut < 0 else cut + 2
    context = f"{context[:cut]}{needle} {context[cut:]}"
    user = f"{NEEDLE_INSTRUCTION}\n\n{context}\n\n{NEEDLE_QUESTION}"
    ids, spans = _encode_with_spans(tokenizer, _render(tokenizer, [("user", user)]),
                                    {"needle": needle, "question": NEEDLE_QUESTION})
    forced = tokenizer(NEEDLE_ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    return Task("needle", f"pass key at depth {depth:.0%} of ~{context_tokens} tokens ({source})", ids,
                list(forced), passkey, lambda answer: passkey in answer, max_new_tokens, spans,
                f"needle at {depth:.0%}")


def needle_prompts(tokenizer, data_dir: Path | None, count: int = NEEDLE_PROMPTS,
                   context_tokens: int = NEEDLE_TOKENS) -> list[Task]:
    """`count` needle prompts at evenly spread depths ((i + 0.5) / count). Pass keys cycle through seeds 0-2, so
    the five default prompts are points of the measured 30-prompt grid (2 lengths x 5 depths x 3 keys)."""
    return [needle_task(tokenizer, data_dir, context_tokens, depth=(i + 0.5) / count, seed=i % 3)
            for i in range(count)]
