"""The query ring: the last W decode queries of the requests about to compact, per layer.

Written inside the decode CUDA graph (RadixAttention hook), so its buffers are allocated before capture and
never reallocated. Rows are lent only to requests within W tokens of the earliest point they may compact (their
trigger, less the batch slack), which keeps the ring small: a request needing a row holds at least
budget + interval - slack - W private KV tokens, so pool_tokens / (budget + interval - slack - W) rows always
suffice for requests at the server's budget (callers pass interval - slack as `interval`).
Row 0 is a trash row: padded graph entries and requests without a row write there.

Next to each query the ring keeps its LSE from the decode attention (log2 units, FlashInfer's convention): the
log-sum-exp over exactly the keys the scoring's causal window mask lets that query see, because no compaction
happens while a request holds a row. With it the scoring kernel reads the keys once instead of twice.
"""
from __future__ import annotations

import math

import torch

from ..kernels.ring_store import store_queries
from ..transfer import to_device


def rows_for_pool(pool_tokens: int, budget: int, interval: int, window: int) -> int:
    return math.ceil(pool_tokens / max(1, budget + interval - window)) + 1


def bytes_per_row(num_layers: int, window: int, num_q_heads: int, head_dim: int, elem_bytes: int) -> int:
    """Queries plus their fp32 LSE."""
    return num_layers * window * num_q_heads * (head_dim * elem_bytes + 4)


def kv_fraction(window: int, group_size: int, budget: int, interval: int, head_dim: int = 128,
                elem_bytes: int = 2) -> float:
    """Ring bytes as a fraction of the KV pool bytes when sized by rows_for_pool."""
    per_query = 1.0 + 4.0 / (head_dim * elem_bytes)          # the LSE next to each query
    return window * group_size * per_query / (2.0 * max(1, budget + interval - window))


def capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the stream that would take t's kernels."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class QueryRing:
    def __init__(self, num_layers: int, rows: int, window: int, num_q_heads: int, head_dim: int,
                 req_slots: int, dtype: torch.dtype, device):
        self.window = window
        self.buf = torch.zeros(num_layers, rows + 1, window, num_q_heads, head_dim, dtype=dtype, device=device)
        self.lse = torch.zeros(num_layers, rows + 1, window, num_q_heads, dtype=torch.float32, device=device)
        self.row_of = torch.zeros(req_slots, dtype=torch.int64, device=device)   # req_pool_idx -> ring row
        self._free = list(range(rows, 0, -1))
        self.pending = None         # (layer, req_pool_indices, positions) while a decode attention call runs
        self.lse_layers = set()     # layers whose decode attention has reported its LSE (set on the host)
        self._located = None        # (req_pool_indices, positions, rows, slots) of the forward being run
        self._recording = True      # whether the forward being run stores its queries (decided at its layer 0)

    @property
    def rows(self) -> int:
        return self.buf.shape[1] - 1

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size() + self.lse.numel() * 4 + self.row_of.numel() * 8

    @property
    def has_lse(self) -> bool:
        """Every layer's decode attention reports its LSE (checked on the host when the hooks ran)."""
        return len(self.lse_layers) == self.buf.shape[0]

    # --- inside the graph ---
    def records(self, layer: int) -> bool:
        """Whether this decode forward stores its queries and LSE: always while a CUDA graph is captured (its
        replays serve later batches), otherwise only while some request holds a row; with none lent every query
        would land in the trash row, and an eager decode step (batches past SGLang's largest graph) would pay
        two indexed stores per layer for nothing. Decided at layer 0, kept for the forward's other layers."""
        if layer == 0:
            self._recording = len(self._free) < self.rows or capturing(self.buf)
        return self._recording

    def _locate(self, req_pool_indices: torch.Tensor, positions: torch.Tensor, fresh: bool = False):
        """(ring rows, slots) of a decode batch, computed at the first layer of each forward and reused by the
        others (same two tensors): per layer only the stores remain, which matters in a decode step made of tiny
        kernels. Recomputing at layer 0 keeps every CUDA-graph capture self-contained (a warm-up run before a
        capture uses the same tensors)."""
        hit = self._located
        if not fresh and hit is not None and hit[0] is req_pool_indices and hit[1] is positions:
            return hit[2], hit[3]
        rows, slots = self.row_of[req_pool_indices], positions % self.window
        self._located = (req_pool_indices, positions, rows, slots)
        return rows, slots

    def write(self, layer: int, q: torch.Tensor, req_pool_indices: torch.Tensor, positions: torch.Tensor) -> None:
        """Store the decode queries of one layer (graph-capturable: tensor ops only, fixed addresses)."""
        rows, slots = self._locate(req_pool_indices, positions, fresh=layer == 0)
        heads, dim = self.buf.shape[3], self.buf.shape[4]
        self.buf[layer][rows, slots] = q.reshape(-1, heads, dim).to(self.buf.dtype)

    def write_tail(self, layer: int, q: torch.Tensor, idx: torch.Tensor, owners: torch.Tensor, valid: torch.Tensor,
                   positions: torch.Tensor) -> None:
        """Store prompt-tail queries of an extend batch: tokens idx [R, W] of q, owned by requests owners [R, W];
        entries not valid (prompts shorter than W) and requests without a row go to the trash row."""
        rows = torch.where(valid, self.row_of[owners], torch.zeros_like(owners))
        slots = positions[idx] % self.window
        heads, dim = self.buf.shape[3], self.buf.shape[4]
        self.buf[layer][rows, slots] = q.reshape(-1, heads, dim)[idx].to(self.buf.dtype)

    def write_lse(self, layer: int, lse: torch.Tensor, req_pool_indices: torch.Tensor,
                  positions: torch.Tensor) -> None:
        """Store the decode attention's LSE [B, Hq] (log2 units) next to the queries of the same step."""
        rows, slots = self._locate(req_pool_indices, positions)
        self.lse[layer][rows, slots] = lse.reshape(-1, self.lse.shape[3]).float()
        self.lse_layers.add(layer)

    def store(self, layer: int, q: torch.Tensor, lse: torch.Tensor | None, req_pool_indices: torch.Tensor,
              positions: torch.Tensor) -> None:
        """write and write_lse in one kernel that skips requests without a row (--ams-ring-store triton)."""
        store_queries(self.buf, self.lse, self.row_of, layer, q, lse, req_pool_indices, positions)
        if lse is not None:
            self.lse_layers.add(layer)

    def compile_store(self) -> None:
        """Compile `store`'s kernel variants now (at pool allocation, before SGLang captures its decode graphs:
        the warm-up runs before a capture store nothing while no row is lent, so the first launch would
        otherwise compile inside the capture). One entry on req_pool_idx 0, which holds no row yet: nothing
        is written."""
        dev = self.buf.device
        q = torch.zeros(1, self.buf.shape[3] * self.buf.shape[4], dtype=self.buf.dtype, device=dev)
        lse = torch.zeros(1, self.buf.shape[3], dtype=torch.float32, device=dev)
        for index_dtype in (torch.int32, torch.int64):        # SGLang's graph buffers and eager batches
            idx = torch.zeros(1, dtype=index_dtype, device=dev)
            for with_lse in (lse, None):
                self.store(0, q, with_lse, idx, idx.long())
        self.lse_layers.clear()

    # --- scheduler side ---
    def acquire(self, req_pool_idx: int) -> int:
        if not self._free:
            return 0
        row = self._free.pop()
        self.row_of[req_pool_idx] = row
        return row

    def release_many(self, req_pool_indices: list[int], rows: list[int]) -> None:
        """Return the rows (all non-zero) of these requests: one index_fill_ on the device, not one per request."""
        if rows:          # (rows come from acquire: every one non-zero)
            self.row_of.index_fill_(0, to_device(req_pool_indices, torch.int64, self.row_of.device), 0)
            self._free.extend(rows)

    def window_queries(self, rows: torch.Tensor, newest_pos: torch.Tensor,
                       layers: range | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries [N, L, Hq, W, d] of `layers` (default all) oldest first, and their logical positions [N, W]."""
        query_pos, slots = self._window_slots(newest_pos)
        buf = self.buf if layers is None else self.buf[layers.start:layers.stop]
        per_req = buf[:, rows]                                                 # [L, N, W, Hq, d]
        idx = slots[None, :, :, None, None].expand(per_req.shape[0], -1, -1, *per_req.shape[3:])
        ordered = torch.gather(per_req, 2, idx)
        return ordered.permute(1, 0, 3, 2, 4).contiguous(), query_pos

    def window_lse(self, rows: torch.Tensor, newest_pos: torch.Tensor, layers: range | None = None) -> torch.Tensor:
        """The queries' LSE [N, L, Hq, W] (log2 units), in the order of window_queries."""
        _, slots = self._window_slots(newest_pos)
        lse = self.lse if layers is None else self.lse[layers.start:layers.stop]
        per_req = lse[:, rows]                                                 # [L, N, W, Hq]
        idx = slots[None, :, :, None].expand(per_req.shape[0], -1, -1, per_req.shape[3])
        return torch.gather(per_req, 2, idx).permute(1, 0, 3, 2).contiguous()

    def _window_slots(self, newest_pos: torch.Tensor):
        w = self.window
        query_pos = newest_pos[:, None] - (w - 1) + torch.arange(w, device=newest_pos.device)[None, :]
        return query_pos, query_pos % w                                        # [N, W] each
