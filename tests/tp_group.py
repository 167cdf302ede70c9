"""A tensor-parallel group simulated on the CPU: each rank runs in its own thread, one at a time (they take turns
on one lock, since the Triton interpreter patches module state while a kernel runs), and `all_reduce` is where
they meet, as NCCL's would: every rank blocks until all ranks made their k-th call, then all get the same sum
(added in rank order). A rank that finishes while another waits in a collective is a mismatch and fails."""
from __future__ import annotations

import functools
import threading

import torch

from sglang_ams.heads import HeadRange

TIMEOUT_S = 600.0


class FakeTPGroup:
    def __init__(self, size: int):
        self.size = size
        self._turn = threading.Condition()
        self._calls = [0] * size
        self._pending: dict = {}          # k -> {rank: tensor}
        self._results: dict = {}          # k -> [sum, readers left]
        self._finished: set = set()
        self.shapes: list = []            # (k, shape) of every completed collective

    def heads(self, rank: int, model_kv_heads: int, model_q_heads: int) -> HeadRange:
        return HeadRange.of_rank(rank, self.size, model_kv_heads, model_q_heads,
                                 functools.partial(self.all_reduce, rank))

    def all_reduce(self, rank: int, x: torch.Tensor) -> torch.Tensor:
        """Called by a rank's thread while it holds the turn; waiting hands the turn to the others."""
        k = self._calls[rank]
        self._calls[rank] += 1
        parts = self._pending.setdefault(k, {})
        parts[rank] = x.clone()
        if len(parts) == self.size:
            del self._pending[k]
            if len({tuple(p.shape) for p in parts.values()}) != 1:
                raise AssertionError(f"all_reduce #{k}: ranks passed shapes {[tuple(p.shape) for p in parts.values()]}")
            total = parts[0].clone()
            for r in range(1, self.size):
                total += parts[r]
            self._results[k] = [total, self.size]
            self.shapes.append((k, tuple(total.shape)))
            self._turn.notify_all()
        while k not in self._results:
            if len(self._finished) == self.size - 1:
                raise AssertionError(f"rank {rank} waits in all_reduce #{k}, every other rank finished its step")
            self._turn.wait(timeout=TIMEOUT_S)
        result = self._results[k]
        x.copy_(result[0])
        result[1] -= 1
        if not result[1]:
            del self._results[k]
        return x

    def run(self, fns: list):
        """Run fns[r]() as rank r, concurrently (taking turns); returns their results, raises the first error."""
        assert len(fns) == self.size
        results, errors = [None] * self.size, [None] * self.size

        def body(rank):
            with self._turn:
                try:
                    results[rank] = fns[rank]()
                except BaseException as err:          # (re-raised in the caller's thread)
                    errors[rank] = err
                finally:
                    self._finished.add(rank)
                    self._turn.notify_all()

        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT_S)
        self._finished.clear()
        if any(t.is_alive() for t in threads):
            raise AssertionError("a rank did not finish (deadlock in the simulated TP group)")
        for err in errors:
            if err is not None:
                raise err
        assert not self._pending and not self._results, "collectives left unmatched"
        return results
