"""Quality tasks: data loading, the one prompt format per task (shared by every policy and both backends),
answer extraction and scoring.

Every task turns a data row into an `Example`: prompt token ids (the chat template of the model's tokenizer via
sglang_ams.demo_tasks._render), teacher-forced answer start (retrieval tasks only, see below), gold answer, the number of
new tokens, and the length the budget fractions refer to (`basis`):

  task          data (under ../shared/data or $SGLANG_AMS_DATA)        basis        answer
  gsm8k_cot     gsm8k/test.jsonl, zero-shot chat CoT                     generation   "The answer is N" / last number
  gsm8k_8shot   gsm8k/test.jsonl + first 8 train rows as chat turns       generation   same (sglang_ams.demo.gsm8k_task)
  math500       math500/test.clean.jsonl, "\\boxed{}" instruction         generation   last \\boxed{...}, normalised
  kv_retrieval  lost_in_the_middle/kv-retrieval-75_keys.jsonl.gz          context      gold UUID value in the output
  needle        niah_paulgraham_essays, length x depth grid               context      pass key in the output (demo)
  nq_open       nq_open/NQ-open.dev.jsonl, closed book                    total        best-subspan exact match
  triviaqa      triviaqa/trivia_qa.rc-train-first2000.jsonl, closed book  total        best-subspan exact match

basis: "generation" = max_new_tokens (reasoning tasks: the budget is a fraction of the generation length),
"context" = prompt tokens (retrieval: the prompt is what gets compressed), "total" = prompt + max_new_tokens.

Retrieval answers (needle, kv_retrieval) come in the first few decode steps, before the first compaction could
run (compaction needs W window queries), so their answer start is teacher-forced (>= W tokens): compaction runs on
the full prompt before the model emits the first answer token (as sglang_ams.demo does for the needle).
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import re
import string
from pathlib import Path
from typing import Any, Callable

from sglang_ams import demo, demo_tasks

TASKS = ("gsm8k_cot", "gsm8k_8shot", "math500", "kv_retrieval", "needle", "nq_open", "triviaqa")


@dataclasses.dataclass
class Example:
    task: str
    id: str                      # stable within the task and its options (part of the resume key)
    prompt_ids: list[int]
    forced_ids: list[int]        # teacher-forced answer start (reference backend) / appended to the prompt (server)
    gold: Any                    # str, or list[str] of accepted answers
    max_new_tokens: int
    basis: int                   # tokens that budget fractions refer to
    meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TaskOptions:
    max_new_tokens: int | None = None         # None: the task's default
    needle_lengths: tuple[int, ...] = (1000, 2000)
    needle_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    needle_seeds: int = 1
    kv_keys: int = 75                         # kv_retrieval: records per prompt (<= 75; fewer for CPU runs)
    gsm8k_shots: int = 8


DEFAULT_NEW_TOKENS = {"gsm8k_cot": 256, "gsm8k_8shot": 256, "math500": 512, "kv_retrieval": 48, "needle": 12,
                      "nq_open": 32, "triviaqa": 32}
BASIS = {"gsm8k_cot": "generation", "gsm8k_8shot": "generation", "math500": "generation",
         "kv_retrieval": "context", "needle": "context", "nq_open": "total", "triviaqa": "total"}


# ---------------------------------------------------------------------------------------------------------------
# Answer extraction and scoring (pure functions: unit-tested without any model)

_GSM8K_ANSWER = re.compile(r"answer is\s*\$?(-?[\d,]+(?:\.\d+)?)")


def gsm8k_extract(text: str) -> str | None:
    """The number after 'answer is', else the last number of the text (what demo.gsm8k_task's check reads)."""
    found = _GSM8K_ANSWER.search(text)
    value = found.group(1).replace(",", "") if found else demo_tasks._last_number(text)
    return value.rstrip(".") if value else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    try:
        return a is not None and b is not None and float(a) == float(b)
    except ValueError:
        return False


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1:i]
    return None


