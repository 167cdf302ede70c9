"""The sweep (which policy configurations run), how a configuration becomes a PolicyConfig for one example, the
resumable JSONL store, confidence intervals, and the region wipe-out / boundary-jitter measures.

Budgets are fractions: an example's budget is round(fraction x its basis) tokens (qb_tasks: the generation length
for reasoning tasks, the prompt for retrieval), never below the smallest valid budget (sink + keep_lastn + 1).
Every policy of a run shares HARNESS_DEFAULTS and interval = max(window, budget // 4) (as
sglang_ams.demo.default_interval) unless an override (--set) changes them. HARNESS_DEFAULTS are scaled for the
small budgets a CPU run affords (a 64-token budget over a 256-token generation): with PolicyConfig's defaults
(keep_lastn 32, Δ 0.02, Lmin 32) the compressible region C holds ~60 candidates, equal-mass pieces of ~1 token are
all shorter than Lmin and merge into ONE segment, and AMS degenerates into global top-k (measured: 1.0-1.4 segments
per compaction on SmolLM2 with Δ 0.02, Lmin 8). Δ 0.1 / Lmin 4 give ~10 candidate cuts per compaction, the
segments-per-budget ratio of the paper's Δ 0.02 at budgets of 512-1024. At those budgets (GPU runs) pass the paper's
values: --set delta=0.02 --set lmin=32 --set keep_lastn=32 --set window=32.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from sglang_ams.config import SCORERS, PolicyConfig

HARNESS_DEFAULTS = {"window": 8, "sink": 4, "keep_lastn": 16, "lmin": 4, "qmin": 2, "delta": 0.1, "lmax": 1024}
BUDGETS = (0.10, 0.25, 0.50)
COMPRESSING = ("topk", "ams")
ABLATIONS = ({"segmenter": "fixed_length"}, {"use_credit": False}, {"use_mass": False})


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """One configuration of the sweep. policy none ignores scorer and budget; streaming ignores the scorer."""
    policy: str
    scorer: str = "snapkv"
    budget: float = 0.25                                      # fraction of the example's basis
    overrides: tuple[tuple[str, object], ...] = ()            # PolicyConfig fields beyond HARNESS_DEFAULTS

    def canonical(self) -> dict:
        if self.policy == "none":
            return {"policy": "none"}
        d = {"policy": self.policy, "budget": round(float(self.budget), 6),
             "scorer": "streaming" if self.policy == "streaming" else self.scorer}
        d["settings"] = dict(sorted({**HARNESS_DEFAULTS, **dict(self.overrides)}.items()))
        return d

    @property
    def hash(self) -> str:
        return hashlib.sha1(json.dumps(self.canonical(), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        if self.policy == "none":
            return "full KV"
        name = "streaming" if self.policy == "streaming" else f"{self.policy}/{self.scorer}"
        extra = "".join(f",{k}={v}" for k, v in self.overrides)
        return f"{name}@{self.budget:g}" + (f"[{extra[1:]}]" if extra else "")

    def config(self, basis: int) -> PolicyConfig:
        """The PolicyConfig for an example whose budget basis is `basis` tokens."""
        settings = {**HARNESS_DEFAULTS, **dict(self.overrides)}
        if self.policy == "none":
            return PolicyConfig(**settings)
        floor = settings["sink"] + settings["keep_lastn"] + 1
        budget = max(floor, int(round(self.budget * basis)))
        scorer = "streaming" if self.policy == "streaming" else self.scorer
        settings.setdefault("interval", max(settings["window"], budget // 4))
        return PolicyConfig(policy=self.policy, scorer=scorer, budget=budget, **settings)


def full_sweep(scorers: Sequence[str] = SCORERS, budgets: Sequence[float] = BUDGETS) -> list[PolicySpec]:
    """Full KV, streaming at every budget, and every scorer under top-k and AMS at every budget."""
    specs = [PolicySpec("none")]
    specs += [PolicySpec("streaming", "streaming", b) for b in budgets]
    specs += [PolicySpec(p, s, b) for s in scorers for p in COMPRESSING for b in budgets]
    return specs


def ablation_sweep(budget: float = 0.25, scorer: str = "snapkv") -> list[PolicySpec]:
    """DESIGN.md §2's ablations of AMS at one budget: fixed-length segments, no credit, no mass."""
    return [PolicySpec("ams", scorer, budget, tuple(a.items())) for a in ABLATIONS]


