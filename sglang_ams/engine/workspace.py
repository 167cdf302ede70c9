"""The compaction step's transient GPU memory: what a chunk of it allocates, the bound reserved for it at
startup, and how a group of due requests is cut into chunks that stay inside that bound.

A chunk scores, selects and moves the KV of some requests over some layers at once; its temporaries ([requests,
layers x KV heads, T] scores, evidence, sort keys, segment tables, gathered K/V for scorers that read them) grow
with requests x layers x padded length. SGLang leaves only what --mem-fraction-static spares for activations, so
the bound is taken out of the KV budget like the query ring, and no chunk may pass it: requests are packed
longest first while they fit, and a request too long for the bound on its own is split by layers (each layer's
selection and move is independent of the others). The plan is arithmetic on host lengths: no host sync.
"""
from __future__ import annotations

import dataclasses

from ..compaction import scorer_for
from ..config import SCORERS, ConfigError, PolicyConfig
from ..selector import SELECTORS

SAFETY = 1.25                  # on top of the measured peaks (caching-allocator rounding, kernel temporaries)
SORT_TEMP = 32                 # GPU sorts: double-buffered int64 keys and indices per (row, token)
WORKSPACE_FRACTION = 0.02      # automatic bound: this share of the KV budget, at least one context-length layer


@dataclasses.dataclass(frozen=True)
class ChunkCost:
    """Bytes of one chunk: per (request, layer, KV head, token), per (request, layer, KV head), and fixed."""
    per_row_token: int
    per_row: int
    fixed: int
    num_kv_heads: int

    def bytes(self, requests: int, layers: int, tokens: int) -> int:
        rows = requests * layers * self.num_kv_heads
        return int(SAFETY * (rows * (tokens * self.per_row_token + self.per_row) + self.fixed))


def chunk_cost(cfg: PolicyConfig, scorer, *, num_kv_heads: int, group: int, head_dim: int,
               elem_size: int) -> ChunkCost:
    """The cost model of one compaction chunk for requests of this config (their scorer `scorer`), from what the
    scorer and the selector declare they read."""
    w, need = cfg.window, cfg.inputs
    per_token = cfg.selector.transient_bytes(group) + SORT_TEMP + scorer.transient_bytes(group, w, head_dim)
    if need.runs_attention:                         # window attention: mean rows (and the last row) per query head
        per_token += 4 * group * (2 if need.last_row else 1)
    per_token += (need.keys + need.values) * head_dim * elem_size     # keys and values gathered from the pool
    per_row = group * w * (2 * head_dim * elem_size + 8) + 64     # window queries, their LSE, kernel partials
    return ChunkCost(per_row_token=per_token, per_row=per_row, fixed=scorer.fixed_bytes, num_kv_heads=num_kv_heads)


def auto_bound(smallest_chunk: int, kv_bytes: int) -> int:
    """The bound when the operator sets none: WORKSPACE_FRACTION of the KV budget, and never less than the
    smallest chunk the planner may have to run (one layer of one request at the context length)."""
    return max(smallest_chunk, int(WORKSPACE_FRACTION * kv_bytes))


@dataclasses.dataclass(frozen=True)
class Chunk:
    members: tuple[int, ...]     # indices into the group
    layers: range                # layers of the pool this chunk compacts
    tokens: int                  # padded length (longest member)


def plan_chunks(lengths: list[int], num_layers: int, cost: ChunkCost, bound: int) -> list[Chunk]:
    """Cut a group (request lengths) into chunks of at most `bound` bytes: longest first, as many requests as
    fit all layers; a request that does not fit alone gets the most layers that do (at least one)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    chunks: list[Chunk] = []
    members: list[int] = []
    for i in order:
        if members and cost.bytes(len(members) + 1, num_layers, lengths[members[0]]) <= bound:
            members.append(i)
            continue
        if members:
            chunks.append(Chunk(tuple(members), range(num_layers), lengths[members[0]]))
            members = []
        if cost.bytes(1, num_layers, lengths[i]) <= bound:
            members = [i]
            continue
        per = next((k for k in range(num_layers, 0, -1) if cost.bytes(1, k, lengths[i]) <= bound), 1)
        chunks.extend(Chunk((i,), range(l0, min(l0 + per, num_layers)), lengths[i])
                      for l0 in range(0, num_layers, per))
    if members:
        chunks.append(Chunk(tuple(members), range(num_layers), lengths[members[0]]))
    return chunks


def reachable_configs(server: PolicyConfig) -> list[PolicyConfig]:
    """The configs a request may run under: the server's, and what a per-request override can select
    (policy and scorer; a query-reading one only where the server collects queries). A combination the server's
    other values make invalid (a query-reading one under an interval shorter than the window, on a server that
    reads none) is one an override could not select either: skipped, not raised at startup."""
    configs = [server]
    for policy in SELECTORS:
        for scorer in SCORERS:
            try:
                cfg = server.replace(policy=policy, scorer=scorer)
            except ConfigError:
                continue
            if not cfg.needs_queries or server.needs_queries:
                configs.append(cfg)
    return configs


def smallest_chunk(server: PolicyConfig, *, num_kv_heads: int, group: int, head_dim: int, elem_size: int,
                   context_len: int) -> int:
    """The largest of the chunks the planner may be forced to run: one layer of one request at the context
    length, under the costliest config a request can pick."""
    worst = 0
    for cfg in reachable_configs(server):
        cost = chunk_cost(cfg, scorer_for(cfg), num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
                          elem_size=elem_size)
        worst = max(worst, cost.bytes(1, 1, context_len))
    return worst