def normalize_math(answer: str | None) -> str | None:
    """A light MATH answer normaliser: spacing, \\left/\\right, \\dfrac, degrees, \\text{}, $ and trailing dots."""
    if answer is None:
        return None
    s = answer.strip()
    s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s)
    s = re.sub(r"\\mbox\{\s*([^}]*)\}", r"\1", s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""),
                     ("dfrac", "frac"), ("tfrac", "frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""),
                     ("%", ""), ("$", ""), ("\\displaystyle", "")):
        s = s.replace(old, new)
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)          # \frac12 -> \frac{1}{2}
    s = re.sub(r"^[a-zA-Z]\s*=", "", s)                           # x = 5 -> 5
    if re.fullmatch(r"-?[\d,]+(\.\d+)?", s):
        s = s.replace(",", "")
        if "." in s:
            s = s.rstrip("0").rstrip(".")
    return s


def math_equal(pred: str | None, gold: str) -> bool:
    p, g = normalize_math(pred), normalize_math(gold)
    if p is None:
        return False
    return p == g or numbers_equal(p, g)


def normalize_qa(s: str) -> str:
    """SQuAD / lost-in-the-middle answer normalisation: lower case, no punctuation, no articles, one space."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def best_subspan_em(prediction: str, golds: list[str]) -> bool:
    """Any normalised gold answer is a substring of the normalised prediction (lost-in-the-middle's metric)."""
    pred = normalize_qa(prediction)
    return any(normalize_qa(g) and normalize_qa(g) in pred for g in golds)


def qa_extract(text: str) -> str:
    """The first non-empty line of the answer (what is shown; scoring reads the whole answer)."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def uuid_extract(text: str) -> str:
    found = _UUID.search(text)
    return found.group(0) if found else text.strip()[:40]


def digits_extract(text: str) -> str | None:
    found = re.search(r"\d+", text)
    return found.group(0) if found else None


def extract(task: str, text: str) -> str | None:
    """The answer a task reads from generated text (forced answer starts excluded)."""
    if task in ("gsm8k_cot", "gsm8k_8shot"):
        return gsm8k_extract(text)
    if task == "math500":
        return last_boxed(text)
    if task == "kv_retrieval":
        return uuid_extract(text)
    if task == "needle":
        return digits_extract(text)
    if task in ("nq_open", "triviaqa"):
        return qa_extract(text)
    raise ValueError(f"unknown task {task!r}")


def score(task: str, text: str, gold: Any) -> bool:
    """Whether the generated text answers correctly."""
    if task in ("gsm8k_cot", "gsm8k_8shot"):
        return numbers_equal(gsm8k_extract(text), str(gold))
    if task == "math500":
        return math_equal(last_boxed(text), str(gold))
    if task in ("kv_retrieval", "needle"):
        return str(gold) in text
    if task in ("nq_open", "triviaqa"):
        return best_subspan_em(text, list(gold))
    raise ValueError(f"unknown task {task!r}")


# ---------------------------------------------------------------------------------------------------------------
# Data and prompts

def _rows(path: Path, limit: int | None) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt") as fh:
        for line in fh:
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _need(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"missing data file {path} (set $SGLANG_AMS_DATA to the shared data folder)")
    return path


def _encode(tokenizer, turns: list[tuple[str, str]]) -> list[int]:
    return list(tokenizer(demo_tasks._render(tokenizer, turns), add_special_tokens=False)["input_ids"])


GSM8K_COT_INSTRUCTION = ("Solve the problem step by step, one step per line. "
                         "Finish with the line \"The answer is N.\" where N is the final number.")
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
QA_INSTRUCTION = "Answer the question with a short answer (a few words)."
KV_FORCED = 'The value associated with the key "{key}" is "'


def _kv_prompt(data_dir: Path) -> str:
    path = data_dir / "lost_in_the_middle" / "prompts" / "kv_retrieval.prompt"
    if path.is_file():
        return path.read_text().rstrip("\n")
    return ("Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n"
            "{formatted_kv_records}\n\nKey: \"{key}\"\nCorresponding value:")


def format_kv_records(records: list[list[str]]) -> str:
    """lost-in-the-middle's formatting of the JSON object: one "key": "value" per line."""
    out = ""
    for i, (k, v) in enumerate(records):
        out += ("{" if i == 0 else " ") + f'"{k}": "{v}"' + (",\n" if i != len(records) - 1 else "}")
    return out


def subsample_kv(records: list[list[str]], key: str, n: int) -> list[list[str]]:
    """n records that include the gold one, at the same relative depth as in the full list."""
    if n >= len(records):
        return records
    gold_at = next(i for i, (k, _) in enumerate(records) if k == key)
    others = [r for r in records if r[0] != key][:n - 1]
    where = round(gold_at / max(1, len(records) - 1) * (n - 1))
    return others[:where] + [records[gold_at]] + others[where:]


def load_examples(task: str, tokenizer, data_dir: Path, limit: int | None, opts: TaskOptions | None = None
                  ) -> list[Example]:
    """The first `limit` examples of a task (all of them with None), prompts tokenised."""
    opts = opts or TaskOptions()
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    new = opts.max_new_tokens or DEFAULT_NEW_TOKENS[task]
    data_dir = Path(data_dir)

    def example(i, prompt_ids, gold, forced=(), meta=None):
        basis = {"generation": new, "context": len(prompt_ids) + len(forced),
                 "total": len(prompt_ids) + new}[BASIS[task]]
        return Example(task, str(i), list(prompt_ids), list(forced), gold, new, basis, meta or {})

    out: list[Example] = []
    if task == "gsm8k_cot":
        for i, row in enumerate(_rows(_need(data_dir / "gsm8k" / "test.jsonl"), limit)):
            gold = demo_tasks._gsm8k_solution(row["answer"])[1]
            out.append(example(i, _encode(tokenizer, [("user", f"{row['question']}\n{GSM8K_COT_INSTRUCTION}")]),
                               gold))
    elif task == "gsm8k_8shot":
        count = len(_rows(_need(data_dir / "gsm8k" / "test.jsonl"), limit))
        for i in range(count):
            t = demo.gsm8k_task(tokenizer, data_dir, i, shots=opts.gsm8k_shots, max_new_tokens=new)
            out.append(example(i, t.prompt_ids, t.gold, meta={"shots": opts.gsm8k_shots}))
    elif task == "math500":
        for row in _rows(_need(data_dir / "math500" / "test.clean.jsonl"), limit):
            out.append(example(row["id"], _encode(tokenizer, [("user", f"{row['problem']}\n{MATH_INSTRUCTION}")]),
                               row["answer"]))
    elif task == "kv_retrieval":
        template = _kv_prompt(data_dir)
        path = _need(data_dir / "lost_in_the_middle" / "kv-retrieval-75_keys.jsonl.gz")
        for i, row in enumerate(_rows(path, limit)):
            records = subsample_kv(row["ordered_kv_records"], row["key"], opts.kv_keys)
            text = template.format(formatted_kv_records=format_kv_records(records), key=row["key"])
            forced = tokenizer(KV_FORCED.format(key=row["key"]), add_special_tokens=False)["input_ids"]
            depth = next(j for j, r in enumerate(records) if r[0] == row["key"]) / max(1, len(records) - 1)
            out.append(example(f"{i}-k{len(records)}", _encode(tokenizer, [("user", text)]), row["value"], forced,
                               {"keys": len(records), "depth": round(depth, 3)}))
    elif task == "needle":
        grid = [(n, d, s) for s in range(opts.needle_seeds) for n in opts.needle_lengths for d in opts.needle_depths]
        for n, d, s in grid[:limit] if limit is not None else grid:
            t = demo.needle_task(tokenizer, data_dir, context_tokens=n, depth=d, seed=s, max_new_tokens=new)
            out.append(example(f"len{n}-depth{d:g}-seed{s}", t.prompt_ids, t.gold, t.forced_ids,
                               {"context_tokens": n, "depth": d, "seed": s}))
    elif task == "nq_open":
        for i, row in enumerate(_rows(_need(data_dir / "nq_open" / "NQ-open.dev.jsonl"), limit)):
            user = f"{QA_INSTRUCTION}\n\nQuestion: {row['question']}\nAnswer:"
            out.append(example(i, _encode(tokenizer, [("user", user)]), list(row["answer"])))
    elif task == "triviaqa":
        path = _need(data_dir / "triviaqa" / "trivia_qa.rc-train-first2000.jsonl")
        for row in _rows(path, limit):
            user = f"{QA_INSTRUCTION}\n\nQuestion: {row['turns'][0]}\nAnswer:"
            out.append(example(row["question_id"], _encode(tokenizer, [("user", user)]), list(row["answer"])))
    return out