def select_sweep(policies: Sequence[str], scorers: Sequence[str], budgets: Sequence[float],
                 ablations: bool = False, ablation_budget: float | None = None) -> list[PolicySpec]:
    """The CLI's product of --policies x --scorers x --budgets (none once, streaming once per budget)."""
    specs = []
    for p in policies:
        if p == "none":
            specs.append(PolicySpec("none"))
        elif p == "streaming":
            specs += [PolicySpec("streaming", "streaming", b) for b in budgets]
        elif p in COMPRESSING:
            specs += [PolicySpec(p, s, b) for s in scorers for b in budgets]
        else:
            raise ValueError(f"unknown policy {p!r}")
    if ablations:
        for s in scorers:
            specs += ablation_sweep(ablation_budget if ablation_budget is not None else budgets[0], s)
    seen, out = set(), []
    for spec in specs:
        if spec.hash not in seen:
            seen.add(spec.hash)
            out.append(spec)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Resumable results: one JSON object per line, appended as soon as an example finishes

def row_key(row: dict) -> tuple:
    return (row["backend"], row["model"], row["task"], str(row["example_id"]), int(row["max_new_tokens"]),
            row["policy_hash"])


class ResultStore:
    """Append-only JSONL of per-example results; `done(key)` tells a resumed run what to skip."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = list(read_rows(self.path))
        self._keys = {row_key(r) for r in self.rows}
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                torn = fh.read(1) != b"\n"
            if torn:                       # a run killed mid-write: end that line so the next row stands alone
                with open(self.path, "a") as fh:
                    fh.write("\n")

    def done(self, key: tuple) -> bool:
        return key in self._keys

    def append(self, row: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rows.append(row)
        self._keys.add(row_key(row))


def results_file(folder: str | os.PathLike) -> Path:
    """A folder's results: results.jsonl, or results.jsonl.gz where a finished run was archived compressed."""
    plain = Path(folder) / "results.jsonl"
    packed = plain.with_suffix(".jsonl.gz")
    return packed if packed.is_file() and not plain.is_file() else plain


def read_rows(path: str | os.PathLike) -> Iterator[dict]:
    """Rows of a results file (.jsonl or .jsonl.gz); a torn last line (run killed mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        for line in fh:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


# ---------------------------------------------------------------------------------------------------------------
# Statistics

def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (n = 0: the whole [0, 1])."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# ---------------------------------------------------------------------------------------------------------------
# Regions: reasoning steps and fixed blocks, as logical position ranges [start, end)

def token_lines(tokenizer, token_ids: Sequence[int]) -> list[int]:
    """Line number of every token of a generated sequence. Tokens are mapped to characters by decoding growing
    prefixes (offsets of the tokens actually generated; re-encoding the text could tokenise differently); a token
    belongs to the line its text ends on, a newline token to the line it terminates."""
    lines = []
    for i in range(len(token_ids)):
        text = tokenizer.decode(token_ids[:i + 1], skip_special_tokens=True)
        lines.append(text.rstrip("\n").count("\n"))
    return lines


def runs(labels: Sequence[int], offset: int) -> list[tuple[int, int]]:
    """[start, end) ranges (shifted by offset) of equal consecutive labels."""
    blocks, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            blocks.append((offset + start, offset + i))
            start = i
    return blocks


def step_blocks(tokenizer, generated_ids: Sequence[int], first_position: int) -> list[tuple[int, int]]:
    """Reasoning steps: the lines of the generated text (forced answer start included), as position ranges."""
    return runs(token_lines(tokenizer, generated_ids), first_position) if generated_ids else []


def fixed_blocks(start: int, end: int, size: int = 32) -> list[tuple[int, int]]:
    """Blocks of `size` tokens from `start` (the first compressible position, i.e. after the sink) up to end."""
    return [(a, min(a + size, end)) for a in range(start, end, size)]


def wipeout(compactions, blocks: Sequence[tuple[int, int]], sink: int, keep_lastn: int) -> tuple[int, int]:
    """(wiped, total) over compactions x eligible blocks x layers x KV heads.

    At a compaction with logical length n, the compressible region is [sink, n - keep_lastn); a block is eligible
    when it lies entirely inside it (pinned and recent tokens are always kept). The block is wiped out in a
    (layer, head) when none of its positions is among that head's kept positions."""
    wiped = total = 0
    if not blocks:
        return 0, 0
    starts = torch.tensor([b[0] for b in blocks])
    ends = torch.tensor([b[1] for b in blocks])
    for c in compactions:
        n = int(c.logical_length)
        ok = (starts >= sink) & (ends <= n - keep_lastn) & (ends > starts)
        if not bool(ok.any()):
            continue
        kept = c.kept.long()
        nl, h, _ = kept.shape
        present = torch.zeros(nl, h, n + 1, dtype=torch.long)
        present.scatter_(2, kept.clamp(0, n), 1)
        present[..., n] = 0
        csum = torch.nn.functional.pad(present.cumsum(-1), (1, 0))           # csum[..., i] = kept in [0, i)
        s, e = starts[ok], ends[ok]
        inside = csum[..., e] - csum[..., s]                                   # [L, H, blocks]
        wiped += int((inside == 0).sum())
        total += inside.numel()
    return wiped, total


