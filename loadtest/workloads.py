"""Prompts and request bodies for the load test (pure Python: no Locust, no network).

Three workloads, each sampled as a `Prompt` (text, or token ids for dummy-weight servers started with
--skip-tokenizer-init):
  reasoning  short prompt (a GSM8K question), long fixed-length output (ignore_eos, e.g. 2k-8k tokens)
  long       8k-32k-token prompt cut from Paul Graham essays with a "magic number" needle; short answer
  fewshot    one shared GSM8K 8-shot prefix + a test question: every request shares the prefix (radix cache)
and three endpoints that turn a Prompt into (path, JSON body): native /generate, OpenAI /v1/completions and
/v1/chat/completions. `Reply` reads the answers back, whole or streamed chunk by chunk.
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Protocol, Sequence

from sglang_ams.data import find_data_dir

WORKLOADS = ("reasoning", "long", "fewshot")
ENDPOINTS = ("generate", "completions", "chat")
PATHS = {"generate": "/generate", "completions": "/v1/completions", "chat": "/v1/chat/completions"}
# Default output lengths (tokens) and whether generation ignores EOS, per workload.
DEFAULT_OUTPUT = {"reasoning": "2048-8192", "long": "32", "fewshot": "256"}
DEFAULT_IGNORE_EOS = {"reasoning": True, "long": False, "fewshot": False}
DEFAULT_PROMPT = "8192-32768"          # long-context prompt tokens
DEFAULT_DATA = find_data_dir()         # $SGLANG_AMS_DATA or ../shared/data; None when absent
SHOTS = 8


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


def parse_range(text: str) -> tuple[int, int]:
    """'4096' -> (4096, 4096); '2048-8192' or '2k-8k' -> (2048, 8192)."""
    def one(part: str) -> int:
        part = part.strip().lower()
        scale = 1024 if part.endswith("k") else 1
        value = int(float(part[:-1] if scale > 1 else part) * scale)
        if value < 1:
            raise ValueError(f"token counts must be positive, got {text!r}")
        return value
    parts = str(text).split("-")
    if len(parts) not in (1, 2) or not all(p.strip() for p in parts):
        raise ValueError(f"expected N or MIN-MAX (e.g. 4096, 2k-8k), got {text!r}")
    lo, hi = one(parts[0]), one(parts[-1])
    if lo > hi:
        raise ValueError(f"range {text!r} has MIN > MAX")
    return lo, hi


@dataclasses.dataclass
class Prompt:
    workload: str
    max_tokens: int
    ignore_eos: bool
    text: str | None = None            # exactly one of text / ids
    ids: list[int] | None = None
    approx_tokens: int = 0             # prompt tokens: exact for ids or with a tokenizer, else chars / chars_per_token
    expect: str | None = None          # answer to look for in the output (needle number, GSM8K answer)


@dataclasses.dataclass
class Settings:
    workload: str = "reasoning"
    output_len: tuple[int, int] | None = None      # None: DEFAULT_OUTPUT[workload]
    prompt_len: tuple[int, int] = parse_range(DEFAULT_PROMPT)
    ignore_eos: bool | None = None                 # None: DEFAULT_IGNORE_EOS[workload]
    random_ids: bool = False                       # token ids instead of text (--skip-tokenizer-init servers)
    vocab_size: int = 32000
    chars_per_token: float = 4.0                   # text length heuristic when no tokenizer is given
    shots: int = SHOTS

    def __post_init__(self):
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {self.workload!r}")
        if self.output_len is None:
            self.output_len = parse_range(DEFAULT_OUTPUT[self.workload])
        if self.ignore_eos is None:
            self.ignore_eos = DEFAULT_IGNORE_EOS[self.workload]


# --- data -------------------------------------------------------------------------------------------------
def _first(data: Path | None, *names: str) -> Path:
    if data is None:
        raise FileNotFoundError("no data folder: pass --data-dir or set $SGLANG_AMS_DATA")
    data = Path(data)
    for name in names:
        if (data / name).exists():
            return data / name
    raise FileNotFoundError(f"none of {', '.join(names)} under {data}")


def load_essays(data: Path) -> str:
    """All essays joined; accepts DATA/niah_paulgraham_essays/essays/*.txt or DATA/essays/*.txt."""
    folder = _first(data, "niah_paulgraham_essays/essays", "essays")
    texts = [p.read_text(errors="replace").strip() for p in sorted(folder.glob("*.txt"))]
    if not texts:
        raise FileNotFoundError(f"no *.txt essays in {folder}")
    return "\n\n".join(texts)


def load_gsm8k(data: Path) -> tuple[list[dict], list[dict]]:
    """(train, test) rows; accepts DATA/gsm8k/{train,test}.jsonl or DATA/gsm8k_{train,test}.jsonl."""
    def rows(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return (rows(_first(data, "gsm8k/train.jsonl", "gsm8k_train.jsonl")),
            rows(_first(data, "gsm8k/test.jsonl", "gsm8k_test.jsonl")))


def gsm8k_answer(answer: str) -> str:
    return answer.split("####")[-1].strip().replace(",", "")


def few_shot_prefix(train: list[dict], shots: int = SHOTS) -> str:
    return "".join(f"Question: {row['question']}\nAnswer: {row['answer']}\n\n" for row in train[:shots])


# --- prompts ----------------------------------------------------------------------------------------------
class Workload:
    """Samples prompts for one workload. Data is read once; `sample(rng)` is cheap."""

    def __init__(self, settings: Settings, data: Path | None = DEFAULT_DATA, tokenizer: Tokenizer | None = None):
        self.s, self.tokenizer = settings, tokenizer
        self.train = self.test = []
        self.corpus, self._corpus_ids = "", None
        needs_text = not settings.random_ids
        if settings.workload in ("reasoning", "fewshot") and needs_text:
            self.train, self.test = load_gsm8k(data)
        if settings.workload == "long" and needs_text:
            self.corpus = load_essays(data)
        # The shared few-shot prefix: text, or fixed random ids (seed 0: identical in every Locust process).
        self.prefix = few_shot_prefix(self.train, settings.shots) if self.train else ""
        self.prefix_ids = _random_ids(random.Random(0), 150 * settings.shots, settings.vocab_size)

    def count(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text))
        return round(len(text) / self.s.chars_per_token)

    def sample(self, rng: random.Random) -> Prompt:
        s = self.s
        out = rng.randint(*s.output_len)
        make = {"reasoning": self._reasoning, "long": self._long, "fewshot": self._fewshot}[s.workload]
        prompt = make(rng)
        prompt.max_tokens, prompt.ignore_eos = out, s.ignore_eos
        if prompt.text is not None:
            prompt.approx_tokens = self.count(prompt.text)
        else:
            prompt.approx_tokens = len(prompt.ids)
        return prompt

    def _reasoning(self, rng) -> Prompt:
        if self.s.random_ids:
            return Prompt("reasoning", 0, True, ids=_random_ids(rng, rng.randint(48, 128), self.s.vocab_size))
        q = rng.choice(self.test)["question"]
        return Prompt("reasoning", 0, True, text=f"Question: {q}\nLet's think step by step.\nAnswer:")

    def _long(self, rng) -> Prompt:
        n = rng.randint(*self.s.prompt_len)
        if self.s.random_ids:
            return Prompt("long", 0, False, ids=_random_ids(rng, n, self.s.vocab_size))
        number = str(rng.randint(100000, 999999))
        needle = f" The special magic number is {number}. "
        question = "\n\nQuestion: What is the special magic number mentioned in the text above?\nAnswer:"
        budget = max(16, n - self.count(needle + question))
        haystack = self._haystack(rng, budget)
        cut = haystack.rfind(". ", 0, rng.randint(0, len(haystack))) + 1   # after a sentence, at a random depth
        return Prompt("long", 0, False, text=haystack[:cut] + needle + haystack[cut:] + question, expect=number)

    def _haystack(self, rng, tokens: int) -> str:
        """About `tokens` tokens of consecutive essay text starting at a random place (the corpus wraps)."""
        if self.tokenizer is not None:
            if self._corpus_ids is None:
                self._corpus_ids = self.tokenizer.encode(self.corpus)
            ids = self._corpus_ids
            start = rng.randrange(len(ids))
            window = (ids[start:] + ids * (tokens // len(ids) + 1))[:tokens]
            return self.tokenizer.decode(window)
        chars = int(tokens * self.s.chars_per_token)
        start = rng.randrange(len(self.corpus))
        start = self.corpus.find(" ", start) + 1          # at a word (0 if there is no space left)
        text = self.corpus[start:] + "\n\n" + self.corpus * (chars // len(self.corpus) + 1)
        return text[:chars]

    def _fewshot(self, rng) -> Prompt:
        if self.s.random_ids:
            return Prompt("fewshot", 0, False, ids=self.prefix_ids + _random_ids(rng, 48, self.s.vocab_size))
        row = rng.choice(self.test)
        return Prompt("fewshot", 0, False, text=f"{self.prefix}Question: {row['question']}\nAnswer:",
                      expect=gsm8k_answer(row["answer"]))


def _random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]     # ids < 100 are often special tokens


def check_answer(prompt: Prompt, text: str | None) -> bool | None:
    """Whether the output contains the expected answer (None: nothing to check)."""
    if prompt.expect is None or text is None:
        return None
    if prompt.workload == "fewshot":
        found = re.search(r"####\s*\$?(-?[\d,]*\.?\d+)", text)
        numbers = [found.group(1)] if found else re.findall(r"-?\d[\d,]*\.?\d*", text.split("Question:")[0])
        return bool(numbers) and numbers[0 if found else -1].replace(",", "").rstrip(".") == prompt.expect
    return prompt.expect in text


# --- request bodies ---------------------------------------------------------------------------------------
def build_request(endpoint: str, prompt: Prompt, stream: bool = False, temperature: float = 0.0,
                  model: str = "default", custom_params: dict | None = None) -> tuple[str, dict]:
    """(path, JSON body) for one request. custom_params reaches the plugin as the per-request override."""
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
    extra = {"custom_params": custom_params} if custom_params else {}
    if endpoint == "generate":
        body = {"input_ids": prompt.ids} if prompt.ids is not None else {"text": prompt.text}
        body.update(stream=stream, sampling_params={"max_new_tokens": prompt.max_tokens, "temperature": temperature,
                                                    "ignore_eos": prompt.ignore_eos, **extra})
        return PATHS[endpoint], body
    if endpoint == "chat":
        if prompt.ids is not None:
            raise ValueError("/v1/chat/completions needs text prompts; use generate or completions with random ids")
        body = {"messages": [{"role": "user", "content": prompt.text}]}
    else:
        body = {"prompt": prompt.ids if prompt.ids is not None else prompt.text}
    body.update(model=model, max_tokens=prompt.max_tokens, temperature=temperature, ignore_eos=prompt.ignore_eos,
                stream=stream, **extra)
    if stream:
        body["stream_options"] = {"include_usage": True}
    return PATHS[endpoint], body


# --- answers ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Reply:
    """What one request produced, built from a whole JSON answer or fed chunk by chunk from a stream."""
    endpoint: str
    text: str | None = None
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    chunks: int = 0                    # streamed chunks that carried output

    @classmethod
    def from_json(cls, endpoint: str, body: dict) -> "Reply":
        reply = cls(endpoint)
        reply.feed(body, whole=True)
        return reply

    def feed(self, body: dict, whole: bool = False) -> bool:
        """Take one JSON answer or stream chunk; True if it carried output (not just usage)."""
        if self.endpoint == "generate":
            if isinstance(body, list):       # batch answers are lists; we send one prompt
                body = body[0]
            meta = body.get("meta_info") or {}
            self._usage(meta.get("prompt_tokens"), meta.get("completion_tokens"), meta.get("cached_tokens"))
            new, ids = body.get("text"), body.get("output_ids")
            if new is not None:
                self.text = new if whole or self._cumulative(new, ids, meta.get("completion_tokens")) \
                    else (self.text or "") + new
            carried = new is not None or ids is not None
        else:
            usage = body.get("usage") or {}
            details = usage.get("prompt_tokens_details") or {}
            self._usage(usage.get("prompt_tokens"), usage.get("completion_tokens"), details.get("cached_tokens"))
            carried = False
            for choice in body.get("choices") or []:
                part = choice.get("text") if self.endpoint == "completions" else \
                    (choice.get("message") or choice.get("delta") or {}).get("content")
                carried = True
                if part:
                    self.text = (self.text or "") + part
        if carried and not whole:
            self.chunks += 1
        return carried

    def _cumulative(self, new: str, ids, completion) -> bool:
        """Native streams repeat the whole text and ids in every chunk unless the server runs with
        --incremental-streaming-output; the ids tell which (all of them so far, or the newest few)."""
        if isinstance(ids, list) and completion is not None:
            return len(ids) >= int(completion)
        return new.startswith(self.text or "")

    def _usage(self, prompt, completion, cached):
        if prompt is not None:
            self.prompt_tokens = int(prompt)
        if completion is not None:
            self.output_tokens = int(completion)
        if cached is not None:
            self.cached_tokens = int(cached)

    @property
    def tokens(self) -> int:
        """Output tokens: the server's count, else one per streamed chunk."""
        return self.output_tokens if self.output_tokens is not None else self.chunks


def sse_data(line: bytes | str) -> dict | None:
    """The JSON of one server-sent-events line ('data: {...}'); None for blank lines, comments and [DONE]."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    line = line.strip()
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if not payload or payload == "[DONE]":
        return None
    return json.loads(payload)