# ---------------------------------------------------------------------------------------------------------------
# Segment boundaries of AMS across compactions

def slot_positions(compactions) -> list[torch.Tensor]:
    """Logical position of every physical slot [L, H, T] when each compaction ran: the slots kept by the previous
    compaction followed by the tokens appended since (the first compaction sees the whole sequence in order)."""
    out, prev = [], None
    for c in compactions:
        n = int(c.logical_length)
        if prev is None:
            nl, h, _ = c.kept.shape
            pos = torch.arange(n).expand(nl, h, n)
        else:
            nl, h, _ = prev.kept.shape
            new = torch.arange(int(prev.logical_length), n).expand(nl, h, -1)
            pos = torch.cat([prev.kept.long(), new], dim=-1)
        if pos.shape[-1] != int(c.physical_before):
            raise ValueError(f"compaction at logical length {n}: {pos.shape[-1]} slots reconstructed, "
                             f"{c.physical_before} recorded")
        out.append(pos)
        prev = c
    return out


def boundaries(segment_ids: torch.Tensor, positions: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per (layer, head), the logical positions where a segment starts (the region's first segment excluded)."""
    sid = segment_ids.long()
    prev = torch.nn.functional.pad(sid[..., :-1], (1, 0), value=-1)
    start = (sid >= 0) & (sid != prev) & (prev >= 0)
    nl, h, _ = sid.shape
    return [[positions[l, k][start[l, k]] for k in range(h)] for l in range(nl)]


def _nearest(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance from each element of a to the nearest element of b (both sorted, b non-empty)."""
    i = torch.searchsorted(b, a).clamp(max=b.numel() - 1)
    j = (i - 1).clamp(min=0)
    return torch.minimum((a - b[i]).abs(), (a - b[j]).abs())


def boundary_jitter(compactions, segment_ids: Sequence[torch.Tensor], sink: int, keep_lastn: int
                    ) -> tuple[float, int]:
    """(sum, count) of boundary displacements between consecutive compactions, in logical tokens.

    For compactions c-1 and c and each (layer, head), boundaries of both are restricted to the region that was
    compressible at both, (sink, n_{c-1} - keep_lastn); every boundary of either contributes its distance to the
    nearest boundary of the other (symmetric nearest-neighbour distance). 0 = the cuts did not move."""
    positions = slot_positions(compactions)
    total, count = 0.0, 0
    prev_b = None
    for c, pos, seg in zip(compactions, positions, segment_ids):
        cur_b = boundaries(seg, pos)
        if prev_b is not None:
            hi = int(prev_n) - keep_lastn
            for l, heads in enumerate(cur_b):
                for k, cur in enumerate(heads):
                    old = prev_b[l][k]
                    a = cur[(cur > sink) & (cur < hi)]
                    b = old[(old > sink) & (old < hi)]
                    if a.numel() == 0 or b.numel() == 0:
                        continue
                    a, b = a.sort().values, b.sort().values
                    total += float(_nearest(a, b).sum() + _nearest(b, a).sum())
                    count += a.numel() + b.numel()
        prev_b, prev_n = cur_b, c.logical_length
    return total, count


def pooled(rows: Iterable[dict], field: str) -> tuple[float, float]:
    """Sum of [numerator, denominator] pairs stored under `field` in rows."""
    num = den = 0.0
    for r in rows:
        v = r.get(field)
        if v:
            num += v[0]
            den += v[1]
    return num, den
